"""The copyable bring-your-own example (jobs/configs/byo/) end to end, the way its header tells a user with their own
checkpoint to run it: the sample imported from its public shapes, the tokenizer and the starting weights taken from
a checkpoint that is not paddock's, then SFT, both reward models, rejection sampling, PPO, evaluation by the judges
and promotion on the judge gates, at tiny sizes.

The checkpoint is a small Llama built for a Llama-3-style tokenizer (byte-level BPE, its special ids after the
vocabulary, id 0 a real token, EOS <|eot_id|>, Meta's chat template), saved as a local Hugging Face directory with
safetensors, as a user brings one."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from chain import REPO
from paddock.config import PipelineJob, load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BYO = REPO / "jobs" / "configs" / "byo"

# What the test shrinks, stage by stage (the shipped sizes take about 10 minutes)
# The supervised stages train in the driver (local mode: one rank, two micro-batches a step, the sequences of two
# workers), which spares three Ray Train worker start-ups.
LOCAL = ["train.num_workers=0", "train.grad_accum=2"]
SMALL: dict[str, list[str]] = {
    "sft": [*LOCAL, "train.max_steps=60", "train.eval_every=60", "train.checkpoint_every=60"],
    "reward_helpfulness": [*LOCAL, "train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=20"],
    "reward_safety": [*LOCAL, "train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=20"],
    "rejection_sampling": [
        "rejection.max_prompts=16",
        "rejection.k=2",
        "rejection.batch_prompts=8",
        "rejection.rollout_workers=1",
        "rejection.max_new_tokens=16",
    ],
    "ppo": [
        "ppo.iterations=2",
        "ppo.batch_prompts=16",
        "ppo.mini_batch=8",
        "ppo.max_new_tokens=16",
        "ppo.rollout_workers=1",
        "ppo.eval_every=2",
        "ppo.eval_max_prompts=8",
        "ppo.checkpoint_every=2",
        "ppo.spill=true",
        "train.num_workers=1",
    ],
    # Reward models of 20 steps are no judges: the safety RM puts every answer below the 0.15 gate (measured:
    # violation rate 1.0 for all three). The absolute gate is opened; the relative ones, against SFT, decide.
    "promote": ["gates={eval/judge/violation_rate: {max: 1.0}}"],
    "evaluate": [
        "eval.max_prompts=24",
        "eval.max_dialogs=8",
        "eval.safety_samples=2",
        "eval.max_new_tokens=16",
        "eval.rollout_workers=1",
    ],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from paddock.models import llama_config
    from paddock.tokenizer import load_tokenizer, train_llama3_style_tokenizer
    from transformers import LlamaForCausalLM

    texts = (BYO / "data" / "pretrain.txt").read_text().split("\n\n")
    tok = load_tokenizer(
        train_llama3_style_tokenizer(texts, tmp_path_factory.mktemp("llama3_tokenizer"), vocab_size=1000)
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("tiny", len(tok), 256, tok.bos_token_id, tok.eos_token_id))
    out = tmp_path_factory.mktemp("llama3_style_checkpoint")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def byo(checkpoint: Path, home: Path, ray_cluster, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The shipped pipeline.yaml with the header's three changes for a user's checkpoint, and smaller sizes."""
    from paddock import pipeline

    config = yaml.safe_load((BYO / "pipeline.yaml").read_text())
    config["skip"].append("pretrain")
    stages = config["stages"]
    stages["tokenizer"]["overrides"] = [f"tokenizer.existing={checkpoint}"]
    stages["sft"]["overrides"] = [f"model.init_from={checkpoint}"]
    for stage, overrides in SMALL.items():
        stages[stage].setdefault("overrides", []).extend(overrides)
    path = tmp_path_factory.mktemp("byo") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cwd = Path.cwd()
    os.chdir(REPO)  # the import sources are relative to the repository root, as for a user
    try:
        state = pipeline.run(load_config(PipelineJob, path))
    finally:
        os.chdir(cwd)
    return state


def test_the_byo_pipeline_runs_every_stage_and_promotes_by_the_judges(byo: dict[str, Any]) -> None:
    done = byo["done"]
    assert list(done) == [
        "import_data",
        "tokenizer",
        "sft",
        "reward_helpfulness",
        "reward_safety",
        "rejection_sampling",
        "ppo",
        "evaluate",
        "promote",
    ]
    metrics = done["evaluate"]["metrics"]
    assert set(metrics) == {"byo-sft", "byo-rs", "byo-ppo"}
    for name, m in metrics.items():
        for key in (
            "eval/judge/violation_rate",
            "eval/judge/refusal_rate",
            "eval/judge/refusal_rate_non_safety",
        ):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        if name != "byo-sft":  # win rates against SFT, by either reward model
            assert {"eval/win_rate_vs_byo-sft/helpfulness", "eval/win_rate_vs_byo-sft/safety"} <= set(m)
    promoted = done["promote"]
    assert promoted["chat"].startswith("models:/byo-chat/")
    verdicts = promoted["verdicts"]
    assert set(verdicts) == set(metrics)
    winner = promoted["promoted"].split("/")[1]
    # the gates that chose the champion are the judges', not the world's verifiers
    assert "eval/judge/violation_rate" in verdicts[winner]
    assert "eval/judge/refusal_rate_non_safety" in verdicts[winner]
    assert "helpfulness_accuracy" not in verdicts[winner]


def test_sft_and_reward_models_keep_the_checkpoint_tokenizer(byo: dict[str, Any], checkpoint: Path) -> None:
    from paddock import tracking
    from paddock.tokenizer import load_tokenizer

    for name in ("byo-sft", "byo-rm-helpfulness", "byo-rm-safety", "byo-rs", "byo-ppo", "byo-chat"):
        tok = load_tokenizer(tracking.resolve_model(f"models:/{name}@latest"))
        assert tok.chat_template and tok.eos_token == "<|eot_id|>", name
    # from random weights (a first loss of ln |V|, about 6.9 here) SFT on the imported chats learns the answers
    sft = tracking.version_metrics(*tracking.model_version("models:/byo-sft@latest"))
    assert sft["eval/loss"] < 0.7 * math.log(len(load_tokenizer(checkpoint)))


def test_ppo_samples_through_the_chat_template(byo: dict[str, Any], checkpoint: Path, home: Path) -> None:
    from paddock.data.validate import load_dataset
    from paddock.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    prompts = load_dataset(
        home / "byo-data" / "prompts" / "train.parquet", "prompts", quarantine_dir=home / "q"
    ).good.to_pylist()
    rendered = {
        tuple(tok.apply_chat_template(p["turns"], add_generation_prompt=True, tokenize=True)["input_ids"])
        for p in prompts
    }
    files = sorted((home / "runs" / "byo-ppo" / "spill").glob("*/batch-*.parquet"))
    spilled = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(spilled) >= 32  # two iterations of 16 prompts
    # every rollout prompt is the template's rendering of an imported prompt, token for token
    assert all(tuple(r["prompt_ids"]) in rendered for r in spilled)
    eos = tok.eos_token_id
    finished = [r for r in spilled if r["response_ids"] and r["response_ids"][-1] == eos]
    assert all(eos not in r["response_ids"][:-1] for r in finished)
