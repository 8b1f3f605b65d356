"""SentencePiece BPE tokenizer training and loading, with Llama 2's settings.

Llama 2 (paper, section 2.1): BPE via SentencePiece, every number split into single digits, unknown UTF-8
falls back to bytes, vocabulary 32000; ids unk 0, BOS 1, EOS 2 and no pad token. The trainer options below
mirror the ones stored in Meta's released ``tokenizer.model`` (identity normalisation, no whitespace
collapsing, a dummy prefix), so a model trained here and a real Llama 2 tokenizer load through the same code.

A trained tokenizer is saved as a Hugging Face tokenizer directory (``tokenizer.json`` and its config) plus
the raw ``tokenizer.model``, so every checkpoint can carry it.
"""

from __future__ import annotations

import base64
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from paddock.config import TokenizerJob

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, incomplete or not Llama-compatible."""


def sample_lines(texts: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """Non-empty lines of ``texts``, reservoir-sampled down to ``max_lines``."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(out) < max_lines:
                out.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    out[j] = line
    return out


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, max_lines: int = 2_000_000, seed: int = 0
) -> Path:
    """Train a Llama-style BPE tokenizer on ``texts`` and save it to ``out_dir``. Returns ``out_dir``.

    The vocabulary may come out smaller than ``vocab_size`` when the corpus is too small to fill it;
    ``len(load_tokenizer(out_dir))`` is the real size.
    """
    import sentencepiece as spm

    lines = sample_lines(texts, max_lines, seed)
    if not lines:
        raise TokenizerError("cannot train a tokenizer on an empty corpus")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            split_digits=True,
            byte_fallback=True,
            character_coverage=0.99995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
        shutil.copy(f"{prefix}.model", out / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(
        str(out), add_bos_token=True, add_eos_token=False, local_files_only=True
    )
    tok.save_pretrained(str(out))
    return out


# Llama 3's tokenizer, as Meta released it (Meta-Llama-3.1-8B-Instruct, tokenizer.json and tokenizer_config.json):
# byte-level BPE after this split, special tokens after the learned vocabulary in this order, EOS <|eot_id|>, no
# pad token, and this chat template (Meta-Llama-3-8B-Instruct's).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_llama3_style_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer in the shape of Llama 3's (split, special tokens, EOS, chat template), trained
    on ``texts`` and saved to ``out_dir``: for checking that paddock reads a foreign checkpoint's tokenizer, whose
    ids differ from Llama 2's (id 0 is a real token, BOS and EOS sit after the vocabulary) and which renders
    dialogs with its own template. Returns ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(LLAMA3_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    raw.add_special_tokens(list(LLAMA3_SPECIALS))
    bos = raw.token_to_id("<|begin_of_text|>")
    raw.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory: one paddock trained, or a checkpoint's own (Llama 2's SentencePiece
    ``tokenizer.model``, or a ``tokenizer.json`` with any special ids and, for instance Llama 3's, a chat template).

    Only local directories are accepted (nothing is fetched from a hub), and remote code is never run.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise TokenizerError(
            f"tokenizer directory {str(p)!r} does not exist; run jobs/tokenizer.py or fix the path"
        )
    if (p / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    elif (p / "tokenizer.model").is_file():
        tok = LlamaTokenizer.from_pretrained(
            str(p), add_bos_token=True, add_eos_token=False, local_files_only=True
        )
    else:
        raise TokenizerError(f"{p} holds neither tokenizer.json nor tokenizer.model")
    check_special_ids(tok, p)
    return tok


def tokenizer_files(path: str | Path) -> dict[str, str]:
    """The tokenizer of directory ``path`` as its files (name -> base64 of the bytes), as ``save_pretrained``
    writes them: what a process on another node, which cannot read ``path``, needs to save it beside a model."""
    with tempfile.TemporaryDirectory() as tmp:
        load_tokenizer(path).save_pretrained(tmp)
        return {
            f.name: base64.b64encode(f.read_bytes()).decode()
            for f in sorted(Path(tmp).iterdir())
            if f.is_file()
        }


def write_tokenizer_files(files: Mapping[str, str], out_dir: str | Path) -> None:
    """Write ``tokenizer_files``' output into ``out_dir`` (created when missing)."""
    bad = [name for name in files if Path(name).name != name or name in ("", ".", "..")]
    if bad:
        raise TokenizerError(f"tokenizer file names {bad} are not plain file names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(base64.b64decode(data))


def check_special_ids(tok: PreTrainedTokenizerBase, where: str | Path) -> None:
    """The special ids paddock reads from a tokenizer (never from constants) must be usable: an EOS that ends
    every answer, a BOS unless a chat template renders the dialogs, and neither equal to the padding value."""
    from paddock.models import PAD_ID

    if tok.eos_token_id is None:
        raise TokenizerError(
            f"{where}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json"
        )
    if tok.bos_token_id is None and not tok.chat_template:
        raise TokenizerError(
            f"{where}: the tokenizer has neither a BOS token nor a chat template; the Llama 2 chat format starts "
            "every exchange with BOS: set bos_token, or a chat_template, in its tokenizer_config.json"
        )
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(tok, name) == PAD_ID:
            raise TokenizerError(
                f"{where}: {name} is {PAD_ID}, the id paddock pads with (after the last EOS, never read); "
                "a tokenizer whose BOS or EOS is id 0 is not supported"
            )


def check_matches(tok: PreTrainedTokenizerBase, model_dir: str | Path) -> None:
    """Refuse a tokenizer that does not fit a checkpoint: another vocabulary size or other BOS / EOS ids would
    train or sample the model on the wrong ids, silently. Raises ``TokenizerError`` naming both sides."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    problems = []
    if len(tok) != config.get("vocab_size"):
        problems.append(f"vocabulary {len(tok)} tokens, the model's {config.get('vocab_size')}")
    for name in ("bos_token_id", "eos_token_id"):
        theirs = config.get(name)
        if theirs is not None and getattr(tok, name) != theirs:
            problems.append(f"{name} {getattr(tok, name)}, the model's {theirs}")
    if problems:
        raise TokenizerError(
            f"the tokenizer {tok.name_or_path} does not match the model {model_dir}: {'; '.join(problems)}. "
            "Use the checkpoint's own tokenizer (its tokenizer.model or tokenizer.json: "
            "tokenizer.existing in jobs/tokenizer.py's config) or the one the model was trained with"
        )


def dialog_texts(path: Path) -> list[str]:
    """The text of every turn and system prompt of a dialogs Parquet file, validated as a fine-tuning stage
    reads it (bad rows quarantined under ``runs/tokenizer/quarantine``)."""
    from paddock.config import paddock_home
    from paddock.data.validate import load_dataset

    report = load_dataset(
        path, "dialogs", quarantine_dir=paddock_home() / "runs" / "tokenizer" / "quarantine"
    )
    out: list[str] = []
    for row in report.good.to_pylist():
        out += [row["system"]] if row.get("system") else []
        out += [t["content"] for t in row["turns"]]
    return out


def run(job: TokenizerJob) -> Path:
    """Stage entry point: train a tokenizer on the pretraining corpus, or import an existing one."""
    import pyarrow.parquet as pq

    from paddock.config import resolve_path

    cfg = job.tokenizer
    out = resolve_path(cfg.out_dir)
    if cfg.existing is not None:
        src = resolve_path(cfg.existing)
        if not src.is_dir():
            raise TokenizerError(
                f"tokenizer.existing: {src} does not exist; put the starting checkpoint (with its tokenizer.model) "
                "there, or drop tokenizer.existing to train a tokenizer on tokenizer.corpus"
            )
        tok = load_tokenizer(src)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
        if (src / "tokenizer.model").is_file():
            shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
        print(f"imported tokenizer from {src} ({len(tok)} tokens) to {out}")
        return out
    corpus = resolve_path(cfg.corpus)
    if not corpus.is_file():
        raise FileNotFoundError(f"tokenizer.corpus: {corpus} does not exist; run jobs/world.py first")
    texts = pq.read_table(corpus, columns=["text"])["text"].to_pylist()
    documents = len(texts)
    for path in cfg.dialogs:
        texts += dialog_texts(resolve_path(path))
    print(
        f"training a {cfg.style}-style BPE tokenizer (vocab {cfg.vocab_size}) on {documents} documents from "
        f"{corpus}"
        + (f" and {len(texts) - documents} turns of {', '.join(cfg.dialogs)}" if cfg.dialogs else ""),
        flush=True,
    )
    if cfg.style == "llama3":
        train_llama3_style_tokenizer(sample_lines(texts, cfg.max_sentences, job.seed), out, cfg.vocab_size)
    else:
        train_tokenizer(texts, out, cfg.vocab_size, cfg.max_sentences, seed=job.seed)
    tok = load_tokenizer(out)
    sample = "The capital of France is Paris. 12 + 35 = 47."
    n_chars = sum(len(t) for t in texts[:200])
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts[:200])
    print(
        f"tokenizer written to {out}: {len(tok)} tokens, {n_chars / max(n_tokens, 1):.2f} characters per token"
    )
    print(f"  {sample!r} -> {tok.convert_ids_to_tokens(tok.encode(sample, add_special_tokens=False))}")
    return out
