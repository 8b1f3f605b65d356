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
from paddock.models import PAD_ID, right_padded_mask

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


TOKEN_BUDGET = 32768  # tokens (rows x padded width) in one forward micro-batch outside training
LOGITS_CHUNK = 1024  # positions whose vocabulary logits exist at once


def micro_batches(widths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Consecutive row indices grouped so that rows x the group's widest row stays within ``token_budget``
    (a row wider than the budget goes alone). Order is kept, so seeded sampling over the groups is reproducible."""
    groups: list[list[int]] = []
    widest = 0
    for i, w in enumerate(widths):
        if groups and (len(groups[-1]) + 1) * max(widest, w) <= token_budget:
            groups[-1].append(i)
            widest = max(widest, w)
        else:
            groups.append([i])
            widest = w
    return groups


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
    token_budget: int = TOKEN_BUDGET,
    logits_chunk: int = LOGITS_CHUNK,
) -> list[list[float]]:
    """Log-prob of each response token given its prompt and the response so far, at ``temperature``.

    Rows run in micro-batches of at most ``token_budget`` tokens; within one, the decoder's hidden states go
    through the LM head ``logits_chunk`` positions at a time, so no (batch, length, vocab) fp32 tensor exists."""
    out: list[list[float]] = [[] for _ in prompts]
    widths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    for group in micro_batches(widths, token_budget):
        packed = pack([prompts[i] for i in group], [responses[i] for i in group]).to(device_of(model))
        logp = chunked_logprobs(model, packed, temperature, logits_chunk)
        for i, row in zip(group, unalign(logp, packed.response_mask), strict=True):
            out[i] = row
    return out


def chunked_logprobs(
    model: torch.nn.Module, packed: Packed, temperature: float = 1.0, logits_chunk: int = LOGITS_CHUNK
) -> torch.Tensor:
    """``token_logprobs(response_logits(...))`` computed from the decoder's hidden states a chunk of positions at
    a time: (batch, R) fp32, 0 on padding. Peak extra memory: batch x chunk x vocab fp32 values."""
    r = packed.response_len
    hidden = model.get_decoder()(  # type: ignore[operator]
        input_ids=packed.ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids
    ).last_hidden_state[:, -r - 1 : -1]
    head = model.get_output_embeddings()  # type: ignore[operator]
    targets = packed.ids[:, -r:]
    step = max(1, logits_chunk // max(1, hidden.shape[0]))
    parts = []
    for s in range(0, r, step):
        logits = head(hidden[:, s : s + step]).float() / temperature
        parts.append(
            logits.gather(-1, targets[:, s : s + step].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        )
    return torch.cat(parts, dim=1) * packed.response_mask


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
    token_budget: int = TOKEN_BUDGET,
    logits_chunk: int = LOGITS_CHUNK,
) -> list[Sample]:
    """Sample one answer per prompt (dialog turns ending with the user's, with an optional system prompt each),
    with behaviour log-probs. Prompts are generated in micro-batches whose prompt + ``max_new_tokens`` tokens
    stay within ``token_budget`` (the KV cache's bound)."""
    systems = systems or [None] * len(prompts)
    prompt_ids = [encode_prompt(tok, p, s) for p, s in zip(prompts, systems, strict=True)]
    torch.manual_seed(seed)
    responses: list[list[int]] = []
    for group in micro_batches([len(p) + max_new_tokens for p in prompt_ids], token_budget):
        ids, mask = left_pad([prompt_ids[i] for i in group])
        ids, mask = ids.to(device_of(model)), mask.to(device_of(model))
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=PAD_ID,
            **sampling_kwargs(temperature, top_p),
        )
        for row in out[:, ids.shape[1] :].tolist():
            if tok.eos_token_id in row:  # what follows the EOS is padding; a row without one ran to the limit
                row = row[: row.index(tok.eos_token_id) + 1]
            responses.append(row)
    logprobs = sequence_logprobs(
        model, prompt_ids, responses, temperature if temperature > 0 else 1.0, token_budget, logits_chunk
    )
    return [
        Sample(p, r, lp, bool(r) and r[-1] == tok.eos_token_id)
        for p, r, lp in zip(prompt_ids, responses, logprobs, strict=True)
    ]


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module,
    tok,  # type: ignore[no-untyped-def]
    dialogs: Sequence[Mapping[str, Any]],
    seq_len: int,
    logits_chunk: int = LOGITS_CHUNK,
) -> tuple[float, int]:
    """Summed negative log-likelihood of the answer tokens of ``dialogs`` (the SFT loss mask) and their count:
    one dialog at a time, the LM head over ``logits_chunk`` positions at a time."""
    import torch.nn.functional as F

    from paddock.data.tokenize import IGNORE, encode_dialog

    device, head = device_of(model), model.get_output_embeddings()  # type: ignore[operator]
    nll, count = 0.0, 0
    for d in dialogs:
        ex = encode_dialog(tok, d["turns"], d.get("system"))
        ids = torch.tensor([ex.input_ids[:seq_len]], device=device)
        target = torch.tensor(ex.labels[:seq_len][1:], device=device)
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]  # type: ignore[operator]
        for s in range(0, len(target), logits_chunk):
            logits = head(hidden[s : s + logits_chunk]).float()
            nll += F.cross_entropy(
                logits, target[s : s + logits_chunk], ignore_index=IGNORE, reduction="sum"
            ).item()
        count += int((target != IGNORE).sum())
    return nll, count


@torch.no_grad()
def reward_scores(
    model: torch.nn.Module,
    tok,  # type: ignore[no-untyped-def]
    prompts: Sequence[Turns],
    answers: Sequence[str],
    seq_len: int,
    token_budget: int = TOKEN_BUDGET,
) -> torch.Tensor:
    """Sigmoid-scale scores (0..1) of a reward model for each (prompt, answer), in micro-batches of at most
    ``token_budget`` tokens. Shape: (batch,)."""
    seqs = [encode_answer(tok, p, a, seq_len) for p, a in zip(prompts, answers, strict=True)]
    scores = torch.zeros(len(seqs))
    for group in micro_batches([len(s) for s in seqs], token_budget):
        width = max(len(seqs[i]) for i in group)
        ids = torch.full((len(group), width), PAD_ID, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        ids = ids.to(device_of(model))
        logits = model(input_ids=ids, attention_mask=right_padded_mask(ids)).logits.squeeze(-1).float()
        scores[group] = torch.sigmoid(logits).cpu()
    return scores
