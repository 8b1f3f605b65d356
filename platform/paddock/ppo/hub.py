"""The policy hub: where learners announce weights by version and the PPO driver picks them up.

Rank 0 of the learners announces each publication here (its version, the layout of the policy's and the value
model's tensors) and then streams the weights over that version's process groups (``paddock.ppo.sync``), which
the driver has the receivers join: no tensor passes through this actor or the object store. Versions count
publications and only go up, also across a learner restart: a restarted learner group publishes the weights of
the checkpoint it resumed from as a new version, and the rollout buffer drops experience sampled by the lost ones.

A publication that reached no receiver the driver can use (its stream broke, or the value scorer restarted on the
way) is sent again, not waited out: the driver asks the rollout buffer for it (``RolloutBuffer.request_resend``),
the learners waiting there for experience stream the same version once more as its next ``attempt``, over groups
of their own (``Publication.group``), and the hub announces that attempt as it announces a version.

The hub also carries what learners and driver tell each other: each iteration's learner statistics, a stop
request (early stopping, KL limit), the driver's small state that a checkpoint must keep (running reward
moments) and, when learners and rollout engines take turns on the GPUs, that the learners gave up the device.
It also holds how many ranks receive the policy (``set_receivers``): the driver lowers it when a rollout worker is
dead for good, and every publication from then on is sized for the workers left (``Publication.receivers``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from paddock.ppo.sync import Layout

# What rank 0 of the learners leaves in place of an iteration's batch when the driver asked for the latest
# version again: every rank streams it once more, then waits for the batch anew.
RESEND = "resend"


@dataclass
class Publication:
    version: int
    iteration: int  # optimisation iterations the weights have seen
    policy: Layout  # what the "pub{version}/policy" group carries
    value: Layout | None  # and "pub{version}/value" (None: no value model, ppo.advantage rloo)
    nbytes: int  # both, in the inference precision
    published_at: float = field(default_factory=time.time)
    stats: dict[str, float] = field(default_factory=dict)  # the learners' statistics of that iteration
    attempt: int = 0  # how many times this version was sent before (the driver asked again)
    # Ranks of the rollout workers this attempt's policy group waits for (None: every configured worker's)
    receivers: int | None = None

    def group(self, name: str) -> str:
        """The prefix of this attempt's process group ``name`` ("policy", "value", "repair3")."""
        return group(self.version, self.attempt, name)


def group(version: int, attempt: int, name: str) -> str:
    return f"pub{version}.{attempt}/{name}"


@ray.remote(num_cpus=0)
class PolicyHub:
    def __init__(self) -> None:
        self.latest: Publication | None = None
        self.changed = asyncio.Condition()
        self.stop_reason: str | None = None
        self.finished = False
        self.driver_state: dict[str, Any] = {}
        self.batches: dict[int, list[Any] | str | None] = {}
        self.rest = (0, -1)  # the (version, attempt) after whose stream the learners last gave up the device
        # the policy group's receiving ranks (None: every configured worker's)
        self.receivers: int | None = None

    async def publish(
        self,
        iteration: int,
        policy: Layout,
        value: Layout | None,
        nbytes: int,
        stats: dict[str, float] | None = None,
    ) -> tuple[int, int | None]:
        """Announce new weights; returns their version (one more than the last, whoever published it) and the
        ranks its policy group waits for (``set_receivers``)."""
        async with self.changed:
            version = 1 if self.latest is None else self.latest.version + 1
            # A (re)started learner group begins at ``iteration``: batches handed out from there on are void.
            for stale in [i for i in self.batches if i >= iteration]:
                del self.batches[stale]
            self.latest = Publication(
                version, iteration, policy, value, nbytes, stats=stats or {}, receivers=self.receivers
            )
            self.changed.notify_all()
            return version, self.receivers

    async def republish(self, version: int) -> tuple[int, int | None]:
        """Announce ``version`` again (the driver asked for it once more); returns the new attempt's number and
        the ranks its policy group waits for."""
        async with self.changed:
            if self.latest is None or self.latest.version != version:
                latest = None if self.latest is None else self.latest.version
                raise ValueError(f"asked to send version {version} again, but the latest is {latest}")
            # the resend request left in place of the batch goes, as a new publication's stale batches do
            for stale in [i for i in self.batches if i >= self.latest.iteration]:
                del self.batches[stale]
            self.latest = dataclasses.replace(
                self.latest,
                attempt=self.latest.attempt + 1,
                published_at=time.time(),
                receivers=self.receivers,
            )
            self.changed.notify_all()
            return self.latest.attempt, self.receivers

    def set_receivers(self, ranks: int) -> None:
        """From the next publication or attempt on, the policy group waits for ``ranks`` receivers (the driver's
        rollout workers that are not dead for good)."""
        self.receivers = ranks

    async def wait_newer(self, seen: tuple[int, int], timeout_s: float) -> Publication | None:
        """The latest publication once its (version, attempt) is above ``seen``; None on timeout or when
        finished."""

        def newer() -> bool:
            return self.latest is not None and (self.latest.version, self.latest.attempt) > tuple(seen)

        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.finished or newer()), timeout_s)
            except asyncio.TimeoutError:
                return None
            return self.latest if newer() else None

    async def rested(self, version: int, attempt: int) -> None:
        """The learners have moved their states to host memory after streaming ``version``'s ``attempt``
        (``ppo.learner_offload``), or ended: the rollout engines may take the device."""
        async with self.changed:
            self.rest = max(self.rest, (version, attempt))
            self.changed.notify_all()

    async def wait_rested(self, seen: tuple[int, int], timeout_s: float) -> bool:
        """Whether the learners rested after the publication ``seen`` (version, attempt); False when they did not
        within ``timeout_s``, or a newer publication or the end came first (they died, restarted or finished)."""

        def rested() -> bool:
            return self.rest >= tuple(seen)

        def moved_on() -> bool:
            return self.finished or (
                self.latest is not None and (self.latest.version, self.latest.attempt) > tuple(seen)
            )

        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: rested() or moved_on()), timeout_s)
            except asyncio.TimeoutError:
                return False
            return rested()

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

    async def put_batch(self, iteration: int, entries: list[Any] | str | None) -> None:
        """Rank 0 leaves the refs of an iteration's experience here for the other ranks (None: stop; ``RESEND``:
        send the latest version again first)."""
        async with self.changed:
            self.batches[iteration] = entries
            self.changed.notify_all()

    async def get_batch(self, iteration: int, timeout_s: float) -> list[Any] | str | None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: iteration in self.batches), timeout_s)
            return self.batches[iteration]

    def drop_batch(self, iteration: int) -> None:
        self.batches.pop(iteration, None)

    def set_driver_state(self, state: dict[str, Any]) -> None:
        self.driver_state = state

    def get_driver_state(self) -> dict[str, Any]:
        return self.driver_state
