"""The RLHF maths against numbers worked out by hand."""

import math

import pytest
import torch
from paddock.rlhf.ppo import (
    RunningMoments,
    best_of_k,
    best_of_n_curve,
    combine_rewards,
    entropy,
    explained_variance,
    gae,
    kl_per_token,
    leave_one_out,
    llama2_reward,
    logit,
    masked_whiten,
    ppo_policy_loss,
    token_rewards,
    value_loss,
)

T = torch.tensor


def test_kl_estimators():
    logp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])  # log r = log(ref / p) = log 0.5
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_per_token(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    same = kl_per_token(logp, logp, "k3")
    assert same.item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_per_token(logp, ref, "k4")


def test_safety_gate_and_logit_whitening():
    r_h, r_s = T([0.9, 0.9, 0.9]), T([0.8, 0.1, 0.8])
    is_safety = T([False, False, True])
    # helpfulness, gate (0.1 < 0.15), safety prompt
    assert combine_rewards(r_h, r_s, is_safety).tolist() == pytest.approx([0.9, 0.1, 0.8])
    assert logit(T([0.5, 1 / (1 + math.exp(-2))])).tolist() == pytest.approx([0.0, 2.0], abs=1e-6)
    # logit -> [0, 2]; whitened with mean 1 and unbiased std sqrt(2)
    got = llama2_reward(T([0.5, 1 / (1 + math.exp(-2))]), T([0.9, 0.9]), T([False, False]))
    assert got.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-5)


def test_running_moments_match_the_whole_batch():
    rm = RunningMoments()
    rm.update(T([1.0, 2.0, 3.0]))
    rm.update(T([4.0, 5.0]))
    assert rm.mean == pytest.approx(3.0) and rm.std == pytest.approx(math.sqrt(2.5))


def test_token_rewards_put_the_score_on_the_last_token():
    got = token_rewards(T([1.0]), kl=T([[0.1, 0.2, 0.3, 0.9]]), mask=T([[1.0, 1.0, 1.0, 0.0]]), beta=0.5)
    assert got.tolist()[0] == pytest.approx([-0.05, -0.1, 0.85, 0.0])


