"""Learner ranks in processes of their own (torch.multiprocessing, no Ray) over gloo, set up as
``paddock.ppo.learner`` and ``paddock.train`` set up Ray Train's workers; for tests that run the learners' code on
two ranks."""

from __future__ import annotations

import os
import socket
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int, tc: Any) -> None:
    """Make this process rank ``rank`` of ``world`` (the master at ``port`` on this machine) for ``tc``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import deepspeed
    from paddock.train import engine

    engine.setup_worker(tc)
    deepspeed.init_distributed(dist_backend="gloo")
