"""Token-by-token generation for the serving endpoint: a continuously batched decode loop with a KV cache.

Each row of a batch carries its own sampling parameters (temperature, top_p, max_tokens, seed), so concurrent
requests with different settings share forward passes, and a seeded request gets the same answer whatever it is
batched with (its own ``torch.Generator``). Rows join a running ``Batch`` at any step and leave it when done,
so a request never waits for another to finish (continuous batching, as vLLM and TGI do). ``decode`` yields one
token per live row per step for a fixed set of rows; ``complete`` drains it. Stop strings are matched on the
decoded text by the caller, which can end a row early.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: BaseException | None = None  # why this row alone failed (finish_reason "error")
    cancelled: bool = False  # set by the caller (its client went away): the row leaves at the next step


MIN_TEMPERATURE = 1e-4


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row's logits (vocab,): greedy at temperature 0, else nucleus sampling."""
    # Below MIN_TEMPERATURE the distribution is all but one-hot, and far below it the scaled logits
    # overflow to NaN probabilities: greedy is the limit (a scalar test, not a pass over the vocabulary).
    if params.temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p
        # the most likely token, always: a top_p below float32's smallest value would keep nothing
        keep[0] = True
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class Batch:
    """A running decode batch that rows join at any step and leave when done (continuous batching).

    ``admit`` prefills new rows (left-padded among themselves) and merges their KV cache into the running one,
    left-padding whichever is shorter; ``pick`` chooses every live row's next token; the caller may then end
    rows (a stop string) before ``advance`` drops the finished ones and runs one forward for the rest. Each row
    keeps its own positions, attention mask and generator, so a seeded row gets the same tokens whoever it
    shares the batch with and whenever they joined.
    """

    def __init__(self, model: torch.nn.Module, eos_id: int):
        self.model, self.eos_id, self.device = model, eos_id, device_of(model)
        self.rows: list[Row] = []
        self.generators: list[torch.Generator | None] = []
        self.cache: Any = None  # transformers DynamicCache, batch-first keys/values per layer
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)  # position of each row's newest token
        self.logits = torch.zeros(0)  # (rows, vocab): each row's next-token logits, on the CPU

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def admit(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        ids, mask = left_pad([r.prompt_ids for r in rows])
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits = out.logits[:, -1].float().cpu()
        generators = [
            torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else None for r in rows
        ]
        if not self.rows:
            self.cache, self.mask, self.last, self.logits = (
                out.past_key_values,
                mask,
                positions[:, -1],
                logits,
            )
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, out.past_key_values.layers, strict=True):
                mine.keys = torch.cat([_left(mine.keys, width, 2), _left(theirs.keys, width, 2)])
                mine.values = torch.cat([_left(mine.values, width, 2), _left(theirs.values, width, 2)])
            self.mask = torch.cat([_left(self.mask, width, 1), _left(mask, width, 1)])
            self.last = torch.cat([self.last, positions[:, -1]])
            self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        self.generators += generators

    def pick(self) -> list[int]:
        """Each live row's next token (appended to its ``tokens``; EOS and ``max_tokens`` end the row).

        A row whose choice fails ends alone with ``finish_reason`` "error" (its ``error`` says why); a cancelled
        row ends with "cancelled". Either way the other rows' tokens are what they would have been."""
        step = []
        for i, r in enumerate(self.rows):
            if r.cancelled:
                r.finish_reason = "cancelled"
                step.append(-1)
                continue
            try:
                token = pick(self.logits[i], r.params, self.generators[i])
            except Exception as exc:
                r.error, r.finish_reason = exc, "error"
                step.append(-1)
                continue
            r.tokens.append(token)
            if token == self.eos_id:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
            step.append(token)
        return step

    @torch.no_grad()
    def advance(self) -> None:
        """Drop the rows that are done, then one forward step for the rest."""
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.generators = [self.generators[i] for i in keep]
            if not keep:
                self.cache = None
                return
            index = torch.tensor(keep, device=self.device)
            self.mask, self.last = self.mask[index], self.last[index]
            first = int(self.mask.any(0).nonzero()[0])  # columns every remaining row pads: cut them
            for layer in self.cache.layers:
                layer.keys = layer.keys[index, :, first:]
                layer.values = layer.values[index, :, first:]
            self.mask = self.mask[:, first:]
        nxt = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)
        self.mask = torch.cat(
            [self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)], 1
        )
        self.last = self.last + 1
        out = self.model(
            input_ids=nxt,
            attention_mask=self.mask,
            position_ids=self.last.unsqueeze(-1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache, self.logits = out.past_key_values, out.logits[:, -1].float().cpu()


def _left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` padded with zeros on the left of ``dim`` to ``width``."""
    pad = width - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def decode(model: torch.nn.Module, rows: Sequence[Row], eos_id: int) -> Iterator[list[int | None]]:
    """Generate for every row at once; yields the new token of each row per step (None once a row is done).

    A row is done at EOS, at its ``max_tokens``, or when the caller sets its ``finish_reason``.
    """
    batch = Batch(model, eos_id)
    batch.admit(rows)
    while batch:
        live = {id(r) for r in batch.rows}
        tokens = iter(batch.pick())
        yield [next(tokens) if id(r) in live else None for r in rows]
        batch.advance()


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
