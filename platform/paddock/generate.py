"""Greedy or sampled chat generation with a local causal LM, in the Llama 2 chat format.

The single-process path that tests, evaluation and the CPU rollout workers share. Sampling defaults are
the paper's (temperature 0.6, top_p 0.9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from paddock.data.tokenize import encode_prompt
from paddock.rollout.core import sampling_kwargs


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finished: bool  # ended with EOS within max_new_tokens


@torch.no_grad()
def chat(
    model,
    tok,
    turns: Sequence[Mapping[str, str]],
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 0.9,
    seed: int | None = None,
) -> Generation:  # type: ignore[no-untyped-def]
    """Answer the last user turn. ``temperature == 0`` is greedy decoding."""
    ids = torch.tensor([encode_prompt(tok, turns, system)])
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        **sampling_kwargs(temperature, top_p),
    )
    new = out[0, ids.shape[1] :].tolist()
    finished = tok.eos_token_id in new
    if finished:
        new = new[: new.index(tok.eos_token_id)]
    return Generation(tok.decode(new, skip_special_tokens=True).strip(), new, finished)
