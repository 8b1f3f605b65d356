"""What is registered is what was measured: weight digests, atomic checkpoint writes and the registry's check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paddock.models import (
    build_causal_lm,
    checkpoint_digest,
    load_scalar_model,
    model_digest,
    save_checkpoint,
)
from transformers import LlamaConfig, LlamaForCausalLM


class _Tok:
    """save_checkpoint needs only the tokenizer's save_pretrained."""

    def save_pretrained(self, path: str) -> None:
        (Path(path) / "tokenizer_config.json").write_text("{}")


def test_model_and_checkpoint_digests_agree_for_causal_scalar_and_tied_models(tmp_path):
    causal = build_causal_lm("tiny", vocab_size=300, seed=1)
    tied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    for name, model in (("causal", causal), ("tied", tied)):
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        assert model_digest(model) == checkpoint_digest(tmp_path / name), name
    scalar = load_scalar_model(tmp_path / "causal")
    scalar.save_pretrained(tmp_path / "scalar", safe_serialization=True)
    assert model_digest(scalar) == checkpoint_digest(tmp_path / "scalar")
    # bf16 copies are other weights
    assert model_digest(causal.to(torch.bfloat16)) != model_digest(
        build_causal_lm("tiny", vocab_size=300, seed=1)
    )


def test_one_changed_weight_changes_the_digest():
    a, b = build_causal_lm("tiny", vocab_size=300, seed=1), build_causal_lm("tiny", vocab_size=300, seed=1)
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        b.model.layers[2].mlp.up_proj.weight[3, 7] += 1e-6
    assert model_digest(a) != model_digest(b)
    assert model_digest(a) != model_digest(build_causal_lm("tiny", vocab_size=300, seed=2))


def test_save_checkpoint_replaces_the_directory_whole_and_returns_the_digest(tmp_path):
    out = tmp_path / "best"
    first, second = (
        build_causal_lm("tiny", vocab_size=300, seed=1),
        build_causal_lm("tiny", vocab_size=300, seed=2),
    )
    d1 = save_checkpoint(first, _Tok(), out, {"ITERATION": "0"})
    assert d1 == model_digest(first) == checkpoint_digest(out) and (out / "ITERATION").read_text() == "0"
    d2 = save_checkpoint(second, _Tok(), out, {"ITERATION": "5"})
    assert d2 == checkpoint_digest(out) != d1 and (out / "ITERATION").read_text() == "5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary or old copy left


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "best"
    first = build_causal_lm("tiny", vocab_size=300, seed=1)
    d1 = save_checkpoint(first, _Tok(), out)

    class Broken(_Tok):
        def save_pretrained(self, path: str) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_causal_lm("tiny", vocab_size=300, seed=2), Broken(), out)
    assert checkpoint_digest(out) == d1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_registering_a_tampered_checkpoint_fails_and_registers_nothing(tmp_path, monkeypatch):
    from paddock import tracking

    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = build_causal_lm("tiny", vocab_size=300, seed=1)
    ckpt = tmp_path / "ckpt"
    measured = save_checkpoint(model, _Tok(), ckpt)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # someone's "fix" after the evaluation
    model.save_pretrained(ckpt, safe_serialization=True)

    with (
        pytest.raises(tracking.RegistrationError, match=measured),
        tracking.stage_run("t", "stage", {}) as run,
    ):
        run.log_model(ckpt, "tampered", measured_digest=measured)
    client = tracking.configure()
    assert client.search_model_versions("name='tampered'") == []
    failed = client.search_runs([tracking.experiment_id("t")])[0]
    assert failed.info.status == "FAILED" and "RegistrationError" in failed.data.tags["paddock.error"]

    # The untampered weights register, tagged with their digest; an evaluation of other weights is refused.
    save_checkpoint(build_causal_lm("tiny", vocab_size=300, seed=1), _Tok(), ckpt)
    with tracking.stage_run("t", "stage", {}) as run:
        uri = run.log_model(ckpt, "honest", measured_digest=measured)
    version = uri.rsplit("/", 1)[1]
    assert tracking.version_digest("honest", version) == measured
    with pytest.raises(tracking.RegistrationError, match="not logged"):
        tracking.log_version_metrics("honest", version, {"eval/reward_combined": 0.9}, digest="0" * 16)
    assert "eval/reward_combined" not in tracking.version_metrics("honest", version)
    tracking.log_version_metrics("honest", version, {"eval/reward_combined": 0.9}, digest=measured)
    assert tracking.version_metrics("honest", version)["eval/reward_combined"] == 0.9
