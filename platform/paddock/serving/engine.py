"""Token-by-token generation for the serving endpoint: one batched decode loop with a KV cache.

Each row of a batch carries its own sampling parameters (temperature, top_p, max_tokens, seed), so concurrent
requests with different settings share forward passes, and a seeded request gets the same answer whatever it is
batched with (its own ``torch.Generator``). The loop yields one token per live row per step, which is what
streaming needs; ``complete`` drains it for the non-streaming path. Stop strings are matched on the decoded text
by the caller, which can end a row early.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from paddock.models import PAD_ID
from paddock.rollout.core import device_of, left_pad


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.6  # Llama 2's chat defaults
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Row:
    """One sequence being generated, with what the caller has seen of it."""

    prompt_ids: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row's logits (vocab,): greedy at temperature 0, else nucleus sampling."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def decode(model: torch.nn.Module, rows: Sequence[Row], eos_id: int) -> Iterator[list[int | None]]:
    """Generate for every row at once; yields the new token of each row per step (None once a row is done).

    A row is done at EOS, at its ``max_tokens``, or when the caller sets its ``finish_reason``.
    """
    device = device_of(model)
    ids, mask = left_pad([r.prompt_ids for r in rows])
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [
        torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else None for r in rows
    ]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    last = positions[:, -1]
    while True:
        logits = out.logits[:, -1].float().cpu()  # sampling runs on the CPU with each row's own generator
        step: list[int | None] = []
        for i, r in enumerate(rows):
            if r.finish_reason is not None:
                step.append(None)
                continue
            token = pick(logits[i], r.params, generators[i])
            r.tokens.append(token)
            if token == eos_id:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
            step.append(token)
        yield step
        if all(r.finish_reason is not None for r in rows):
            return
        nxt = torch.tensor([[t if t is not None else PAD_ID] for t in step], device=device)
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=-1)
        last = last + 1
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=last.unsqueeze(-1),
            past_key_values=out.past_key_values,
            use_cache=True,
        )


class TextTracker:
    """Decoded text of a row as tokens arrive: the safe-to-emit delta, and stop strings cut off."""

    def __init__(self, tok, row: Row, eos_id: int):  # type: ignore[no-untyped-def]
        self.tok, self.row, self.eos_id = tok, row, eos_id
        self.emitted = 0
        self.hold = max((len(s) for s in row.params.stop), default=0)

    def _text(self) -> str:
        ids = [t for t in self.row.tokens if t != self.eos_id]
        return str(self.tok.decode(ids, skip_special_tokens=True)).lstrip()

    def update(self) -> str:
        """Call after each new token: returns the text that may be shown now."""
        text = self._text()
        for s in self.row.params.stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
                self.row.finish_reason = "stop"
        self.row.text = text
        # While the row runs, hold back what could still become a stop string.
        safe = len(text) if self.row.finish_reason is not None else max(self.emitted, len(text) - self.hold)
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta


def complete(model: torch.nn.Module, tok, rows: Sequence[Row]) -> list[Row]:  # type: ignore[no-untyped-def]
    """Generate every row to the end; each row's ``text`` and ``finish_reason`` are set."""
    eos = tok.eos_token_id
    trackers = [TextTracker(tok, r, eos) for r in rows]
    for step in decode(model, rows, eos):
        for tracker, token in zip(trackers, step, strict=True):
            if token is not None:
                tracker.update()
    for r in rows:
        r.text = r.text.strip()
    return list(rows)
