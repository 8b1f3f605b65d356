"""A checkpoint's own tokenizer and chat template: Llama-3-style ids and rendering, byte for byte, and loss masks
that follow the template's structure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from paddock.data.pairs import encode_answer
from paddock.data.tokenize import IGNORE, encode_dialog, encode_prompt, uses_template
from paddock.models import PAD_ID, right_padded_mask
from paddock.tokenizer import LLAMA3_CHAT_TEMPLATE, TokenizerError, load_tokenizer

SYSTEM = "Answer in one word."
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris!"},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima."},
]


@pytest.fixture(scope="module")
def l3(llama3_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(llama3_tokenizer_dir)


def _ids(out) -> list[int]:  # type: ignore[no-untyped-def]
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_the_llama3_style_tokenizer_has_foreign_ids(l3, tok) -> None:  # type: ignore[no-untyped-def]
    assert uses_template(l3) and not uses_template(tok)
    assert l3.convert_ids_to_tokens([PAD_ID]) == ["!"]  # id 0 is a real token here
    assert (l3.bos_token, l3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert l3.bos_token_id > 900 and l3.eos_token_id == l3.bos_token_id + 9  # after the vocabulary, as Meta's
    assert l3.chat_template == LLAMA3_CHAT_TEMPLATE


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("upto", [1, 3])
def test_prompts_render_exactly_as_apply_chat_template(l3, system, upto) -> None:  # type: ignore[no-untyped-def]
    turns = TURNS[:upto]
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    ids = encode_prompt(l3, turns, system)
    text = l3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == _ids(l3.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    assert l3.decode(ids) == text  # byte for byte
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_loss_mask_follows_the_templates_turns(l3) -> None:  # type: ignore[no-untyped-def]
    ex = encode_dialog(l3, TURNS, SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}, *TURNS]
    assert ex.input_ids == _ids(l3.apply_chat_template(messages, tokenize=True))
    trained = [i for i, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE]
    # each answer and the end-of-turn token the template closes it with; no header, no user text
    assert l3.decode(trained) == "Paris!<|eot_id|>Lima.<|eot_id|>"
    assert all(y in (IGNORE, i) for i, y in zip(ex.input_ids, ex.labels, strict=True))
    last = encode_dialog(l3, TURNS, SYSTEM, train_on="last_answer")
    assert l3.decode([y for y in last.labels if y != IGNORE]) == "Lima.<|eot_id|>"
    everything = encode_dialog(l3, TURNS, SYSTEM, train_on="all")
    assert everything.labels == everything.input_ids
    # a reward model reads prompt + answer ending with the stop token
    seq = encode_answer(l3, TURNS[:1], "Paris!", seq_len=512)
    assert seq[-1] == l3.eos_token_id and l3.decode(seq).endswith(
        "assistant<|end_header_id|>\n\nParis!<|eot_id|>"
    )
    assert encode_answer(l3, TURNS[:1], "", seq_len=512)[-1] == l3.eos_token_id


def test_paddocks_own_tokenizer_keeps_the_llama2_format(tok) -> None:  # type: ignore[no-untyped-def]
    ids = encode_prompt(tok, TURNS[:1], SYSTEM)
    assert (
        tok.decode(ids)
        == "<s> [INST] <<SYS>>\nAnswer in one word.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
    )


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked(l3) -> None:  # type: ignore[no-untyped-def]
    # earlier answers dropped once a later turn follows (as some reasoning models' templates do)
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[gone]"
        "{% else %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
    )
    l3.chat_template, original = template, l3.chat_template
    try:
        with pytest.raises(ValueError, match="changes once later turns follow"):
            encode_dialog(l3, TURNS)
    finally:
        l3.chat_template = original


def test_special_ids_come_from_the_tokenizer_and_unusable_ones_are_refused(llama3_tokenizer_dir, tmp_path):  # type: ignore[no-untyped-def]
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama3_tokenizer_dir, bad)
    config = json.loads((bad / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="has no EOS token"):
        load_tokenizer(bad)
    config["eos_token"] = "!"  # id 0, the padding value
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="eos_token_id is 0"):
        load_tokenizer(bad)


def test_attention_masks_come_from_lengths_not_from_the_pad_value() -> None:
    # id 0 inside a sequence is a real token for a Llama-3-style vocabulary: it stays attended
    ids = torch.tensor([[5, 0, 7, 9, 0, 0], [0, 4, 9, 0, 0, 0]])
    assert right_padded_mask(ids).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_the_tokenizer_job_trains_a_llama3_style_tokenizer(world_dir, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from paddock import tokenizer
    from paddock.config import TokenizerJob, load_config

    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    job = load_config(
        TokenizerJob,
        None,
        [
            "tokenizer.style=llama3",
            f"tokenizer.corpus={world_dir}/pretrain/train.parquet",
            "tokenizer.vocab_size=800",
            "tokenizer.out_dir=tok3",
        ],
    )
    out = tokenizer.run(job)
    tok = load_tokenizer(out)
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE and tok.eos_token == "<|eot_id|>" and len(tok) <= 800
