"""PPO maths for RLHF, as Llama 2 specifies it and Stiennon et al. (2020) fill in the rest.

- Reward (Touvron et al. 2023, section 3.2.3): R_c = R_s if the prompt is a safety prompt or R_s < 0.15, else
  R_h (scores on the sigmoid scale); R~c = whiten(logit(R_c)); the policy maximises R~c - beta * KL(pi || pi_0).
- Per-token rewards (Stiennon et al. 2020; Ziegler et al. 2019): -beta * KL on every response token, the
  combined score added on the last response token.
- Advantages: GAE (Schulman et al. 2016) with returns = advantages + values, advantages whitened over valid tokens.
- Losses: the clipped surrogate (Schulman et al. 2017) and a clipped value loss, averaged over valid tokens.

Conventions: ``mask`` is 1.0 on response tokens and 0.0 on padding; tensors are (batch, response_len) unless
a docstring says otherwise. No Ray, no MLflow: these are pure torch functions.
"""

from __future__ import annotations

from typing import Literal

import torch

SAFETY_GATE = 0.15  # Llama 2: precision 0.89 / recall 0.55 on their safety set


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1. Shapes: x and mask alike."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance); padding stays as given times 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020), per token, with log r = logp_ref - logp


def kl_per_token(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Literal["k1", "k2", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2 (low variance, biased),
    k3 = (r - 1) - log r (unbiased, always >= 0). Shapes: (batch, response_len).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: k1, k2, k3")


# --------------------------------------------------------------------------------------------------
# The Llama 2 reward


def combine_rewards(
    r_helpfulness: torch.Tensor, r_safety: torch.Tensor, is_safety: torch.Tensor, gate: float = SAFETY_GATE
) -> torch.Tensor:
    """R_c: the safety score where the prompt is a safety prompt or the safety score is below ``gate``.

    Scores are on the sigmoid scale (0..1). Shapes: all (batch,); ``is_safety`` is bool.
    """
    use_safety = is_safety.bool() | (r_safety < gate)
    return torch.where(use_safety, r_safety, r_helpfulness)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid, clamped away from 0 and 1 so that it stays finite."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class RunningMoments:
    """Running mean and variance of scalar rewards across batches (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = float(x.numel())
        if n == 0:
            return
        batch_mean = x.double().mean().item()
        batch_m2 = ((x.double() - batch_mean) ** 2).sum().item()
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1, 1)) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def llama2_reward(
    r_helpfulness: torch.Tensor,
    r_safety: torch.Tensor,
    is_safety: torch.Tensor,
    running: RunningMoments | None = None,
    gate: float = SAFETY_GATE,
    eps: float = 1e-8,
) -> torch.Tensor:
    """R~c = whiten(logit(R_c)): batch statistics, or running ones when ``running`` is given (updated here).

    Shapes: all (batch,). Returns (batch,).
    """
    z = logit(combine_rewards(r_helpfulness, r_safety, is_safety, gate))
    if running is None:
        if z.numel() < 2:
            return z - z.mean()
        return (z - z.mean()) / (z.std() + eps)
    running.update(z)
    return (z - running.mean) / (running.std + eps)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * KL on every response token, plus the sequence score on its last response token.

    Shapes: score (batch,); kl and mask (batch, response_len). Returns (batch, response_len).
    """
    rewards = -beta * kl * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    return rewards + last.to(rewards.dtype) * score.unsqueeze(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; the value after the last token is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Shapes: (batch, response_len) in, two (batch, response_len) out. Padding positions come out 0.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # Padding does not carry value or advantage backwards.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    return advantages, (advantages + values) * mask


def leave_one_out(returns: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages (Kool et al. 2019; Ahmadian et al. 2024): each answer's return less the mean return of
    the other answers to the same prompt, A_i = R_i - (sum_group R - R_i) / (k - 1).

    Shapes: returns (batch,); groups (batch,) integer ids, one per prompt, each held by at least two answers.
    """
    ids, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        lone = ids[counts < 2].tolist()
        raise ValueError(f"leave-one-out needs two answers or more per prompt; groups {lone} hold one")
    sums = torch.zeros(len(ids), dtype=returns.dtype).index_add_(0, inverse, returns)
    k = counts[inverse].to(returns.dtype)
    return returns - (sums[inverse] - returns) / (k - 1)


# --------------------------------------------------------------------------------------------------
# Losses


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)) per valid token, aggregated by
    ``aggregation``: ``token-mean`` (the mean over every valid token), ``seq-mean-token-mean`` (each row's mean
    over its valid tokens, then the mean over the rows that have any) or ``seq-mean-token-sum`` (each row's sum,
    then that mean over rows).

    Shapes: all (batch, response_len), one answer a row. Returns the loss and stats (clipfrac, approx_kl = mean
    k3 of old vs new, over tokens).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if aggregation == "token-mean":
        loss = masked_mean(per_token, mask)
    elif aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
        # no boolean indexing or branch on the device's values (no host sync per step); rows without a token
        # count for nothing, and a mini-batch of empty answers is a zero loss, not the NaN of an empty mean
        tokens = mask.sum(-1)
        sums = (per_token * mask).sum(-1)
        per_answer = sums / tokens.clamp(min=1) if aggregation == "seq-mean-token-mean" else sums
        loss = per_answer.sum() / (tokens > 0).sum().clamp(min=1)
    else:
        raise ValueError(
            f"unknown loss aggregation {aggregation!r}: token-mean, seq-mean-token-mean or seq-mean-token-sum"
        )
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask).item()
        approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask).item()
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 * mean over valid tokens of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    Shapes: all (batch, response_len).
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask).item()
    return loss, {"value_clipfrac": clipfrac}


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the policy. Shapes: logits (batch, response_len, vocab), mask (batch, response_len)."""
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1), mask)


def entropy_from_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``entropy`` from log-probs already normalised over the vocabulary (the learner has them). Same shapes."""
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over valid tokens; 1 is perfect, 0 no better than the mean."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_diff / var_returns.clamp(min=1e-8)).item()


def best_of_k(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and reward of the best of K samples per prompt. Shapes: rewards (prompts, K) -> two (prompts,)."""
    best, index = rewards.max(dim=-1)
    return index, best


def best_of_n_curve(rewards: torch.Tensor) -> tuple[list[float], list[float]]:
    """Expected max and median reward over the first N samples, N = 1..K, averaged over prompts.

    Llama 2 (Figure 7): the maximum rises with N while the median stays flat; that gap is what rejection
    sampling harvests. Shapes: rewards (prompts, K).
    """
    maxima, medians = [], []
    for n in range(1, rewards.shape[1] + 1):
        head = rewards[:, :n]
        maxima.append(head.max(dim=-1).values.mean().item())
        medians.append(head.median(dim=-1).values.mean().item())
    return maxima, medians
