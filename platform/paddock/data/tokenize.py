"""Tokenisation into input ids and labels, loss masks, and packing into fixed-length sequences.

Labels follow the Hugging Face convention: the label of a position is its own token id (the model shifts),
and ``IGNORE`` (-100) marks tokens that carry no loss. Masks (LLAMA2_SPEC.md):

- pretraining: every token;
- SFT (``train_on="answers"``): the answer tokens and their EOS only, never the ``[INST] ... [/INST]`` prompt;
- GAtt (``train_on="last_answer"``): only the last answer; every earlier turn carries no loss.

Dialogs are rendered in the Llama 2 chat format (``paddock.data.chat``), or, when the tokenizer carries a chat
template (a Llama 3 or other checkpoint's own), by ``tokenizer.apply_chat_template``: the ids are exactly the
template's, and an answer's tokens are those between the template's generation prompt for that turn and the end
of the turn as the template closes it (its end-of-turn token included), so the loss mask follows the template's
own structure.

Packing concatenates examples (each already BOS ... EOS) and cuts the stream into ``seq_len`` windows, as the
paper packs SFT data; the last window is padded with ignored positions. Examples stay apart inside a window:
position ids restart at each example, which the attention kernels read as sequence boundaries (FlashAttention's
varlen path on GPU, a block-diagonal causal mask with SDPA), so no token attends to another example and each
example's loss is what it would be alone. A token at position 0 has nothing to be predicted from: its label is
``IGNORE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from paddock.data.chat import ChatFormatError, Segment, check_turns, segments

IGNORE = -100
PACKED_COLUMNS = ("input_ids", "labels", "position_ids")  # what a packed window holds, each int[seq_len]
TrainOn = Literal["answers", "last_answer", "all"]


class TextEncoder(Protocol):
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def uses_template(tok: object) -> bool:
    """Does the tokenizer carry a chat template (rendering goes through it), or is it Llama 2's format?"""
    return bool(getattr(tok, "chat_template", None))


def special_texts(tok: Any) -> list[str]:
    """The texts that a tokenizer turns into its special tokens (``<|eot_id|>``, ``<|start_header_id|>``, ...)."""
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    return sorted({t.content for t in added.values() if getattr(t, "special", False) and t.content})


def template_messages(
    turns: Sequence[Mapping[str, str]], system: str | None = None, tok: Any = None
) -> list[dict[str, str]]:
    """The dialog as chat-template messages: the system prompt first when there is one. Text that holds one of
    the tokenizer's special tokens is refused, as the Llama 2 format refuses its tags in user text: it would end
    a turn or open one (prompt injection across roles)."""
    check_turns(turns, system)
    specials = special_texts(tok) if tok is not None else []
    for i, text in [(-1, system or ""), *((i, t["content"]) for i, t in enumerate(turns))]:
        found = [s for s in specials if s in text]
        if found:
            where = "the system prompt" if i < 0 else f"turn {i}"
            raise ChatFormatError(f"{where} contains the tokenizer's special token {found[0]!r}")
    head = [{"role": "system", "content": system}] if system is not None and system.strip() else []
    return head + [{"role": t["role"], "content": t["content"]} for t in turns]


def render_template(tok: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    """``tok.apply_chat_template`` as text."""
    return str(
        tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    )


def _encode_templated(
    tok: Any, turns: Sequence[Mapping[str, str]], system: str | None, train_on: TrainOn
) -> Example:
    msgs = template_messages(turns, system, tok)
    ids = _ids(tok, render_template(tok, msgs, generation_prompt=turns[-1]["role"] == "user"))
    if train_on == "all":
        return Example(ids, list(ids))
    first = len(msgs) - len(turns)  # the system message, when there is one
    answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    labels = [IGNORE] * len(ids)
    for i in answers[-1:] if train_on == "last_answer" else answers:
        before = _ids(tok, render_template(tok, msgs[: first + i], True))
        through = _ids(tok, render_template(tok, msgs[: first + i + 1], False))
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError(
                f"the chat template's rendering of turn {i} changes once later turns follow it, or the tokenizer "
                "merges across the end of its generation prompt; cannot mask the loss on that answer"
            )
        labels[len(before) : len(through)] = ids[len(before) : len(through)]
    return Example(ids, labels)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set by ``pack``: restarts at 0 where each example starts

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tok: TextEncoder, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def encode_pretrain(tok: TextEncoder, text: str) -> Example:
    return encode_pretrain_batch(tok, [text])[0]


def encode_pretrain_batch(tok: TextEncoder, texts: list[str]) -> list[Example]:
    """BOS + text + EOS per document, every token trained; one batched call into a fast tokenizer."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    encoded = (
        tok(texts, add_special_tokens=False)["input_ids"] if callable(tok) else [_ids(tok, t) for t in texts]
    )
    return [Example([bos, *ids, eos], [bos, *ids, eos]) for ids in encoded]


def encode_segment(tok: TextEncoder, seg: Segment) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one segment, without BOS; the answer ids end with EOS when finished.

    The whole ``prompt + answer`` text is tokenised at once (as Meta's code does) and split where the prompt
    alone ends. SentencePiece pieces never span ``]`` and the space that follows it, so the split is exact;
    it is checked anyway because a foreign tokenizer might merge across it.
    """
    prompt_ids = _ids(tok, seg.prompt)
    if seg.answer is None:
        return prompt_ids, []
    full = _ids(tok, seg.prompt + seg.answer_text)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"tokenizer merges across the end of the prompt {seg.prompt[-40:]!r}; cannot mask the loss"
        )
    return prompt_ids, [*full[len(prompt_ids) :], tok.eos_token_id]


