"""Shared fixtures, built once per test session: a small tiny world, a tokenizer trained on it, the embedded Ray
instance and the seeded chain of stages the integration and reliability tiers start from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from paddock.config import WorldConfig
    from paddock.world.generate import WorldWriter

    out = tmp_path_factory.mktemp("world")
    # A quarter of the pairs held out: ~125 per rating, enough to compare accuracy between ratings.
    cfg = WorldConfig(
        pretrain_mb=0.4,
        sft_dialogs=1000,
        helpfulness_pairs=2000,
        safety_pairs=400,
        rl_prompts=100,
        eval_prompts=100,
        gatt_dialogs=40,
        test_fraction=0.25,
    )
    WorldWriter(cfg).write(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pyarrow.parquet as pq
    from paddock.tokenizer import train_tokenizer

    texts = pq.read_table(world_dir / "pretrain" / "train.parquet")["text"].to_pylist()
    return train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=1000)


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from paddock.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray instance for the whole integration tier."""
    import ray
    from paddock.cluster import connect

    connect(num_cpus=4)
    yield ray
    ray.shutdown()


# The integration and reliability tiers' shared chain: pretraining -> SFT -> helpfulness and safety RMs, trained
# once. Every stage runs for real (2 Ray Train workers, ZeRO-2, MLflow under a temporary PADDOCK_HOME) and registers
# tiny-base, tiny-sft, tiny-rm-helpfulness and tiny-rm-safety there; the supervised tests check the stages, and
# the RLHF, serving and fault tests start from them. Stage overrides: chain.py.


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("paddock_home")
    old = os.environ.get("PADDOCK_HOME")
    os.environ["PADDOCK_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PADDOCK_HOME", None)
    else:
        os.environ["PADDOCK_HOME"] = old


@pytest.fixture(scope="session")
def chain(home: Path, world_dir: Path, tokenizer_dir: Path, ray_cluster):
    from chain import overrides
    from paddock.config import PretrainJob, RewardJob, SFTJob, load_config
    from paddock.train.stage import run_supervised

    o = overrides(world_dir, tokenizer_dir)
    configs = REPO / "jobs" / "configs" / "tiny"
    pre = run_supervised(load_config(PretrainJob, configs / "pretrain.yaml", o["pretrain"]), "pretrain")
    sft = run_supervised(load_config(SFTJob, configs / "sft.yaml", o["sft"]), "sft")
    rm_h = run_supervised(
        load_config(RewardJob, configs / "reward_helpfulness.yaml", o["rm_h"]), "reward_helpfulness"
    )
    rm_s = run_supervised(load_config(RewardJob, configs / "reward_safety.yaml", o["rm_s"]), "reward_safety")
    return {"pretrain": pre, "sft": sft, "rm_h": rm_h, "rm_s": rm_s}
