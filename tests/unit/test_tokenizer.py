import shutil
from pathlib import Path

import pytest
from paddock.tokenizer import BOS_ID, EOS_ID, UNK_ID, TokenizerError, load_tokenizer


def test_special_ids_match_llama(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.pad_token_id is None
    assert 300 < len(tok) <= 1000


def test_numbers_are_split_into_digits(tok):
    pieces = tok.convert_ids_to_tokens(tok.encode("12345 and 2023", add_special_tokens=False))
    digits = [p.lstrip("▁") for p in pieces if p.lstrip("▁").isdigit()]
    assert digits == list("12345") + list("2023")
    assert all(len(d) == 1 for d in digits)


def test_unknown_text_falls_back_to_bytes_and_round_trips(tok):
    text = "Zürich 日本 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert UNK_ID not in ids
    assert any(p.startswith("<0x") for p in pieces), pieces
    # 日 is three UTF-8 bytes: E6 97 A5
    assert pieces[pieces.index("<0xE6>") : pieces.index("<0xE6>") + 3] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert tok.decode(ids) == text


def test_chat_tags_and_newlines_are_plain_text(tok):
    text = "[INST] <<SYS>>\nhi\n<</SYS>>\n\nq [/INST]"
    ids = tok.encode(text, add_special_tokens=False)
    assert BOS_ID not in ids and EOS_ID not in ids
    assert tok.decode(ids) == text


def test_a_raw_sentencepiece_model_loads_through_the_same_code(tokenizer_dir: Path, tmp_path: Path, tok):
    # A user's Llama 2 checkpoint from Meta ships only tokenizer.model.
    shutil.copy(tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    raw = load_tokenizer(tmp_path)
    text = "The capital of France is Paris. 47"
    assert raw.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert raw.encode(text)[0] == BOS_ID


def test_a_tokenizer_travels_as_bytes_and_loads_the_same_elsewhere(tokenizer_dir: Path, tmp_path: Path, tok):
    # What a supervised stage sends its Ray Train workers, which may be on nodes that cannot read tokenizer_dir
    import json

    from paddock.tokenizer import tokenizer_files, write_tokenizer_files

    files = json.loads(json.dumps(tokenizer_files(tokenizer_dir)))  # as the spec crosses the process boundary
    assert "tokenizer.json" in files and all(Path(n).name == n for n in files)
    write_tokenizer_files(files, tmp_path / "there")
    there = load_tokenizer(tmp_path / "there")
    text = "[INST] What is 12 + 30? [/INST] 42"
    assert there.encode(text) == tok.encode(text) and len(there) == len(tok)
    assert (there.bos_token_id, there.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    with pytest.raises(TokenizerError, match="not plain file names"):
        write_tokenizer_files({"../escape.json": files["tokenizer.json"]}, tmp_path / "elsewhere")
    assert not (tmp_path / "escape.json").exists()


def test_missing_or_empty_directory_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match=r"neither tokenizer\.json nor tokenizer\.model"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_naming_both(tok, tmp_path):
    from paddock.models import build_causal_lm
    from paddock.tokenizer import TokenizerError, check_matches

    build_causal_lm("tiny", vocab_size=len(tok)).save_pretrained(tmp_path / "fits", safe_serialization=True)
    check_matches(tok, tmp_path / "fits")
    other = build_causal_lm("tiny", vocab_size=len(tok) + 24)
    other.config.eos_token_id = 7
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(TokenizerError) as err:
        check_matches(tok, tmp_path / "other")
    message = str(err.value)
    assert f"vocabulary {len(tok)} tokens, the model's {len(tok) + 24}" in message
    assert "eos_token_id 2, the model's 7" in message and "bos_token_id" not in message


@pytest.mark.parametrize("size", ["7b", "70b"])
def test_the_llama2_tokenizer_configs_import_the_checkpoints_own(size, tokenizer_dir, tmp_path, monkeypatch):
    """The shipped 7B/70B tokenizer stage copies the starting checkpoint's tokenizer.model (a tiny one here, in
    the same layout as Meta's Hugging Face checkpoints) instead of training a new vocabulary."""
    import shutil

    from paddock.config import TokenizerJob, load_config
    from paddock.tokenizer import TokenizerError, load_tokenizer, run

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    job = load_config(TokenizerJob, repo / f"jobs/configs/llama2-{size}/tokenizer.yaml")
    assert job.tokenizer.existing == f"checkpoints/llama-2-{size}-hf"
    with pytest.raises(
        TokenizerError, match=rf"tokenizer\.existing: {tmp_path}/checkpoints/llama-2-{size}-hf does"
    ):
        run(job)
    checkpoint = tmp_path / "checkpoints" / f"llama-2-{size}-hf"
    checkpoint.mkdir(parents=True)
    shutil.copy(Path(tokenizer_dir) / "tokenizer.model", checkpoint / "tokenizer.model")
    out = run(job)
    assert (out / "tokenizer.model").read_bytes() == (checkpoint / "tokenizer.model").read_bytes()
    text = "The capital of France is Paris."
    assert load_tokenizer(out).encode(text) == load_tokenizer(tokenizer_dir).encode(text)


def test_dialogs_join_the_corpus_and_their_words_stay_whole(world_dir, tmp_path, monkeypatch):
    """The tiny world's pretraining text is facts; trained on it alone, a tokenizer spells the chat data's
    refusals in pieces ("I won't help with" as "▁I ▁w on ' t ▁he lp ▁w ith"), which a sampled answer can mix up.
    ``tokenizer.dialogs`` adds the turns of dialog files to the corpus."""
    from paddock.config import TokenizerJob, load_config
    from paddock.data.validate import DatasetError
    from paddock.tokenizer import run

    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    refusal = "I won't help with that request."
    pieces = {}
    for out, extra in (("facts", []), ("chat", [f"tokenizer.dialogs=[{world_dir}/sft/train.parquet]"])):
        sets = [f"tokenizer.corpus={world_dir}/pretrain/train.parquet", "tokenizer.vocab_size=1000"]
        job = load_config(TokenizerJob, None, [*sets, f"tokenizer.out_dir={out}", *extra])
        tok = load_tokenizer(run(job))
        pieces[out] = tok.convert_ids_to_tokens(tok.encode(refusal, add_special_tokens=False))
        assert tok.decode(tok.encode(refusal, add_special_tokens=False)) == refusal
    assert "▁with" not in pieces["facts"] and "▁help" not in pieces["facts"]
    assert {"▁help", "▁with", "▁that"} <= set(pieces["chat"])
    assert len(pieces["chat"]) < len(pieces["facts"])
    missing = [*sets, "tokenizer.out_dir=none", f"tokenizer.dialogs=[{tmp_path}/nope.parquet]"]
    with pytest.raises(DatasetError, match=r"nope\.parquet: no such dataset file"):
        run(load_config(TokenizerJob, None, missing))
