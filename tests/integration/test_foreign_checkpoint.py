"""SFT, a reward model and PPO from a checkpoint that is not paddock's: a small Llama built for a Llama-3-style
tokenizer (byte-level BPE, its special ids after the vocabulary, id 0 a real token, EOS <|eot_id|>, Meta's chat
template), saved as a local Hugging Face directory with safetensors, as a user brings one."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from chain import REPO
from paddock.config import PPOJob, RewardJob, SFTJob, load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(llama3_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from paddock.models import llama_config
    from paddock.tokenizer import load_tokenizer
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(llama3_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("tiny", len(tok), 256, tok.bos_token_id, tok.eos_token_id))
    out = tmp_path_factory.mktemp("llama3_style_checkpoint")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _local(checkpoint: Path, world: Path, data: str, steps: int) -> list[str]:
    return [
        f"tokenizer={checkpoint}",
        f"model.init_from={checkpoint}",
        f"data.train={world}/{data}/train.parquet",
        f"data.test={world}/{data}/test.parquet",
        "data.seq_len=128",
        "train.num_workers=0",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "registry_prefix=l3",
    ]


@pytest.fixture(scope="module")
def stages(checkpoint: Path, world_dir: Path, home: Path, ray_cluster):  # type: ignore[no-untyped-def]
    from paddock.train.stage import run_supervised

    configs = REPO / "jobs" / "configs" / "tiny"
    sft = run_supervised(
        load_config(
            SFTJob, configs / "sft.yaml", [*_local(checkpoint, world_dir, "sft", 60), "optim.lr=2.0e-3"]
        ),
        "sft",
    )
    rms = {
        kind: run_supervised(
            load_config(
                RewardJob, configs / f"reward_{kind}.yaml", _local(checkpoint, world_dir, "preferences", 20)
            ),
            f"reward_{kind}",
        )
        for kind in ("helpfulness", "safety")
    }
    return sft, rms


def test_sft_and_reward_models_train_from_the_foreign_checkpoint(stages, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    from paddock.tokenizer import load_tokenizer

    sft, rms = stages
    history = sft.history
    assert (
        history[-1]["eval/loss"] < 0.7 * history[0]["train/loss"]
    )  # from random weights: the loss falls fast
    assert sft.model_uri == "models:/l3-sft/1"
    for result in (sft, *rms.values()):
        tok = load_tokenizer(result.checkpoint_dir)  # each output carries the checkpoint's own tokenizer
        assert tok.chat_template and tok.eos_token == "<|eot_id|>"
    assert {r.model_uri for r in rms.values()} == {"models:/l3-rm-helpfulness/1", "models:/l3-rm-safety/1"}


def test_ppo_from_the_foreign_checkpoint_samples_through_its_chat_template(
    stages, checkpoint: Path, world_dir: Path, home: Path
) -> None:  # type: ignore[no-untyped-def]
    from paddock.data.validate import load_dataset
    from paddock.ppo.loop import run
    from paddock.tokenizer import load_tokenizer

    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            f"tokenizer={checkpoint}",
            "policy=models:/l3-sft@latest",
            "reward_helpfulness=models:/l3-rm-helpfulness@latest",
            "reward_safety=models:/l3-rm-safety@latest",
            "registry_prefix=l3",
            f"ppo.prompts={world_dir}/prompts/train.parquet",
            f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
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
    )
    result = run(job)
    assert result.iterations == 2 and result.model_uri.startswith("models:/l3-ppo/")
    tok = load_tokenizer(checkpoint)
    prompts = load_dataset(
        world_dir / "prompts" / "train.parquet", "prompts", quarantine_dir=home / "q"
    ).good.to_pylist()
    rendered = {
        tuple(tok.apply_chat_template(p["turns"], add_generation_prompt=True, tokenize=True)["input_ids"])
        for p in prompts
    }
    spilled = [r for f in sorted(home.rglob("spill/*/batch-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(spilled) >= 32  # two iterations of 16 prompts
    # every rollout prompt is the template's rendering of a training prompt, token for token
    assert all(tuple(r["prompt_ids"]) in rendered for r in spilled)
    eos = tok.eos_token_id
    finished = [r for r in spilled if r["response_ids"] and r["response_ids"][-1] == eos]
    assert all(eos not in r["response_ids"][:-1] for r in finished)
