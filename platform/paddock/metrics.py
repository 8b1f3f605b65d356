"""paddock's own Prometheus metrics, exported through Ray (``ray.util.metrics``).

Ray's metrics agent on every node serves them next to Ray's own metrics, with a ``ray_`` prefix: the gauge
``paddock_train_tokens_per_s`` is scraped as ``ray_paddock_train_tokens_per_s``. The Grafana dashboards in
``dashboards/`` are built on these names; ``tests/unit/test_dashboards.py`` checks that every expression there
refers to a metric exported here, by Serve (``paddock.serving.app``) or by Ray itself.

Training workers record per step, the PPO driver per iteration; the serving metrics live with the Serve app.
Set ``PADDOCK_METRICS=0`` to record nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from typing import Any

# paddock metric name -> (the key it is read from, description)
TRAIN_GAUGES: dict[str, tuple[str, str]] = {
    "paddock_train_loss": ("train/loss", "Training loss of the last step."),
    "paddock_train_tokens_per_s": ("train/tokens_per_s", "Training tokens per second, all workers."),
    "paddock_train_mfu": ("train/mfu", "Model FLOPs utilisation of the last step."),
    "paddock_train_step": ("step", "Optimiser steps done."),
    "paddock_train_grad_norm": ("train/grad_norm", "Global gradient norm before clipping."),
}
PPO_GAUGES: dict[str, tuple[str, str]] = {
    "paddock_ppo_reward_combined": ("ppo/reward_combined", "Mean Llama 2 combined reward of the batch."),
    "paddock_ppo_reward_helpfulness": ("ppo/reward_helpfulness", "Mean helpfulness RM score of the batch."),
    "paddock_ppo_reward_safety": ("ppo/reward_safety", "Mean safety RM score of the batch."),
    "paddock_ppo_kl": ("ppo/kl", "Mean KL to the reference, nats per answer."),
    "paddock_ppo_buffer_occupancy": ("buffer/occupancy", "Rollout buffer rows held over capacity."),
    "paddock_ppo_buffer_staleness": ("buffer/staleness_mean", "Mean policy-version lag of trained rows."),
    "paddock_ppo_generate_s": ("ppo/generate_s", "Seconds spent generating the iteration's batch."),
    "paddock_ppo_score_s": ("ppo/score_s", "Seconds spent scoring the iteration's batch."),
    "paddock_ppo_train_s": ("ppo/train_s", "Seconds the learners spent on the iteration."),
    "paddock_ppo_weight_sync_s": ("ppo/weight_sync_s", "Seconds to publish and load the new weights."),
}
SERVE_METRICS = (
    "paddock_serve_requests",
    "paddock_serve_errors",
    "paddock_serve_tokens_generated",
    "paddock_serve_time_to_first_token_s",
    "paddock_serve_latency_s",
)
TAG_KEYS = ("stage", "run")


def enabled() -> bool:
    return os.environ.get("PADDOCK_METRICS", "1") != "0"


@cache
def _gauge(name: str, description: str) -> Any:
    from ray.util.metrics import Gauge

    return Gauge(name, description, tag_keys=TAG_KEYS)


def _record(
    gauges: Mapping[str, tuple[str, str]], values: Mapping[str, Any], tags: Mapping[str, str]
) -> None:
    import ray

    if not enabled() or not ray.is_initialized():
        return
    for name, (key, description) in gauges.items():
        value = values.get(key)
        if isinstance(value, int | float):
            _gauge(name, description).set(float(value), tags=dict(tags))


def record_train(values: Mapping[str, Any], stage: str, run: str) -> None:
    """Called by training workers (rank 0) with each step's record."""
    _record(TRAIN_GAUGES, values, {"stage": stage, "run": run})


def record_ppo(values: Mapping[str, Any], run: str) -> None:
    """Called by the PPO driver with each iteration's metrics."""
    _record(PPO_GAUGES, values, {"stage": "ppo", "run": run})


def exported_names() -> set[str]:
    """Every name paddock exports, as Prometheus sees it (with Ray's ``ray_`` prefix)."""
    names = [*TRAIN_GAUGES, *PPO_GAUGES, *SERVE_METRICS]
    return {f"ray_{n}" for n in names}
