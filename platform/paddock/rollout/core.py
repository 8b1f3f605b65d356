"""Sampling and scoring on one process: the torch core that the rollout and scorer actors wrap.

Generation uses transformers' ``generate`` on left-padded prompts in the Llama 2 chat format. Behaviour
log-probs are recomputed with one forward pass over prompt + response at the sampling temperature, so they
are exactly what a learner holding the same weights computes (the top-p truncation shapes which tokens are
drawn, not their log-probs), and PPO's first ratio is 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from paddock.data.pairs import encode_answer
from paddock.data.tokenize import encode_prompt
from paddock.models import PAD_ID

Turns = Sequence[Mapping[str, str]]


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS when finished
    behaviour_logprobs: list[float]
    finished: bool


def left_pad(seqs: Sequence[Sequence[int]], pad: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (batch, max_len), padded on the left for generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    temperature: float = 1.0,
) -> list[list[float]]:
    """Log-prob of each response token given its prompt and the response so far, at ``temperature``."""
    full = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    ids, mask = left_pad(full)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = []
    for i, r in enumerate(responses):
        n = len(r)
        out.append(logp[i, logp.shape[1] - n :].tolist() if n else [])
    return out


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tok,
    prompts: Sequence[Turns],
    *,
    max_new_tokens: int,
    temperature: float,  # type: ignore[no-untyped-def]
    top_p: float,
    seed: int,
) -> list[Sample]:
    """Sample one answer per prompt (dialog turns ending with the user's), with behaviour log-probs."""
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    ids, mask = left_pad(prompt_ids)
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    out = model.generate(  # type: ignore[operator]
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=PAD_ID,
        **sampling,
    )
    responses = []
    for row in out[:, ids.shape[1] :].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        else:
            row = [t for t in row if t != PAD_ID]
        responses.append(row)
    logprobs = sequence_logprobs(model, prompt_ids, responses, temperature if temperature > 0 else 1.0)
    return [
        Sample(p, r, lp, bool(r) and r[-1] == tok.eos_token_id)
        for p, r, lp in zip(prompt_ids, responses, logprobs, strict=True)
    ]


@torch.no_grad()
def reward_scores(
    model: torch.nn.Module, tok, prompts: Sequence[Turns], answers: Sequence[str], seq_len: int
) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Sigmoid-scale scores (0..1) of a reward model for each (prompt, answer). Shape: (batch,)."""
    seqs = [encode_answer(tok, p, a, seq_len) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    logits = model(input_ids=ids, attention_mask=(ids != PAD_ID).long()).logits.squeeze(-1).float()
    return torch.sigmoid(logits)
