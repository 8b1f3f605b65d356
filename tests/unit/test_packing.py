"""Packed windows keep examples apart: each example's loss in a window is its loss alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paddock.data.tokenize import IGNORE, Example, pack
from paddock.models import PAD_ID, build_causal_lm
from paddock.train.loop import lm_forward, lm_loss


def _examples(seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (7, 12, 5, 9):
        ids = [1, *torch.randint(3, 4000, (n,), generator=g).tolist(), 2]
        out.append(Example(ids, list(ids)))
    return out


def _token_losses(model: torch.nn.Module, ids: list[int], pos: list[int]) -> torch.Tensor:
    """Per-position loss of predicting token t+1 from the prefix up to t (fp32, no reduction)."""
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos])}
    logits = lm_forward(model, batch).logits.float()[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_window_gives_each_example_its_loss_alone(attn: str):
    model = build_causal_lm("tiny", seed=0, attn=attn).eval()
    examples = _examples()
    (window,) = list(pack(examples, seq_len=48, pad_id=PAD_ID, split_examples=False))
    assert window.position_ids is not None
    with torch.no_grad():
        packed = _token_losses(model, window.input_ids, window.position_ids)
        start = 0
        for ex in examples:
            n = len(ex.input_ids)
            alone = _token_losses(model, ex.input_ids, list(range(n)))
            torch.testing.assert_close(packed[start : start + n - 1], alone, atol=1e-5, rtol=1e-5)
            start += n
        # Without the restarts the later examples see the earlier ones: their losses differ.
        crossed = _token_losses(model, window.input_ids, list(range(48)))
    second = slice(len(examples[0].input_ids), len(examples[0].input_ids) + len(examples[1].input_ids) - 1)
    assert (crossed[second] - packed[second]).abs().max() > 1e-3


def test_training_loss_of_a_window_is_the_token_weighted_mean_of_its_examples_alone():
    model = build_causal_lm("tiny", seed=0).eval()
    examples = _examples(1)
    (window,) = list(pack(examples, seq_len=48, pad_id=PAD_ID, split_examples=False))
    batch = {k: torch.tensor([getattr(window, k)]) for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        packed = lm_loss(model, batch).item()
        total, count = 0.0, 0
        for ex in examples:
            losses = _token_losses(model, ex.input_ids, list(range(len(ex.input_ids))))
            total, count = total + losses.sum().item(), count + losses.numel()
    assert IGNORE in window.labels
    assert packed == pytest.approx(total / count, abs=1e-5)