def test_gae_by_hand():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.5, 0.5]) and ret.tolist()[0] == pytest.approx(
        [1.0, 1.0, 1.0]
    )
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.125, 0.25, 0.5]) and ret.tolist()[0] == pytest.approx(
        [0.625, 0.75, 1.0]
    )
    # Padding neither receives nor passes on advantage.
    adv, ret = gae(T([[0.0, 1.0, 0.0]]), T([[0.5, 0.5, 9.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.475, 0.5, 0.0]) and ret.tolist()[0] == pytest.approx(
        [0.975, 1.0, 0.0]
    )


def test_policy_loss_clips_ratio_e_to_1_2():
    mask = T([[1.0]])
    loss, stats = ppo_policy_loss(T([[1.0]]), T([[0.0]]), advantages=T([[1.0]]), mask=mask)  # ratio e
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"] == 1.0
    loss, stats = ppo_policy_loss(T([[1.0]]), T([[0.0]]), advantages=T([[-1.0]]), mask=mask)
    assert (
        loss.item() == pytest.approx(math.e) and stats["clipfrac"] == 0.0
    )  # pessimistic side is not clipped
    loss, stats = ppo_policy_loss(T([[0.3]]), T([[0.3]]), advantages=T([[2.0]]), mask=mask)
    assert loss.item() == pytest.approx(-2.0) and stats["approx_kl"] == pytest.approx(0.0)
    # Masked tokens do not count.
    loss, _ = ppo_policy_loss(
        T([[0.0, 5.0]]), T([[0.0, 0.0]]), advantages=T([[1.0, 1.0]]), mask=T([[1.0, 0.0]])
    )
    assert loss.item() == pytest.approx(-1.0)


def test_policy_loss_aggregates_by_token_or_by_answer():
    # Ratio 1 (no update yet): each token's term is -A. Answer 1 has one token (A = 2), answer 2 three (A = 1),
    # a third row no token at all (an empty answer), right-aligned as Packed lays answers out.
    logp = T([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    adv = T([[0.0, 0.0, 2.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = T([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    tokens, _ = ppo_policy_loss(logp, logp, adv, mask)
    assert tokens.item() == pytest.approx(
        -(2 + 1 + 1 + 1) / 4
    )  # -1.25: four tokens, the long answer 3 of them
    answers, _ = ppo_policy_loss(logp, logp, adv, mask, aggregation="seq-mean-token-mean")
    assert answers.item() == pytest.approx(-(2 / 1 + 3 / 3) / 2)  # -1.5: two answers, the empty row left out
    # The gradient reaches each token by 1 / (its answer's length x answers), not 1 / tokens
    new = logp.clone().requires_grad_(True)
    ppo_policy_loss(new, logp, adv, mask, aggregation="seq-mean-token-mean")[0].backward()
    assert new.grad[0, 2].item() == pytest.approx(-2 / 2) and new.grad[1, 0].item() == pytest.approx(-1 / 6)
    sums, _ = ppo_policy_loss(logp, logp, adv, mask, aggregation="seq-mean-token-sum")
    assert sums.item() == pytest.approx(-(2 + 3) / 2)  # -2.5: each answer's log-probability, as TRL's RLOO
    new = logp.clone().requires_grad_(True)
    ppo_policy_loss(new, logp, adv, mask, aggregation="seq-mean-token-sum")[0].backward()
    assert new.grad[0, 2].item() == pytest.approx(-2 / 2) and new.grad[1, 0].item() == pytest.approx(-1 / 2)
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum"):  # only empty answers: zero, not NaN
        empty, _ = ppo_policy_loss(logp[2:], logp[2:], adv[2:], mask[2:], aggregation=mode)
        assert empty.item() == 0.0
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        ppo_policy_loss(logp, logp, adv, mask, aggregation="sum")


def test_value_loss_is_clipped_pessimistically():
    loss, _ = value_loss(T([[2.0]]), old_values=T([[1.0]]), returns=T([[0.0]]), mask=T([[1.0]]))
    assert loss.item() == pytest.approx(2.0)  # 0.5 * max(4, 1.44)
    loss, stats = value_loss(T([[0.5]]), old_values=T([[1.0]]), returns=T([[2.0]]), mask=T([[1.0]]))
    assert loss.item() == pytest.approx(1.125) and stats["value_clipfrac"] == 0.0  # 0.5 * max(2.25, 1.44)


def test_entropy_whitening_and_explained_variance():
    assert entropy(torch.zeros(1, 2, 4), T([[1.0, 1.0]])).item() == pytest.approx(math.log(4))
    w = masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    assert w.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)
    mask = T([[1.0, 1.0, 1.0]])
    assert explained_variance(T([[1.0, 2.0, 3.0]]), T([[1.0, 2.0, 3.0]]), mask) == pytest.approx(1.0)
    assert explained_variance(T([[2.0, 2.0, 2.0]]), T([[1.0, 2.0, 3.0]]), mask) == pytest.approx(0.0)


def test_best_of_k_and_the_best_of_n_curve():
    index, best = best_of_k(T([[1.0, 3.0, 2.0], [5.0, 4.0, 0.0]]))
    assert index.tolist() == [1, 0] and best.tolist() == [3.0, 5.0]
    maxima, medians = best_of_n_curve(T([[1.0, 3.0, 2.0]]))
    assert maxima == [1.0, 3.0, 3.0] and medians == [1.0, 1.0, 2.0]  # torch's median is the lower middle


def test_leave_one_out_by_hand():
    returns = torch.tensor([1.0, 3.0, 2.0, 6.0, 4.0])
    groups = torch.tensor([7, 7, 2, 2, 2])
    # 1 - 3, 3 - 1; 2 - (6 + 4) / 2, 6 - (2 + 4) / 2, 4 - (2 + 6) / 2
    assert leave_one_out(returns, groups).tolist() == [-2.0, 2.0, -3.0, 3.0, 0.0]
    with pytest.raises(ValueError, match=r"groups \[5\] hold one"):
        leave_one_out(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4, 4, 5]))
