"""The bridge from Ray Train's controller to the driver: kept free of mlflow so that no worker imports it."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback
from ray.util.queue import Queue


class ForwardReports(UserCallback):
    """Runs on the Train controller: puts rank 0's metrics of every report on a queue the driver reads."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and metrics[0]:
            self.queue.put(dict(metrics[0]))
