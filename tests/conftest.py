"""Shared fixtures: a small tiny-world and a tokenizer trained on it, built once per test session."""

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
def llama3_tokenizer_dir(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer in the shape of Llama 3's (byte-level BPE, its special tokens after the vocabulary, EOS
    <|eot_id|>, its chat template), trained on the test world: a checkpoint's own tokenizer that is not paddock's."""
    import pyarrow.parquet as pq
    from paddock.tokenizer import train_llama3_style_tokenizer

    texts = pq.read_table(world_dir / "pretrain" / "train.parquet")["text"].to_pylist()
    return train_llama3_style_tokenizer(texts, tmp_path_factory.mktemp("llama3_tokenizer"), vocab_size=1000)


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray instance for the whole integration tier."""
    import ray
    from paddock.cluster import connect

    connect(num_cpus=4)
    yield ray
    ray.shutdown()


_RESULTS: list[str] = []


@pytest.fixture
def results():  # type: ignore[no-untyped-def]
    """``results(line)`` puts a measured result in the run's closing "results" section, shown when the test passes
    too (pytest shows a passing test's prints only with -s), so that CI's log carries the numbers."""
    return _RESULTS.append


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _RESULTS:
        terminalreporter.section("results")
        for line in _RESULTS:
            terminalreporter.write_line(line)
