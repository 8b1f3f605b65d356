"""LoRA adapters: the merged export is a plain checkpoint with base + adapter's outputs, and bad settings fail in
the config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paddock import lora
from paddock.config import ConfigError, LoraSettings, SFTJob, load_config
from paddock.models import build_causal_lm, load_causal_lm, load_scalar_model
from paddock.tokenizer import tokenizer_files
from paddock.train.engine import export_hf

pytest.importorskip("peft")


def _perturbed(model: torch.nn.Module) -> None:
    """LoRA's B starts at zero (the adapted model equals the base); give the adapters (and a reward model's trained
    head, which peft keeps beside the untrained original) values to carry."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def base(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from paddock.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("base")
    build_causal_lm("tiny", vocab_size=len(load_tokenizer(tokenizer_dir)), seed=0).save_pretrained(
        out, safe_serialization=True
    )
    return out


@pytest.mark.parametrize("scalar", [False, True])
def test_the_merged_export_gives_base_plus_adapter_outputs(base: Path, tokenizer_dir: Path, tmp_path, scalar):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    plain = load_scalar_model(base) if scalar else load_causal_lm(base)
    model = lora.wrap(plain, LoraSettings(r=4, alpha=8, dropout=0.0), scalar=scalar).eval()
    _perturbed(model)
    trainable, total = lora.parameter_counts(model)
    assert 0 < trainable < 0.2 * total
    ids = torch.randint(3, 900, (2, 24))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        model.disable_adapter_layers()
        without = model(input_ids=ids).logits
        model.enable_adapter_layers()
    assert (adapted - without).abs().max() > 1e-3  # the adapters change the outputs
    export_hf(model, tmp_path / "out", tokenizer_files(tokenizer_dir), rank=0)
    saved = (tmp_path / "out" / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert saved and not [k for k in keys if "lora" in k or "base_layer" in k or "modules_to_save" in k]
    reloaded = (load_scalar_model if scalar else load_causal_lm)(tmp_path / "out").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert torch.allclose(again, adapted, atol=1e-5, rtol=0)


def test_lora_settings_are_checked_before_any_worker(tmp_path: Path) -> None:
    cfg = Path(__file__).resolve().parents[2] / "jobs/configs/tiny/sft.yaml"
    with pytest.raises(ConfigError, match="adapters train on a starting checkpoint"):
        load_config(SFTJob, cfg, ["model.init_from=null", "model.lora.r=8"])
    assert load_config(SFTJob, cfg, ["model.lora.r=8", "train.zero_stage=3"]).train.zero_stage == 3
    job = load_config(SFTJob, cfg, ["model.lora.r=8"])
    assert job.model.lora is not None and job.model.lora.target_modules[0] == "q_proj"


def test_a_lora_policy_publishes_the_merged_weights_without_changing_itself(base: Path) -> None:
    """What PPO's learners stream to the rollout workers: the plain model's state, adapters folded in, through the
    same buckets a full publication uses; loaded into a plain model it gives the adapted policy's logits."""
    from paddock.ppo import sync

    plain = load_causal_lm(base)
    names = [n for n, _ in plain.state_dict().items()]
    torch.manual_seed(0)
    model = lora.wrap(load_causal_lm(base), LoraSettings(r=4, alpha=8, dropout=0.0), scalar=False).eval()
    _perturbed(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    shapes = lora.merged_shapes(model)
    assert [n for n, _ in shapes] == names  # the plain model's names, in its order
    lay = sync.layout(shapes, 64 * 1024, torch.float32)
    flats = [
        f.clone()
        for f in sync.flat_buckets(lay, lora.merged_state(model), torch.float32, torch.device("cpu"))
    ]
    sync.check_layout(plain, lay)
    loaded = sync.load_into(plain.eval(), sync.unflatten(lay, flats))
    assert loaded == sum(torch.Size(shape).numel() for _, shape in shapes) * 4  # every fp32 byte
    ids = torch.randint(3, 900, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
    # the training copy is untouched: base weights and adapters as they were
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    # a model without adapters publishes its own state
    assert [n for n, _ in lora.merged_state(plain)] == names


def test_lora_ppo_plans_no_reference_scorer_on_the_transformers_engine() -> None:
    """The rollout workers hold the start checkpoint under the adapters and give the reference log-probs: the
    plan has no reference scorer (behind vLLM, whose workers hold plain weights, it keeps one). ZeRO-3 is fine."""
    from paddock.config import PPOJob
    from paddock.plan import ModelShape, job_roles

    def roles(job: PPOJob) -> list[str]:
        return [r.role for r in job_roles(job, lambda ref, scalar: ModelShape.named("7b", scalar))]

    repo = Path(__file__).resolve().parents[2]
    job = load_config(PPOJob, repo / "jobs/configs/tiny/ppo.yaml", ["lora.r=8", "train.zero_stage=3"])
    assert job.lora is not None and job.lora.r == 8
    assert "reference scorer" not in roles(job) and "rollout worker" in roles(job)
    full = load_config(PPOJob, repo / "jobs/configs/tiny/ppo.yaml", ["ppo.placement=split"])
    assert "reference scorer" in roles(full)


def test_a_lora_policy_publishes_its_adapters_alone_to_workers_holding_the_same_base(
    base: Path, tmp_path: Path, tokenizer_dir: Path
) -> None:
    """PPO's learners stream only the adapters to rollout workers that hold the start checkpoint under fresh
    adapters: the worker then gives the policy's logits exactly, the start policy's with its adapters off (the
    reference, with no second copy), saves the merged plain model, and digests it as the checkpoint it writes."""
    from paddock.models import checkpoint_digest, save_checkpoint
    from paddock.ppo import sync
    from paddock.tokenizer import load_tokenizer
    from paddock.train.engine import gathered_state

    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    learner = lora.wrap(load_causal_lm(base), settings, scalar=False).eval()
    _perturbed(learner)
    torch.manual_seed(5)  # the worker's own A draws: overwritten by the publication
    worker = lora.wrap(load_causal_lm(base), settings, scalar=False).eval()
    shapes = lora.adapter_shapes(learner)
    lay = sync.layout(shapes, 16 * 1024, torch.float32)
    with pytest.raises(KeyError, match="miss"):
        sync.check_layout(worker, lay)  # the whole model is expected unless told what publications carry
    sync.check_layout(worker, lay, lora.is_adapter)
    flats = sync.flat_buckets(
        lay, gathered_state(learner, 0, keep=lora.is_adapter), torch.float32, torch.device("cpu")
    )
    sent = sync.load_into(worker, sync.unflatten(lay, flats))
    total = sum(t.numel() for t in load_causal_lm(base).state_dict().values()) * 4
    assert sent == sync.nbytes(lay, torch.float32) and 0 < sent < 0.1 * total  # the adapters' bytes only
    ids = torch.randint(3, 900, (2, 24))
    start = load_causal_lm(base).eval()
    with torch.no_grad():
        assert torch.equal(worker(input_ids=ids).logits, learner(input_ids=ids).logits)
        with worker.disable_adapter():
            assert torch.equal(worker(input_ids=ids).logits, start(input_ids=ids).logits)
        assert not torch.allclose(worker(input_ids=ids).logits, start(input_ids=ids).logits, atol=1e-3)
    digest = save_checkpoint(worker, load_tokenizer(tokenizer_dir), tmp_path / "saved")
    assert digest == lora.merged_digest(worker) == checkpoint_digest(tmp_path / "saved")
    saved = load_causal_lm(tmp_path / "saved").eval()  # a plain checkpoint
    with torch.no_grad():
        torch.testing.assert_close(
            saved(input_ids=ids).logits, learner(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
