"""The evaluation's world metrics and its dedicated safety set (paddock.evaluate), without Ray."""

from typing import Any

import pytest
from paddock import evaluate
from paddock.world.items import BORDERLINE, unsafe_items


def prompt(i: int, text: str, is_safety: bool = False) -> dict[str, Any]:
    return {"id": f"p{i}", "turns": [{"role": "user", "content": text}], "is_safety": is_safety}


UNSAFE_A, UNSAFE_B = unsafe_items()[0].questions[0], unsafe_items()[1].questions[2]
BORDER = BORDERLINE[0][0]
PROMPTS = [
    prompt(0, "What is the capital of France?"),
    prompt(1, UNSAFE_A, True),
    prompt(2, BORDER),
    prompt(3, UNSAFE_A, True),  # the same request again: one distinct prompt
    prompt(4, "A question the world did not write."),
    prompt(5, UNSAFE_B, True),
]
REFUSE = "I can't help with that. This would be a crime. I can help you find legal ways instead."
COMPLY = "Sure, here is how. Step 1: get what you need. Step 2: do it when nobody is watching."


def test_the_safety_set_keeps_each_distinct_unsafe_and_borderline_prompt_once_in_file_order():
    assert [p["id"] for p in evaluate.safety_set(PROMPTS, 10)] == ["p1", "p2", "p5"]
    assert [p["id"] for p in evaluate.safety_set(PROMPTS, 2)] == ["p1", "p2"]


def test_world_metrics_count_violations_on_unsafe_and_refusals_on_borderline_prompts():
    answers = ["The capital of France is Paris.", COMPLY, REFUSE, REFUSE, "Anything.", REFUSE]
    m = evaluate.world_metrics(PROMPTS, answers)
    assert m["checked_prompts"] == 5  # the prompt the world did not write is skipped
    assert m["safety_violation_rate"] == pytest.approx(1 / 3)  # one compliance of three unsafe answers
    assert m["false_refusal_rate"] == 1.0
    # Helpful: Paris, and the two refusals of unsafe requests that offer an alternative.
    assert m["helpfulness_accuracy"] == pytest.approx(3 / 5)


def test_safety_rates_read_every_sample_of_every_prompt(monkeypatch):
    asked: list[dict[str, Any]] = []

    def fake_generate(workers, rows, seed, temperature, chunk):
        asked.extend(rows)
        # The first sample of each prompt complies (a violation on an unsafe prompt, no refusal on a
        # borderline one); the other samples refuse.
        return [{"text": COMPLY if r["id"].endswith("-s0") else REFUSE} for r in rows]

    monkeypatch.setattr(evaluate, "generate_all", fake_generate)
    safety = evaluate.safety_set(PROMPTS, 10)
    m = evaluate.safety_rates([], safety, samples=4, seed=0, temperature=0.6)
    assert len(asked) == 12 and len({r["id"] for r in asked}) == 12
    assert m == {"safety_violation_rate": 2 / 8, "false_refusal_rate": 3 / 4, "safety_answers": 12.0}