def encode_dialog(
    tok: TextEncoder,
    turns: Sequence[Mapping[str, str]],
    system: str | None = None,
    train_on: TrainOn = "answers",
) -> Example:
    """Ids and labels of a dialog with the loss mask ``train_on``: in the tokenizer's chat template when it has
    one, else in the Llama 2 chat format. A dialog ending with the user's turn ends with the prompt to answer it."""
    if uses_template(tok):
        return _encode_templated(tok, turns, system, train_on)
    segs = segments(turns, system)
    ids: list[int] = []
    labels: list[int] = []
    finished = [i for i, s in enumerate(segs) if s.answer is not None]
    for i, seg in enumerate(segs):
        prompt_ids, answer_ids = encode_segment(tok, seg)
        head = [tok.bos_token_id, *prompt_ids]
        ids += head + answer_ids
        trained = train_on != "last_answer" or (bool(finished) and i == finished[-1])
        labels += head if train_on == "all" else [IGNORE] * len(head)
        labels += answer_ids if trained else [IGNORE] * len(answer_ids)
    return Example(ids, labels)


def encode_prompt(
    tok: TextEncoder, turns: Sequence[Mapping[str, str]], system: str | None = None
) -> list[int]:
    """Ids to generate from: the dialog up to and including the open ``[INST] ... [/INST]`` of the last turn (with
    a chat template: its rendering with the generation prompt, ``apply_chat_template``'s ids exactly)."""
    if turns and turns[-1].get("role") != "user":
        raise ValueError("a generation prompt must end with a user turn")
    return encode_dialog(tok, turns, system, train_on="answers").input_ids


def pack(
    examples: Iterable[Example], seq_len: int, pad_id: int, *, split_examples: bool = True
) -> Iterator[Example]:
    """Concatenate examples and cut them into windows of exactly ``seq_len`` tokens, with position ids.

    With ``split_examples`` (pretraining text), an example spans windows wherever the cut falls, as in the
    paper's packing; its part in the next window starts again at position 0. Without it (dialogs), an example
    that does not fit in what is left of a window starts the next one, the rest being padded: a multi-turn
    dialog keeps its earlier turns in the window of the answer that depends on them (a Ghost Attention
    example's instruction sits in its first turn; cut off, the answer would teach a style with no instruction
    in sight). Only an example longer than a window spans windows, from the start of one. Padding has ``pad_id``,
    ``IGNORE`` labels and positions of its own; no token is lost.
    """
    buf_ids: list[int] = []
    buf_labels: list[int] = []
    buf_pos: list[int] = []

    def window(ids: list[int], labels: list[int], pos: list[int]) -> Example:
        pad = seq_len - len(ids)
        pos = pos + list(range(pad))
        labels = [IGNORE if p == 0 else y for y, p in zip(labels + [IGNORE] * pad, pos, strict=True)]
        return Example(ids + [pad_id] * pad, labels, pos)

    for ex in examples:
        if not split_examples and buf_ids and len(buf_ids) + len(ex.input_ids) > seq_len:
            yield window(buf_ids, buf_labels, buf_pos)
            buf_ids, buf_labels, buf_pos = [], [], []
        buf_ids += ex.input_ids
        buf_labels += ex.labels
        buf_pos += range(len(ex.input_ids))
        while len(buf_ids) >= seq_len:
            yield window(buf_ids[:seq_len], buf_labels[:seq_len], buf_pos[:seq_len])
            del buf_ids[:seq_len], buf_labels[:seq_len], buf_pos[:seq_len]
            # what is left is the tail of one example: it starts the next window at position 0
            buf_pos = [p - buf_pos[0] for p in buf_pos] if buf_pos else []
    if buf_ids:
        yield window(buf_ids, buf_labels, buf_pos)
