"""The reward-model ranking loss with Llama 2's rating margins (Touvron et al. 2023, section 3.2.2, eq. 2).

``loss = -log(sigmoid(r(x, y_chosen) - r(x, y_rejected) - m(rating)))``, with m from Table 27 of the paper:
a larger margin for clearer preferences, zero for "negligibly better / unsure".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RATING_MARGINS: dict[str, dict[str, float]] = {
    "none": {"significantly_better": 0.0, "better": 0.0, "slightly_better": 0.0, "negligibly_better": 0.0},
    "small": {
        "significantly_better": 1.0,
        "better": 2 / 3,
        "slightly_better": 1 / 3,
        "negligibly_better": 0.0,
    },
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


def rating_margin(rating: str, margin: str) -> float:
    """m(rating) for margin table ``margin`` ('none', 'small' or 'large')."""
    try:
        return RATING_MARGINS[margin][rating]
    except KeyError:
        raise ValueError(f"unknown margin {margin!r} or rating {rating!r}") from None


def margin_ranking_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected - margin)``.

    Shapes: all (batch,). Returns a scalar. ``logsigmoid`` keeps it finite for large gaps.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()
