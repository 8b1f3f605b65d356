"""The seeded tiny chain the integration tier shares: stage overrides for the test world (see conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def overrides(world: Path, tokenizer: Path) -> dict[str, list[str]]:
    common = [
        f"tokenizer={tokenizer}",
        "train.cpus_per_worker=0.5",
        "train.num_workers=2",
        "train.zero_stage=2",
    ]
    return {
        "pretrain": [
            *common,
            f"data.train={world}/pretrain/train.parquet",
            f"data.test={world}/pretrain/test.parquet",
            "data.seq_len=128",
            "train.max_steps=300",
            "train.checkpoint_every=100",
            "train.eval_every=150",
            "optim.warmup_steps=10",
        ],
        "sft": [
            *common,
            f"data.train={world}/sft/train.parquet",
            f"data.test={world}/sft/test.parquet",
            "data.seq_len=128",
            "train.max_steps=200",
            "train.eval_every=100",
            "optim.lr=2.0e-3",
        ],
        "rm_h": [
            *common,
            f"data.train={world}/preferences/train.parquet",
            f"data.test={world}/preferences/test.parquet",
        ],
        "rm_s": [
            *common,
            f"data.train={world}/preferences/train.parquet",
            f"data.test={world}/preferences/test.parquet",
        ],
    }
