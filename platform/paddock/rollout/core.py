"""Sampling and scoring on one process: the torch core that the rollout and scorer actors wrap.

Generation uses transformers' ``generate`` on left-padded prompts in the Llama 2 chat format. Behaviour
log-probs are recomputed with one forward pass over prompt + response at the sampling temperature, so they
are exactly what a learner holding the same weights computes (the top-p truncation shapes which tokens are
drawn, not their log-probs), and PPO's first ratio is 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Packed:
    """Prompt + response sequences left-padded to one width, responses right-aligned.

    ``ids``, ``attention_mask``, ``position_ids``: (batch, width). ``response_mask``: (batch, R) with R the
    longest response; row i's response occupies its last ``len(response_i)`` columns. Every per-token tensor
    of PPO (log-probs, values, rewards, advantages) uses this (batch, R) layout.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def to(self, device: torch.device | str) -> Packed:
        return Packed(
            *(t.to(device) for t in (self.ids, self.attention_mask, self.position_ids, self.response_mask))
        )


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's weights live (inputs go there; results come back to the CPU as lists or tensors)."""
    return next(model.parameters()).device


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> Packed:
    full = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    ids, mask = left_pad(full)
    width = max(1, max(len(r) for r in responses))
    rmask = torch.zeros((len(responses), width))
    for i, r in enumerate(responses):
        if r:
            rmask[i, width - len(r) :] = 1.0
    return Packed(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), rmask)


def right_align(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """Per-token lists to a (batch, width) tensor in the ``Packed`` response layout (zeros in front)."""
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.float32)
    return out


def unalign(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """The inverse of ``right_align``: each row's valid tail as a list."""
    lengths = mask.sum(-1).long().tolist()
    return [x[i, x.shape[1] - n :].tolist() if n else [] for i, n in enumerate(lengths)]


def response_logits(model: torch.nn.Module, packed: Packed, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each response token, at ``temperature``: (batch, R, vocab). Keeps the graph."""
    r = packed.response_len
    logits = model(
        input_ids=packed.ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids
    ).logits
    return logits[:, -r - 1 : -1].float() / temperature


def token_logprobs(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Log-prob of each response token under ``logits`` (batch, R, vocab): (batch, R), 0 on padding."""
    return pick_logprobs(torch.log_softmax(logits, dim=-1), packed)


def pick_logprobs(logp_all: torch.Tensor, packed: Packed) -> torch.Tensor:
    """The response tokens' entries of log-probs over the vocabulary (batch, R, vocab): (batch, R)."""
    targets = packed.ids[:, -packed.response_len :]
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * packed.response_mask


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    temperature: float = 1.0,
) -> list[list[float]]:
    """Log-prob of each response token given its prompt and the response so far, at ``temperature``."""
    packed = pack(prompts, responses).to(device_of(model))
    logp = token_logprobs(response_logits(model, packed, temperature), packed)
    return unalign(logp, packed.response_mask)


class TokenValues(torch.nn.Module):
    """A value model: a reward model's backbone and scalar head read at every position.

    ``forward`` returns V(s_t) for each response token in the ``Packed`` layout, (batch, R): the head applied
    to the hidden state that predicts the token, as the reward model reads the final one. Initialised from the
    helpfulness reward model, its last value starts as that model's score of the whole answer.
    """

    def __init__(self, scalar_model: torch.nn.Module):
        super().__init__()
        self.rm: Any = scalar_model

    def forward(self, packed: Packed) -> torch.Tensor:
        r = packed.response_len
        hidden = self.rm.model(
            input_ids=packed.ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids
        ).last_hidden_state
        values = self.rm.score(hidden[:, -r - 1 : -1]).squeeze(-1).float()
        return values * packed.response_mask


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """``generate`` arguments for a temperature and top_p (temperature 0: greedy). ``top_k=0``: transformers would
    otherwise keep only the 50 likeliest tokens, a truncation no config asks for and that the behaviour log-probs
    (over the whole vocabulary) would not describe."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def answer_text(tok, response_ids: Sequence[int]) -> str:  # type: ignore[no-untyped-def]
    """An answer's text: EOS and other special tokens dropped, surrounding space stripped."""
    eos = tok.eos_token_id
    return str(tok.decode([t for t in response_ids if t != eos], skip_special_tokens=True)).strip()


def greedy_answers(
    model: torch.nn.Module, tok, prompts: Sequence[Turns], max_new_tokens: int, chunk: int = 32
) -> list[str]:  # type: ignore[no-untyped-def]
    """Greedy answers to ``prompts`` in one process, ``chunk`` at a time (held-out scoring in tests and benchmarks;
    stages generate on rollout workers)."""
    return [
        answer_text(tok, s.response_ids)
        for i in range(0, len(prompts), chunk)
        for s in sample(
            model,
            tok,
            prompts[i : i + chunk],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=0,
        )
    ]


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
    systems: Sequence[str | None] | None = None,
) -> list[Sample]:
    """Sample one answer per prompt (dialog turns ending with the user's, with an optional system prompt each),
    with behaviour log-probs."""
    systems = systems or [None] * len(prompts)
    prompt_ids = [encode_prompt(tok, p, s) for p, s in zip(prompts, systems, strict=True)]
    ids, mask = left_pad(prompt_ids)
    ids, mask = ids.to(device_of(model)), mask.to(device_of(model))
    torch.manual_seed(seed)
    out = model.generate(  # type: ignore[operator]
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=PAD_ID,
        **sampling_kwargs(temperature, top_p),
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
    ids = ids.to(device_of(model))
    logits = model(input_ids=ids, attention_mask=(ids != PAD_ID).long()).logits.squeeze(-1).float()
    return torch.sigmoid(logits).cpu()
