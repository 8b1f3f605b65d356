"""Deterministic fault injection for the integration tier's Ray actors."""

from __future__ import annotations

import time
from typing import Any


def kill_and_wait(actor: Any, timeout_s: float = 60.0) -> None:
    """``ray.kill`` returns before the actor is dead: a call made right after it may still be answered (CI saw a
    killed rollout worker answer the next ``sleep``). Kills ``actor`` for good and returns once Ray reports it
    dead, so that what the test calls next meets a dead actor every time."""
    import ray

    ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{actor} still answered {timeout_s:.0f} s after ray.kill")
        time.sleep(0.05)
