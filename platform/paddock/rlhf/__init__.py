"""RLHF maths as pure torch functions: no Ray, no MLflow. Shapes in each docstring, tested by hand."""

from paddock.rlhf.reward import RATING_MARGINS, margin_ranking_loss, rating_margin

__all__ = ["RATING_MARGINS", "margin_ranking_loss", "rating_margin"]
