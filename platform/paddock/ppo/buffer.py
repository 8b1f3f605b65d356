"""The shared rollout buffer: a Ray actor that holds PPO experience by reference, bounded and version-aware.

Producers (rollout workers) ``ray.put`` an Arrow record batch and hand the buffer only its ObjectRef, wrapped
in a list so that Ray does not resolve it: the rows themselves never pass through the actor. Consumers
(learners) get refs back and read the rows straight from the object store.

- Bounded: ``put`` waits while the buffer holds ``capacity_rows`` or more (producers block, nothing is lost).
- Versioned: every batch carries the policy version that produced it; when the learners publish version v,
  batches older than ``v - max_staleness`` are dropped and counted (``max_staleness=0`` is on-policy PPO).
- Accounted: rows_in == rows_out + rows_dropped + rows_held, always; ``stats()`` reports it.
- Where the learners wait: the driver that could not load the latest version asks for it again here
  (``request_resend``); a ``take`` waiting then returns at once with nothing, and the learners send it again.
- Auditable: with ``spill_dir`` set, every batch is also written to Parquet as it arrives (then the actor does
  read the rows, once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from paddock import atomic

EXPERIENCE_FIELDS = (
    "prompt_id",
    "prompt_ids",
    "response_ids",
    "behaviour_logprobs",
    "ref_logprobs",
    "values",
    "reward_helpfulness",
    "reward_safety",
    "reward_combined",
    "advantages",
    "returns",
    "policy_version",
    "is_safety",
)


@dataclass
class _Entry:
    ref: ray.ObjectRef
    rows: int
    version: int


@ray.remote(num_cpus=0)
class RolloutBuffer:
    def __init__(self, capacity_rows: int, max_staleness: int = 0, spill_dir: str | None = None):
        if capacity_rows < 1:
            raise ValueError(f"capacity_rows must be >= 1, got {capacity_rows}")
        self.capacity, self.max_staleness = capacity_rows, max_staleness
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self.entries: deque[_Entry] = deque()
        self.version = 0
        self.rows_in = self.rows_out = self.rows_dropped = 0
        self.staleness_sum = 0  # over rows taken
        self.batches_in = 0
        self.rows_refused = 0  # offered after close(): never committed, reported to the producer
        self.closed = False
        self.resend: int | None = None  # the version the driver asked for again, until it is published again
        self.changed = asyncio.Condition()

    @property
    def held(self) -> int:
        return sum(e.rows for e in self.entries)

    async def put(self, wrapped_ref: list[ray.ObjectRef], rows: int, policy_version: int) -> int:
        """Add one batch (its ref wrapped in a list). Waits while the buffer is full. Returns rows held.

        After ``close()`` nothing more is committed: the call returns -1 and the rows are counted as refused.
        """
        if rows <= 0:
            raise ValueError(f"a batch must hold rows, got {rows}")
        async with self.changed:
            await self.changed.wait_for(lambda: self.closed or self.held < self.capacity)
            if self.closed:
                self.rows_refused += rows
                return -1
            ref = wrapped_ref[0]
            if self.spill_dir is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                atomic.write_parquet(
                    await ref, self.spill_dir / f"batch-{self.batches_in:06d}-v{policy_version}.parquet"
                )
            self.entries.append(_Entry(ref, rows, policy_version))
            self.rows_in += rows
            self.batches_in += 1
            self._drop_stale()
            self.changed.notify_all()
            return self.held

    async def take(
        self, min_rows: int, timeout_s: float | None = None
    ) -> list[tuple[list[ray.ObjectRef], int, int]]:
        """Remove whole batches, oldest first, until at least ``min_rows`` rows (on timeout or close: what is there).
        A resend request (``request_resend``) ends the wait at once and takes nothing.

        Returns ``[([ref], rows, policy_version), ...]``.
        """
        async with self.changed:
            with contextlib.suppress(asyncio.TimeoutError):  # on timeout, hand out what there is
                await asyncio.wait_for(
                    self.changed.wait_for(
                        lambda: self.closed or self.resend is not None or self.held >= min_rows
                    ),
                    timeout_s,
                )
            if self.resend is not None and not self.closed:
                return []
            out, got = [], 0
            while self.entries and got < min_rows:
                e = self.entries.popleft()
                out.append(([e.ref], e.rows, e.version))
                got += e.rows
                self.rows_out += e.rows
                self.staleness_sum += (self.version - e.version) * e.rows
            self.changed.notify_all()
            return out

    async def publish_version(self, version: int) -> int:
        """The learners published ``version``: drop batches now too stale. Returns rows dropped now."""
        async with self.changed:
            if version < self.version:
                raise ValueError(f"policy version went backwards: {version} after {self.version}")
            self.version = version
            self.resend = None  # sent (again)
            dropped = self._drop_stale()
            self.changed.notify_all()
            return dropped

    async def request_resend(self, version: int) -> bool:
        """The driver could not load ``version``: the learners, once waiting here, send it again. False when that
        cannot happen: a newer version is out (the driver takes that one) or the learners are done."""
        async with self.changed:
            if self.closed or version != self.version:
                return False
            self.resend = version
            self.changed.notify_all()
            return True

    def resend_requested(self) -> int | None:
        """The version the driver asked for again, if it has not been sent since."""
        return self.resend

    async def close(self) -> None:
        """The learners are done: wake blocked producers, commit nothing more."""
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    def _drop_stale(self) -> int:
        keep: deque[_Entry] = deque()
        dropped = 0
        for e in self.entries:
            if self.version - e.version > self.max_staleness:
                dropped += e.rows
            else:
                keep.append(e)
        self.entries = keep
        self.rows_dropped += dropped
        return dropped

    def stats(self) -> dict[str, Any]:
        held = self.held
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_dropped": self.rows_dropped,
            "rows_held": held,
            "occupancy": held / self.capacity,
            "staleness_mean": self.staleness_sum / self.rows_out if self.rows_out else 0.0,
            "policy_version": self.version,
            "batches_in": self.batches_in,
            "rows_refused": self.rows_refused,
            "reconciles": self.rows_in == self.rows_out + self.rows_dropped + held,
        }
