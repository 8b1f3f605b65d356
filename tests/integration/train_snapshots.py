"""Waiting for a Ray Train run's checkpoint: the point at which a fault test may kill what it kills."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def wait_for_checkpoint(
    storage: Path,
    run_glob: str,
    timeout_s: float,
    proc: subprocess.Popen | None = None,  # type: ignore[type-arg]
) -> Path:
    """The checkpoint-manager snapshot of the Ray Train run ``storage/run_glob`` once it records a checkpoint.

    Ray Train's controller writes it a poll (about 2 s) after the worker's report, so a checkpoint counts from here,
    not from the report's log line. Polled; with ``proc``, fails as soon as that process has ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, f"{proc.args!r} ended before a checkpoint of {run_glob}"
        for snapshot in storage.glob(f"{run_glob}/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text())["checkpoint_results"]:
                    return snapshot
            except (ValueError, KeyError):  # being written
                pass
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of {run_glob} recorded under {storage} within {timeout_s} s")
