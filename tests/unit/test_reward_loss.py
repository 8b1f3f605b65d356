import math

import pytest
import torch
from paddock.data.pairs import reward_mix
from paddock.rlhf.reward import RATING_MARGINS, margin_ranking_loss, rating_margin


def test_margin_loss_by_hand():
    # -log sigmoid(2 - 1 - 1) = -log(1/2) = log 2
    loss = margin_ranking_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2))
    # no margin: -log sigmoid(1) = log(1 + e^-1) = 0.31326
    assert margin_ranking_loss(
        torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0])
    ).item() == pytest.approx(0.313262, abs=1e-6)
    # batch mean of the two
    both = margin_ranking_loss(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert both.item() == pytest.approx((math.log(2) + 0.313262) / 2, abs=1e-6)
    # a huge gap stays finite
    assert margin_ranking_loss(
        torch.tensor([-500.0]), torch.tensor([500.0]), torch.tensor([0.0])
    ).item() == pytest.approx(1000.0)


def test_margin_tables_are_the_papers():
    assert RATING_MARGINS["small"] == pytest.approx(
        {"significantly_better": 1, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0}
    )
    assert [
        rating_margin(r, "large")
        for r in ("significantly_better", "better", "slightly_better", "negligibly_better")
    ] == [3, 2, 1, 0]
    assert rating_margin("better", "none") == 0
    with pytest.raises(ValueError, match="unknown margin"):
        rating_margin("better", "huge")


def test_reward_mixes():
    rows = [{"id": f"h{i}", "kind": "helpfulness"} for i in range(300)] + [
        {"id": f"s{i}", "kind": "safety"} for i in range(200)
    ]
    helpful = reward_mix(rows, "helpfulness", None, seed=0)
    assert (
        sum(r["kind"] == "helpfulness" for r in helpful) == 300
        and sum(r["kind"] == "safety" for r in helpful) == 200
    )  # all there is
    safety = reward_mix(rows, "safety", None, seed=0)
    assert (
        sum(r["kind"] == "safety" for r in safety) == 200
        and sum(r["kind"] == "helpfulness" for r in safety) == 22
    )  # 90/10
    assert reward_mix(rows, "safety", None, seed=0) == safety
    assert len(reward_mix(rows, "helpfulness", 0.5, seed=0)) == 450


def test_an_empty_answer_is_scored_as_the_prompt_then_eos(tok):
    from paddock.data.pairs import encode_answer
    from paddock.data.tokenize import encode_prompt

    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids = encode_answer(tok, prompt, "  ", seq_len=512)
    assert ids == [*encode_prompt(tok, prompt), tok.eos_token_id]
    full = encode_answer(tok, prompt, "Paris.", seq_len=512)
    assert full[: len(ids) - 1] == ids[:-1] and full[-1] == tok.eos_token_id and len(full) > len(ids)
