"""The policy hub: where learners announce weights by version and the PPO driver picks them up.

Rank 0 of the learners announces each publication here (its version, the layout of the policy's and the value
model's tensors) and then streams the weights over that version's process groups (``paddock.ppo.sync``), which
the driver has the receivers join: no tensor passes through this actor or the object store. Versions count
publications and only go up, also across a learner restart: a restarted learner group publishes the weights of
the checkpoint it resumed from as a new version, and the rollout buffer drops experience sampled by the lost ones.

The hub also carries what learners and driver tell each other: each iteration's learner statistics, a stop
request (early stopping, KL limit) and the driver's small state that a checkpoint must keep (running reward
moments).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from paddock.ppo.sync import Layout


@dataclass
class Publication:
    version: int
    iteration: int  # optimisation iterations the weights have seen
    policy: Layout  # what the "pub{version}/policy" group carries
    value: Layout | None  # and "pub{version}/value" (None: no value model, ppo.advantage rloo)
    nbytes: int  # both, in the inference precision
    published_at: float = field(default_factory=time.time)
    stats: dict[str, float] = field(default_factory=dict)  # the learners' statistics of that iteration


@ray.remote(num_cpus=0)
class PolicyHub:
    def __init__(self) -> None:
        self.latest: Publication | None = None
        self.changed = asyncio.Condition()
        self.stop_reason: str | None = None
        self.finished = False
        self.driver_state: dict[str, Any] = {}
        self.batches: dict[int, list[Any] | None] = {}

    async def publish(
        self,
        iteration: int,
        policy: Layout,
        value: Layout | None,
        nbytes: int,
        stats: dict[str, float] | None = None,
    ) -> int:
        """Announce new weights; returns their version (one more than the last, whoever published it)."""
        async with self.changed:
            version = 1 if self.latest is None else self.latest.version + 1
            # A (re)started learner group begins at ``iteration``: batches handed out from there on are void.
            for stale in [i for i in self.batches if i >= iteration]:
                del self.batches[stale]
            self.latest = Publication(version, iteration, policy, value, nbytes, stats=stats or {})
            self.changed.notify_all()
            return version

    async def wait_newer(self, version: int, timeout_s: float) -> Publication | None:
        """The latest publication once its version is above ``version``; None on timeout or when finished."""
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(
                        lambda: self.finished or (self.latest is not None and self.latest.version > version)
                    ),
                    timeout_s,
                )
            except asyncio.TimeoutError:
                return None
            if self.latest is not None and self.latest.version > version:
                return self.latest
            return None

    def version(self) -> int:
        return 0 if self.latest is None else self.latest.version

    async def request_stop(self, reason: str) -> None:
        async with self.changed:
            self.stop_reason = self.stop_reason or reason
            self.changed.notify_all()

    def stop_requested(self) -> str | None:
        return self.stop_reason

    async def finish(self) -> None:
        async with self.changed:
            self.finished = True
            self.changed.notify_all()

    def is_finished(self) -> bool:
        return self.finished

    async def put_batch(self, iteration: int, entries: list[Any] | None) -> None:
        """Rank 0 leaves the refs of an iteration's experience here for the other ranks (None: stop)."""
        async with self.changed:
            self.batches[iteration] = entries
            self.changed.notify_all()

    async def get_batch(self, iteration: int, timeout_s: float) -> list[Any] | None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: iteration in self.batches), timeout_s)
            return self.batches[iteration]

    def drop_batch(self, iteration: int) -> None:
        self.batches.pop(iteration, None)

    def set_driver_state(self, state: dict[str, Any]) -> None:
        self.driver_state = state

    def get_driver_state(self) -> dict[str, Any]:
        return self.driver_state
