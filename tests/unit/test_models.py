import json
from pathlib import Path

import pytest
import torch
from paddock.models import (
    PAD_ID,
    SHAPES,
    ModelLoadError,
    build_causal_lm,
    count_parameters,
    load_causal_lm,
    load_scalar_model,
)

# LLAMA2_SPEC.md's table: (layers, dim, heads, kv heads, ffn, parameters)
PAPER = {
    "7b": (32, 4096, 32, 32, 11008, 6.74e9),
    "13b": (40, 5120, 40, 40, 13824, 13.0e9),
    "34b": (48, 8192, 64, 8, 22016, 33.7e9),
    "70b": (80, 8192, 64, 8, 28672, 69.0e9),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_released_shapes_match_the_paper(name):
    layers, dim, heads, kv, ffn, params = PAPER[name]
    s = SHAPES[name]
    assert (s.layers, s.dim, s.heads, s.kv_heads, s.ffn_dim) == (layers, dim, heads, kv, ffn)
    assert s.head_dim == 128 and s.vocab_size == 32000 and s.max_seq_len == 4096
    n = count_parameters(name)  # on the meta device: nothing is allocated
    assert abs(n - params) / params < 0.01, f"{name}: {n / 1e9:.2f}B vs {params / 1e9}B"


def test_cpu_shapes_are_the_advertised_sizes():
    assert 1e6 <= count_parameters("tiny") <= 5e6
    assert 20e6 <= count_parameters("small") <= 30e6
    assert 1.0e9 <= count_parameters("1b") <= 1.3e9


def test_build_save_load_round_trip_and_reward_head(tmp_path: Path):
    model = build_causal_lm("tiny", vocab_size=300, max_seq_len=64, seed=3)
    cfg = model.config
    assert cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings is False and cfg.hidden_act == "silu"
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "model.safetensors").is_file()
    loaded = load_causal_lm(tmp_path / "lm")
    x = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    # Same seed, same weights.
    again = build_causal_lm("tiny", vocab_size=300, max_seq_len=64, seed=3)
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)

    rm = load_scalar_model(tmp_path / "lm")
    torch.testing.assert_close(rm.model.embed_tokens.weight, model.model.embed_tokens.weight)
    batch = torch.tensor([[1, 5, 9, 2], [1, 7, PAD_ID, PAD_ID]])
    scores = rm(input_ids=batch, attention_mask=(batch != PAD_ID).long()).logits
    assert scores.shape == (2, 1)
    # The score is read at the last real token: padding more does not change it.
    longer = torch.tensor([[1, 7, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    torch.testing.assert_close(
        rm(input_ids=longer, attention_mask=(longer != PAD_ID).long()).logits[0], scores[1]
    )


def test_a_new_model_carries_the_tokenizer_special_ids(tmp_path: Path):
    # A model pretrained from scratch for a tokenizer whose BOS/EOS are not Llama 2's 1/2 (Llama 3's sit after
    # the vocabulary) writes the tokenizer's ids into its config, which every later stage checks against.
    model = build_causal_lm("tiny", vocab_size=300, max_seq_len=64, bos_token_id=297, eos_token_id=299)
    model.save_pretrained(tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (297, 299)
    assert build_causal_lm("tiny", vocab_size=300).config.eos_token_id == 2  # paddock's own tokenizers


@pytest.mark.reliability
def test_only_safetensors_checkpoints_load(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "pytorch_model.bin").write_bytes(b"not allowed")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights \(found \['pytorch_model.bin'\]\)"):
        load_causal_lm(ckpt)


@pytest.mark.reliability
def test_missing_shard_is_named(tmp_path: Path):
    model = build_causal_lm("tiny", vocab_size=300, max_seq_len=64)
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"missing weight shards listed in its index: {shard}"):
        load_causal_lm(tmp_path)
