"""Evaluation of a chat policy on held-out prompts, through the rollout workers and reward scorers.

Two passes over the prompts: sampled answers at the rollout temperature with a fixed seed (the mean combined
reward, which PPO's early stopping watches), and greedy answers (what a user of the served model sees), checked
by the tiny world's verifiers where the prompt comes from the world: helpfulness accuracy and the safety
violation rate on unsafe prompts. Prompts the world did not generate are scored by the reward models only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from paddock.rlhf.ppo import SAFETY_GATE, combine_rewards
from paddock.world import verify


def generate_all(
    workers: Sequence[Any],
    prompts: Sequence[Mapping[str, Any]],
    seed: int,
    temperature: float | None,
    chunk: int,
) -> list[dict[str, Any]]:
    """One answer per prompt, chunks spread over the workers round-robin, order kept."""
    calls = []
    for n, i in enumerate(range(0, len(prompts), chunk)):
        worker = workers[n % len(workers)]
        calls.append(
            worker.generate.remote(list(prompts[i : i + chunk]), seed=seed + n, temperature=temperature)
        )
    return [row for rows in ray.get(calls) for row in rows]


def reward_means(
    rm_helpfulness: Any, rm_safety: Any, prompts: Sequence[Mapping[str, Any]], answers: Sequence[str]
) -> dict[str, float]:
    turns = [p["turns"] for p in prompts]
    r_h = torch.tensor(ray.get(rm_helpfulness.rewards.remote(turns, list(answers))))
    r_s = torch.tensor(ray.get(rm_safety.rewards.remote(turns, list(answers))))
    is_safety = torch.tensor([bool(p["is_safety"]) for p in prompts])
    combined = combine_rewards(r_h, r_s, is_safety, SAFETY_GATE)
    return {
        "reward_combined": combined.mean().item(),
        "reward_helpfulness": r_h.mean().item(),
        "reward_safety": r_s.mean().item(),
    }


def world_metrics(prompts: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> dict[str, float]:
    """Verifier accuracy and safety violations on the prompts the tiny world can check (others skipped)."""
    helpful, unsafe_total, violations, checked = 0, 0, 0, 0
    for p, a in zip(prompts, answers, strict=True):
        try:
            kind = verify.classify(p["turns"])
        except ValueError:
            continue
        checked += 1
        helpful += verify.helpfulness(p["turns"], a)
        if kind == "unsafe":
            unsafe_total += 1
            violations += not verify.safety_ok(p["turns"], a)
    if not checked:
        return {}
    out = {"helpfulness_accuracy": helpful / checked, "checked_prompts": float(checked)}
    if unsafe_total:
        out["safety_violation_rate"] = violations / unsafe_total
    return out


def evaluate_policy(
    workers: Sequence[Any],
    rm_helpfulness: Any,
    rm_safety: Any,
    prompts: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    temperature: float,
    chunk: int = 32,
) -> dict[str, float]:
    """``eval/*`` metrics of the policy the workers hold (see the module docstring)."""
    sampled = generate_all(workers, prompts, seed, temperature, chunk)
    greedy = generate_all(workers, prompts, seed, 0.0, chunk)
    out = {
        f"eval/{k}": v
        for k, v in reward_means(rm_helpfulness, rm_safety, prompts, [r["text"] for r in sampled]).items()
    }
    greedy_text = [r["text"] for r in greedy]
    out |= {
        f"eval/greedy_{k}": v
        for k, v in reward_means(rm_helpfulness, rm_safety, prompts, greedy_text).items()
    }
    out |= {f"eval/{k}": v for k, v in world_metrics(prompts, greedy_text).items()}
    versions = {r["policy_version"] for r in sampled + greedy}
    if len(versions) != 1:
        raise RuntimeError(f"evaluation mixed policy versions {sorted(versions)}; a worker lost its weights")
    return out
