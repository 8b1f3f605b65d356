"""Preference pairs for reward models: the paper's data mixes and tokenisation of (prompt, answer) pairs.

Mixes (Llama 2, section 3.2.2): the helpfulness RM sees all helpfulness data plus an equal amount drawn from
safety data; the safety RM sees all safety data mixed 90/10 with helpfulness data. ``mix_ratio`` is the
number of other-kind pairs per own-kind pair (1.0 and 1/9 by default).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from paddock.data.schemas import RATINGS, SAFETY_BINS
from paddock.data.tokenize import TextEncoder, encode_dialog

DEFAULT_MIX = {"helpfulness": 1.0, "safety": 1 / 9}


def reward_mix(
    rows: Sequence[Mapping[str, Any]], kind: str, mix_ratio: float | None, seed: int
) -> list[dict[str, Any]]:
    """All pairs of ``kind`` plus a seeded sample of the other kind, shuffled together."""
    ratio = DEFAULT_MIX[kind] if mix_ratio is None else mix_ratio
    own = [dict(r) for r in rows if r["kind"] == kind]
    other = [dict(r) for r in rows if r["kind"] != kind]
    rng = random.Random(seed)
    picked = rng.sample(other, min(len(other), round(len(own) * ratio)))
    mixed = own + picked
    rng.shuffle(mixed)
    return mixed


def encode_answer(
    tok: TextEncoder, prompt: Sequence[Mapping[str, str]], answer: str, seq_len: int
) -> list[int]:
    """Ids of the prompt followed by the finished answer, keeping the last ``seq_len`` tokens.

    The reward is read at the last token, so a too-long dialog is cut from the left, never at the answer's end.
    An empty answer (a policy that stopped at once) is the prompt followed by EOS: what the policy produced.
    """
    if not answer.strip():
        ids = [*encode_dialog(tok, prompt).input_ids, tok.eos_token_id]
        return ids[-seq_len:]
    ids = encode_dialog(tok, [*prompt, {"role": "assistant", "content": answer}]).input_ids
    return ids[-seq_len:]


def rating_index(rating: str) -> int:
    return RATINGS.index(rating)


def bin_index(safety_bin: str | None) -> int:
    return -1 if safety_bin is None else SAFETY_BINS.index(safety_bin)
