"""LoRA adapters: the merged export is a plain checkpoint with base + adapter's outputs, and bad settings fail in
the config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paddock import lora
from paddock.config import ConfigError, LoraSettings, SFTJob, load_config
from paddock.models import build_causal_lm, load_causal_lm, load_scalar_model
from paddock.train.engine import export_hf

pytest.importorskip("peft")


def _perturbed(model: torch.nn.Module) -> None:
    """LoRA's B starts at zero (the adapted model equals the base); give the adapters values to carry."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
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
    export_hf(model, tmp_path / "out", str(tokenizer_dir), rank=0)
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
    with pytest.raises(ConfigError, match="zero_stage 3: not supported yet"):
        load_config(SFTJob, cfg, ["model.lora.r=8", "train.zero_stage=3"])
    job = load_config(SFTJob, cfg, ["model.lora.r=8"])
    assert job.model.lora is not None and job.model.lora.target_modules[0] == "q_proj"
