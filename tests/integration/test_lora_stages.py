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


def test_lora_ppo_moves_only_the_adapted_projections_and_registers_a_plain_policy(
    chain, world_dir, tokenizer_dir, home
):  # type: ignore[no-untyped-def]
    """Two PPO iterations with adapters on the SFT policy and two learners under ZeRO-3: the learners publish the
    adapters alone to rollout workers that hold the SFT checkpoint under them and give the reference log-probs
    with them off (no reference scorer); they export a plain checkpoint at the end, in which only the adapted
    projections moved against the start policy. (The registered policy is the best held-out evaluation's, which
    may be iteration 0's.)"""
    from paddock import tracking
    from paddock.config import PPOJob
    from paddock.ppo.loop import run
    from safetensors.torch import load_file

    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            f"tokenizer={tokenizer_dir}",
            "policy=models:/tiny-sft@latest",
            "reward_helpfulness=models:/tiny-rm-helpfulness@latest",
            "reward_safety=models:/tiny-rm-safety@latest",
            f"ppo.prompts={world_dir}/prompts/train.parquet",
            f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
            "registry_prefix=lora",
            "lora.r=8",
            "lora.alpha=16",
            "lora.target_modules=[q_proj, v_proj]",
            "optim.lr=1.0e-3",
            "ppo.iterations=2",
            "ppo.batch_prompts=16",
            "ppo.mini_batch=8",
            "ppo.max_new_tokens=16",
            "ppo.rollout_workers=1",
            "ppo.eval_every=2",
            "ppo.eval_max_prompts=8",
            "ppo.checkpoint_every=2",
            # two learners under ZeRO-3: the base partitioned, the adapters gathered alone for each publication
            "train.num_workers=2",
            "train.zero_stage=3",
            "train.micro_batch_size=4",
        ],
    )
    result = run(job)
    assert result.iterations == 2 and result.model_uri.startswith("models:/lora-ppo/")
    # iteration 0 samples with fresh adapters (B = 0): the policy is its reference, KL exactly 0; after one update
    # the adapters moved and the workers' base with adapters off no longer agrees with them
    kl = [h["ppo/kl"] for h in result.history if "ppo/kl" in h]
    assert kl[0] == 0.0 and kl[-1] != 0.0, kl
    # each publication carries the value model and the policy's adapters, not the policy's weights
    numel = {
        k: _numel(tracking.resolve_model(u))
        for k, u in [("policy", job.policy), ("value", job.reward_helpfulness)]
    }
    sent = [h["ppo/weight_sync_gb"] * 1e9 for h in result.history if "ppo/weight_sync_gb" in h]
    assert sent and all(
        4 * numel["value"] < b < 4 * numel["value"] + 0.05 * 4 * numel["policy"] for b in sent
    ), sent
    assert _plain(tracking.resolve_model(result.model_uri)) == []
    last = home / "runs" / "lora-ppo" / "last"  # the learners' export after the last iteration
    assert _plain(last) == []
    start = load_file(str(tracking.resolve_model("models:/tiny-sft@latest") / "model.safetensors"))
    trained = load_file(str(last / "model.safetensors"))
    assert set(start) == set(trained)
    moved = {n for n in start if not torch_equal(start[n], trained[n])}
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved), sorted(moved)[:5]


def torch_equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    import torch

    return bool(torch.equal(a.float(), b.float()))


def _numel(checkpoint: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        return sum(math.prod(f.get_slice(k).get_shape()) for k in names)
