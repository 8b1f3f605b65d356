"""LoRA SFT and a LoRA reward model on the chain's tiny models: adapters train, the registered model is a plain
checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from chain import REPO, overrides
from paddock.config import RewardJob, SFTJob, load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("peft")


def _plain(checkpoint: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    return [k for k in names if "lora" in k or "base_layer" in k or "modules_to_save" in k]


def test_lora_sft_and_reward_model_train_and_register_plain_checkpoints(chain, world_dir, tokenizer_dir):  # type: ignore[no-untyped-def]
    from paddock.models import load_causal_lm, load_scalar_model
    from paddock.train.stage import run_supervised

    o = overrides(world_dir, tokenizer_dir)
    local = ["train.num_workers=0", "registry_prefix=lora", "model.lora.r=8", "model.lora.alpha=16"]
    sft = run_supervised(
        load_config(
            SFTJob,
            REPO / "jobs/configs/tiny/sft.yaml",
            [*o["sft"], *local, "train.max_steps=40", "train.eval_every=40", "optim.lr=3.0e-3"],
        ),
        "sft",
    )
    first, last = sft.history[0]["train/loss"], sft.history[-1]["eval/loss"]
    print(f"LoRA SFT from tiny-base: train loss {first:.3f} -> eval loss {last:.3f}")
    assert last < first - 0.2
    assert sft.model_uri == "models:/lora-sft/1" and _plain(sft.checkpoint_dir) == []
    load_causal_lm(sft.checkpoint_dir)  # a plain Llama: loads without peft
    rm = run_supervised(
        load_config(
            RewardJob,
            REPO / "jobs/configs/tiny/reward_helpfulness.yaml",
            [*o["rm_h"], *local, "model.init_from=models:/lora-sft@latest", "train.max_steps=20"],
        ),
        "reward_helpfulness",
    )
    assert rm.model_uri == "models:/lora-rm-helpfulness/1" and _plain(rm.checkpoint_dir) == []
    assert load_scalar_model(rm.checkpoint_dir).score.weight.shape[0] == 1
