"""Turning scored samples into PPO experience rows, and rows back into learner tensors.

``build_experience`` is the step between the scorers and the rollout buffer: per-token KL against the reference,
the Llama 2 reward (safety gate, logit, whitening), per-token rewards, GAE and whitened advantages (or, with
``ppo.advantage: rloo``, each answer's leave-one-out advantage against the other answers to its prompt), all with
the ``paddock.rlhf.ppo`` functions over one iteration's batch. Rows are plain lists so that they travel as an Arrow
record batch (``EXPERIENCE_SCHEMA``) and can be spilled to Parquet and replayed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from paddock.config import PPOConfig
from paddock.rlhf.ppo import (
    RunningMoments,
    combine_rewards,
    explained_variance,
    gae,
    kl_per_token,
    leave_one_out,
    llama2_reward,
    masked_mean,
    masked_whiten,
    token_rewards,
)
from paddock.rollout.core import Packed, pack, right_align

_ints = pa.list_(pa.int32())
_floats = pa.list_(pa.float32())
EXPERIENCE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_ids", _ints),
        ("response_ids", _ints),
        ("behaviour_logprobs", _floats),
        ("ref_logprobs", _floats),
        ("values", _floats),
        ("reward_helpfulness", pa.float32()),
        ("reward_safety", pa.float32()),
        ("reward_combined", pa.float32()),
        ("advantages", _floats),
        ("returns", _floats),
        ("policy_version", pa.int64()),
        ("is_safety", pa.bool_()),
    ]
)


@dataclass
class Experience:
    rows: list[dict[str, Any]]
    metrics: dict[str, float]


def build_experience(
    samples: Sequence[Mapping[str, Any]],
    ref_logprobs: Sequence[Sequence[float]],
    values: Sequence[Sequence[float]],
    r_helpfulness: Sequence[float],
    r_safety: Sequence[float],
    cfg: PPOConfig,
    running: RunningMoments | None = None,
    groups: Sequence[int] | None = None,
) -> Experience:
    """Experience rows for one iteration's samples (rollout worker rows), with the iteration's metrics.

    ``running`` is used (and updated) when ``cfg.whiten == "running"``. ``groups``: the prompt each sample
    answers (an id per prompt), which ``cfg.advantage == "rloo"`` needs; its ``values`` are not read (empty lists
    will do) and the rows carry none.
    """
    responses = [s["response_ids"] for s in samples]
    packed = pack([s["prompt_ids"] for s in samples], responses)
    width, mask = packed.response_len, packed.response_mask
    behaviour = right_align([s["behaviour_logprobs"] for s in samples], width)
    ref = right_align(ref_logprobs, width)
    v = right_align(values, width)
    r_h = torch.tensor(list(r_helpfulness), dtype=torch.float32)
    r_s = torch.tensor(list(r_safety), dtype=torch.float32)
    is_safety = torch.tensor([bool(s["is_safety"]) for s in samples])

    kl = kl_per_token(behaviour, ref, cfg.kl_estimator) * mask
    score = llama2_reward(
        r_h, r_s, is_safety, running if cfg.whiten == "running" else None, gate=cfg.safety_gate
    )
    finished = torch.tensor([bool(s.get("finished", True)) for s in samples])
    score = score - cfg.unfinished_penalty * (~finished).float()
    rewards = token_rewards(score, kl, mask, cfg.beta)
    if cfg.advantage == "rloo":
        if groups is None or len(groups) != len(samples):
            raise ValueError("advantage rloo: give each sample's prompt group")
        # One advantage per answer, on each of its tokens; scaled to unit RMS over the answers (they are centred
        # within each prompt already), as GAE's are whitened, so that one LR suits both.
        ret = rewards.sum(-1)  # gamma 1: the score less beta x the answer's KL
        adv = leave_one_out(ret, torch.tensor(list(groups)))
        adv = adv * torch.rsqrt(adv.pow(2).mean() + 1e-8)
        advantages, returns = adv.unsqueeze(-1) * mask, ret.unsqueeze(-1) * mask
    else:
        advantages, returns = gae(rewards, v, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
    combined = combine_rewards(r_h, r_s, is_safety, cfg.safety_gate)

    def tail(x: torch.Tensor, i: int, n: int) -> list[float]:
        return x[i, width - n :].tolist() if n else []

    rows = []
    for i, s in enumerate(samples):
        n = len(s["response_ids"])
        rows.append(
            {
                "prompt_id": s["prompt_id"],
                "prompt_ids": list(s["prompt_ids"]),
                "response_ids": list(s["response_ids"]),
                "behaviour_logprobs": list(s["behaviour_logprobs"]),
                "ref_logprobs": list(ref_logprobs[i]),
                "values": list(values[i]) if cfg.value_model else [],
                "reward_helpfulness": float(r_h[i]),
                "reward_safety": float(r_s[i]),
                "reward_combined": float(combined[i]),
                "advantages": tail(advantages, i, n),
                "returns": tail(returns, i, n),
                "policy_version": int(s["policy_version"]),
                "is_safety": bool(s["is_safety"]),
            }
        )
    lengths = mask.sum(-1)
    metrics = {
        "ppo/reward_combined": combined.mean().item(),
        "ppo/reward_helpfulness": r_h.mean().item(),
        "ppo/reward_safety": r_s.mean().item(),
        "ppo/score_whitened_mean": score.mean().item(),
        "ppo/kl": kl.sum(-1).mean().item(),  # nats per answer, as the penalty sees it
        "ppo/kl_per_token": masked_mean(kl, mask).item(),
        "ppo/response_length": lengths.mean().item(),
        "ppo/finished_rate": finished.float().mean().item(),
        "ppo/safety_gated_share": (is_safety | (r_s < cfg.safety_gate)).float().mean().item(),
    }
    if cfg.value_model:
        metrics["ppo/explained_variance"] = explained_variance(v, returns, mask)
    return Experience(rows, metrics)


def to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=EXPERIENCE_SCHEMA)


@dataclass
class LearnerBatch:
    """A mini-batch as tensors in the ``Packed`` response layout. Per-token tensors are (batch, R)."""

    packed: Packed
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.packed.attention_mask.sum().item())

    def to(self, device: torch.device | str) -> LearnerBatch:
        return LearnerBatch(
            self.packed.to(device),
            *(t.to(device) for t in (self.old_logprobs, self.old_values, self.advantages, self.returns)),
        )


def learner_batch(rows: Sequence[Mapping[str, Any]]) -> LearnerBatch:
    packed = pack([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
    width = packed.response_len

    def col(name: str) -> torch.Tensor:
        return right_align([r[name] for r in rows], width)

    return LearnerBatch(packed, col("behaviour_logprobs"), col("values"), col("advantages"), col("returns"))
