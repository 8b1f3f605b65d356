"""Ghost Attention and safety context distillation on the shared tiny chain, and their reruns after a kill.

GAtt samples the world's multi-turn dialogs from tiny-sft with the instruction on every user turn, then trains on
them with the instruction in the first turn only; context distillation answers the safety prompts with and without
the safety preprompt and keeps the preprompted answers the safety reward model prefers. Both keep what they sampled
keyed by everything it depends on, so a rerun after a kill in the fine-tune samples nothing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
from chain import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A few steps of the shipped fine-tunes, pointed at the test world: what is checked here is the data and the rerun
FINETUNE = [
    "train.micro_batch_size=2",
    "train.max_steps=4",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "data.seq_len=128",
]


def gatt_job(world_dir: Path, tokenizer_dir: Path, *extra: str) -> Any:
    from paddock.config import GAttJob, load_config

    job = load_config(
        GAttJob,
        REPO / "jobs/configs/tiny/gatt.yaml",
        [
            f"tokenizer={tokenizer_dir}",
            "policy=models:/tiny-sft@latest",
            f"gatt.dialogs={world_dir}/gatt/train.parquet",
            "gatt.max_dialogs=10",
            "gatt.max_new_tokens=32",
            "gatt.keep_following=false",  # the chain's SFT model rarely keeps an instruction: every answer counts
            f"replay={world_dir}/sft/train.parquet",
            *extra,
        ],
    )
    job.sft_overrides = [
        *job.sft_overrides,
        f"tokenizer={tokenizer_dir}",
        f"data.test={world_dir}/sft/test.parquet",
        *FINETUNE,
    ]
    return job


def cd_job(world_dir: Path, tokenizer_dir: Path, home: Path, *extra: str) -> Any:
    from paddock.config import DistillJob, load_config

    job = load_config(
        DistillJob,
        REPO / "jobs/configs/tiny/context_distillation.yaml",
        [
            f"tokenizer={tokenizer_dir}",
            "policy=models:/tiny-gatt@latest",
            "reward_safety=models:/tiny-rm-safety@latest",
            f"distill.prompts={world_dir}/prompts/train.parquet",
            "distill.max_prompts=24",
            f"replay=[{world_dir}/sft/train.parquet,{home}/runs/tiny-gatt/gatt.parquet]",
            *extra,
        ],
    )
    job.sft_overrides = [
        *job.sft_overrides,
        f"tokenizer={tokenizer_dir}",
        f"data.test={world_dir}/sft/test.parquet",
        *FINETUNE,
    ]
    return job


@pytest.fixture(scope="module")
def gatt(chain, world_dir: Path, tokenizer_dir: Path):
    from paddock.synth import gatt

    return gatt.run(gatt_job(world_dir, tokenizer_dir))


@pytest.fixture(scope="module")
def cd(gatt, home: Path, world_dir: Path, tokenizer_dir: Path):
    from paddock.synth import distill

    return distill.run(cd_job(world_dir, tokenizer_dir, home))


def _no_sampling(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("sampled again")


def test_gatt_trains_on_dialogs_with_the_instruction_in_the_first_turn_only(gatt, world_dir: Path):
    from paddock.world import styles

    sources = {d["id"]: d for d in pq.read_table(world_dir / "gatt" / "train.parquet").to_pylist()[:10]}
    examples = pq.read_table(gatt.dataset).to_pylist()
    assert gatt.examples == len(examples) > 0 and gatt.finetune.model_uri.startswith("models:/tiny-gatt/")
    for ex in examples:
        source_id, turn = ex["id"].removeprefix("gatt-").rsplit("-t", 1)
        tags = dict(t.split(":", 1) for t in ex["tags"] if ":" in t)
        ins = styles.instruction(tags["instruction"])
        users = [t["content"] for t in ex["turns"] if t["role"] == "user"]
        originals = [t["content"] for t in sources[source_id]["turns"] if t["role"] == "user"]
        # one example per turn k >= 2, ending on answer k; the instruction (long or short form) on turn 1 alone
        assert int(turn) == int(tags["turn"]) == len(users) >= 2
        assert ex["turns"][-1]["role"] == "assistant" and ex["turns"][-1]["content"]
        assert users[0] in (f"{originals[0]} {ins.text}", f"{originals[0]} {ins.short}")
        assert users[1:] == originals[1 : len(users)]


def test_a_rerun_of_gatt_reuses_its_sampled_dialogs(
    gatt, world_dir: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from paddock.synth import gatt as stage

    examples = pq.read_table(gatt.dataset).to_pylist()
    monkeypatch.setattr(stage, "synthesize", _no_sampling)
    monkeypatch.setattr(
        stage, "run_supervised", lambda *args, **kwargs: None
    )  # the fine-tune is checked above
    again = stage.run(gatt_job(world_dir, tokenizer_dir))
    assert "[gatt] reusing" in capsys.readouterr().out
    assert pq.read_table(again.dataset).to_pylist() == examples
    assert again.followed_while_sampling == gatt.followed_while_sampling
    with pytest.raises(AssertionError, match="sampled again"):  # other settings sample again
        stage.run(gatt_job(world_dir, tokenizer_dir, "gatt.temperature=0.5"))


def test_context_distillation_keeps_preprompted_answers_without_the_preprompt(cd, world_dir: Path):
    rows = [p for p in pq.read_table(world_dir / "prompts" / "train.parquet").to_pylist() if p["is_safety"]]
    safety = {tuple(t["content"] for t in p["turns"]) for p in rows}
    kept = pq.read_table(cd.dataset).to_pylist()
    assert cd.prompts == min(24, len(rows)) and len(kept) >= 32  # min_examples: a small set is repeated
    assert cd.finetune.model_uri.startswith("models:/tiny-cd/")
    for row in kept:
        assert row["system"] is None  # the preprompt's effect is distilled, not the preprompt
        prompt, answer = row["turns"][:-1], row["turns"][-1]
        assert tuple(t["content"] for t in prompt) in safety
        assert answer["role"] == "assistant" and answer["content"]


def test_a_rerun_of_context_distillation_reuses_its_kept_answers(
    cd,
    home: Path,
    world_dir: Path,
    tokenizer_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    from paddock.synth import distill

    kept = pq.read_table(cd.dataset).to_pylist()
    monkeypatch.setattr(distill, "distilled", _no_sampling)
    monkeypatch.setattr(distill, "run_supervised", lambda *args, **kwargs: SimpleNamespace(run_id=""))
    monkeypatch.setattr(distill.tracking, "tag_run", lambda *args, **kwargs: None)
    again = distill.run(cd_job(world_dir, tokenizer_dir, home))
    assert "[context_distillation] reusing" in capsys.readouterr().out
    assert pq.read_table(again.dataset).to_pylist() == kept
    assert (again.mean_safety_with, again.mean_safety_without) == (
        cd.mean_safety_with,
        cd.mean_safety_without,
    )
    with pytest.raises(AssertionError, match="sampled again"):
        distill.run(cd_job(world_dir, tokenizer_dir, home, "distill.max_prompts=4"))
