"""Set-up shared by the benchmarks: a throwaway PADDOCK_HOME, a small tiny world and a tokenizer trained on it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def bench_world(
    prefix: str, *, pretrain_mb: float, rl_prompts: int, vocab_size: int, dialogs: int = 50
) -> tuple[Path, Path, Path, list[str]]:
    """(home, world dir, tokenizer dir, pretraining texts). Sets PADDOCK_HOME and embedded-Ray auth for the process."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["PADDOCK_HOME"] = str(home)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import pyarrow.parquet as pq
    from paddock.config import WorldConfig
    from paddock.tokenizer import train_tokenizer
    from paddock.world.generate import write_world

    world = home / "world"
    write_world(
        WorldConfig(
            out_dir=str(world),
            pretrain_mb=pretrain_mb,
            sft_dialogs=dialogs,
            helpfulness_pairs=dialogs,
            safety_pairs=dialogs,
            rl_prompts=rl_prompts,
            eval_prompts=20,
            gatt_dialogs=max(10, dialogs // 5),
        )
    )
    texts = pq.read_table(world / "pretrain" / "train.parquet")["text"].to_pylist()
    return home, world, train_tokenizer(texts, home / "tokenizer", vocab_size=vocab_size), texts


def write_result(out: str | Path, name: str, meta: dict, rows: list[dict]) -> Path:
    """``<out>/<name>.json`` for benchmarks/_summary.py: the machine it ran on, the run's settings and its rows."""
    import json
    import platform

    import torch

    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, **meta}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return path


def rss() -> int:
    """This process's resident memory now, in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def single_rank(port: int, threads: int = 2) -> int:
    """A one-rank gloo group for DeepSpeed in a fresh benchmark process; returns its resident memory after the
    imports, the baseline a peak is measured against."""
    import deepspeed
    import torch
    from paddock.train.optim import skip_cpu_shm_comm_op

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    skip_cpu_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(threads)
    return rss()
