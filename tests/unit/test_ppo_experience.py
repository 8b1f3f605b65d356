"""PPO experience: the response layout, hand-worked rewards and advantages, and learner tensors."""

import math

import pytest
import torch
from paddock.config import PPOConfig
from paddock.ppo.experience import EXPERIENCE_SCHEMA, build_experience, learner_batch, to_table
from paddock.rollout.core import TokenValues, pack, right_align, unalign


def test_pack_right_aligns_responses():
    p = pack([[1, 5, 6], [1, 7]], [[8, 2], [9, 10, 2]])
    # Sequences 5 and 5 long: no left padding; responses end at the right edge.
    assert p.ids.tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 10, 2]]
    assert p.response_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert p.response_len == 3
    x = right_align([[0.5, 0.25], [1.0, 2.0, 3.0]], 3)
    assert x.tolist() == [[0.0, 0.5, 0.25], [1.0, 2.0, 3.0]]
    assert unalign(x, p.response_mask) == [[0.5, 0.25], [1.0, 2.0, 3.0]]


def test_token_values_read_the_hidden_state_before_each_response_token(tok):
    from paddock.models import build_causal_lm, load_scalar_model

    lm = build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=64, seed=0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        lm.save_pretrained(d)
        rm = load_scalar_model(d).eval()
    values = TokenValues(rm)
    prompt, response = [1, 40, 41, 42], [50, 51, 2]
    packed = pack([prompt], [response])
    v = values(packed)
    # The last value is the reward model's score of the whole sequence minus its final token.
    with torch.no_grad():
        score = rm(input_ids=torch.tensor([prompt + response[:-1]])).logits.squeeze()
    assert v.shape == (1, 3)
    assert v[0, -1].item() == pytest.approx(score.item(), abs=1e-5)


def sample(pid: str, n: int, safety: bool = False) -> dict:
    return {
        "prompt_id": pid,
        "prompt_ids": [1, 3, 4],
        "response_ids": list(range(10, 10 + n)),
        "behaviour_logprobs": [-1.0] * n,
        "policy_version": 3,
        "is_safety": safety,
        "finished": True,
    }


def test_build_experience_by_hand():
    """Two answers; gamma 1, lambda 1, beta 0.5, k1 KL; values 0 so that returns are reward-to-go."""
    cfg = PPOConfig(beta=0.5, gamma=1.0, lam=1.0, kl_estimator="k1")
    samples = [sample("a", 2), sample("b", 1, safety=True)]
    ref = [[-1.5, -1.0], [-0.5]]  # KL k1 = logp - ref = [0.5, 0.0], [-0.5]
    values = [[0.0, 0.0], [0.0]]
    r_h, r_s = [0.9, 0.8], [0.6, 0.2]
    exp = build_experience(samples, ref, values, r_h, r_s, cfg)
    # Prompt a: helpfulness 0.9 (safety 0.6 >= 0.15, not a safety prompt); b: safety prompt -> 0.2.
    z = torch.tensor([math.log(0.9 / 0.1), math.log(0.2 / 0.8)])
    score = (z - z.mean()) / z.std()  # +-0.7071
    a, b = exp.rows
    assert a["reward_combined"] == pytest.approx(0.9) and b["reward_combined"] == pytest.approx(0.2)
    # Rewards: a = [-0.25, 0 + s_a], b = [+0.25 + s_b]; returns are rewards-to-go.
    s_a, s_b = score.tolist()
    assert a["returns"] == pytest.approx([-0.25 + s_a, s_a], abs=1e-5)
    assert b["returns"] == pytest.approx([0.25 + s_b], abs=1e-5)
    # Advantages = returns (values 0), whitened over the three valid tokens.
    raw = torch.tensor([-0.25 + s_a, s_a, 0.25 + s_b])
    want = ((raw - raw.mean()) / raw.std()).tolist()
    assert a["advantages"] + b["advantages"] == pytest.approx(want, abs=1e-4)
    assert exp.metrics["ppo/kl"] == pytest.approx((0.5 + -0.5) / 2)
    assert exp.metrics["ppo/reward_combined"] == pytest.approx(0.55)
    assert exp.metrics["ppo/response_length"] == pytest.approx(1.5)
    assert exp.metrics["ppo/safety_gated_share"] == pytest.approx(0.5)

    table = to_table(exp.rows)
    assert table.schema == EXPERIENCE_SCHEMA and table.num_rows == 2
    lb = learner_batch(table.to_pylist())
    assert lb.old_logprobs.tolist() == [[-1.0, -1.0], [0.0, -1.0]]
    assert lb.advantages[1, 1].item() == pytest.approx(want[2], abs=1e-4)
    assert lb.tokens == 5 + 4


def test_running_whitening_carries_statistics_across_batches():
    from paddock.rlhf.ppo import RunningMoments

    cfg = PPOConfig(whiten="running")
    running = RunningMoments()
    s = [sample("a", 1), sample("b", 1)]
    build_experience(s, [[-1.0], [-1.0]], [[0.0], [0.0]], [0.9, 0.5], [0.9, 0.9], cfg, running)
    build_experience(s, [[-1.0], [-1.0]], [[0.0], [0.0]], [0.7, 0.3], [0.9, 0.9], cfg, running)
    assert running.count == 4
    z = torch.logit(torch.tensor([0.9, 0.5, 0.7, 0.3], dtype=torch.float64))
    assert running.mean == pytest.approx(z.mean().item())
    assert running.std == pytest.approx(z.std().item())


def test_ppo_job_checks_batch_arithmetic():
    from paddock.config import ConfigError, PPOJob, load_config

    with pytest.raises(ConfigError, match=r"ppo\.mini_batch: must divide the answers .* \(64 x 1 = 64\)"):
        load_config(PPOJob, None, ["ppo.batch_prompts=64", "ppo.mini_batch=24"])
    # Answers count: 24 prompts x 4 answers = 96 rows, three mini-batches of 32
    job = load_config(PPOJob, None, ["ppo.batch_prompts=24", "ppo.samples_per_prompt=4", "ppo.mini_batch=32"])
    assert job.ppo.answers == 96
    with pytest.raises(ConfigError, match=r"ppo\.samples_per_prompt: advantage rloo .* at least 2, got 1"):
        load_config(PPOJob, None, ["ppo.advantage=rloo"])
    with pytest.raises(ConfigError, match=r"value_from: ppo\.advantage=rloo trains no value model"):
        load_config(
            PPOJob, None, ["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "value_from=models:/x/1"]
        )
    with pytest.raises(ConfigError, match=r"multiple of train\.num_workers x train\.micro_batch_size"):
        load_config(PPOJob, None, ["ppo.batch_prompts=64", "ppo.mini_batch=8", "train.micro_batch_size=8"])
    job = load_config(PPOJob, None, ["ppo.mode=async"])
    assert job.ppo.staleness == 1 and job.optim.lr == 1e-6 and job.optim.schedule == "constant"
    assert load_config(PPOJob, None).ppo.staleness == 0


def test_an_answer_cut_off_at_the_length_limit_is_penalised():
    cfg = PPOConfig(beta=0.0, gamma=1.0, lam=1.0, unfinished_penalty=1.0)
    done, cut = sample("a", 1), sample("b", 1) | {"finished": False}
    exp = build_experience([done, cut], [[-1.0], [-1.0]], [[0.0], [0.0]], [0.8, 0.8], [0.9, 0.9], cfg)
    # Equal scores whiten to 0 each; the cut-off answer's return is lower by exactly the penalty.
    assert exp.rows[0]["returns"] == pytest.approx([0.0], abs=1e-6)
    assert exp.rows[1]["returns"] == pytest.approx([-1.0], abs=1e-6)
    assert exp.metrics["ppo/finished_rate"] == pytest.approx(0.5)


def test_rloo_advantages_by_hand():
    """Two prompts, answered twice and three times; beta 0.5, k1 KL. Each answer's return is its whitened score
    less beta x its summed KL; its advantage is that return less the mean of the other answers' to its prompt,
    scaled to unit RMS over the five answers, on each of its tokens. No value model is read or written."""
    cfg = PPOConfig(beta=0.5, kl_estimator="k1", advantage="rloo", samples_per_prompt=2)
    samples = [sample("a", 2), sample("a", 1), sample("b", 1), sample("b", 1), sample("b", 2)]
    ref = [[-1.5, -1.0], [-1.0], [-1.0], [-0.5], [-1.0, -1.0]]  # KL: 0.5, 0, 0, -0.5, 0
    r_h = [0.9, 0.5, 0.8, 0.2, 0.5]
    exp = build_experience(samples, ref, [[]] * 5, r_h, [0.9] * 5, cfg, groups=[0, 0, 1, 1, 1])
    z = torch.logit(torch.tensor(r_h, dtype=torch.float64))
    score = ((z - z.mean()) / z.std()).tolist()
    ret = [score[0] - 0.25, score[1], score[2], score[3] + 0.25, score[4]]
    raw = [
        ret[0] - ret[1],
        ret[1] - ret[0],
        ret[2] - (ret[3] + ret[4]) / 2,
        ret[3] - (ret[2] + ret[4]) / 2,
        ret[4] - (ret[2] + ret[3]) / 2,
    ]
    rms = math.sqrt(sum(a * a for a in raw) / 5)
    for row, r, a in zip(exp.rows, ret, raw, strict=True):
        n = len(row["response_ids"])
        assert row["advantages"] == pytest.approx([a / rms] * n, abs=1e-5)
        assert row["returns"] == pytest.approx([r] * n, abs=1e-5)
        assert row["values"] == []
    # Within a prompt the raw advantages sum to zero: the baseline is the others' mean
    assert raw[0] + raw[1] == pytest.approx(0.0) and sum(raw[2:]) == pytest.approx(0.0, abs=1e-12)
    assert "ppo/explained_variance" not in exp.metrics
    lb = learner_batch(to_table(exp.rows).to_pylist())
    assert lb.old_values.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="prompt group"):
        build_experience(samples, ref, [[]] * 5, r_h, [0.9] * 5, cfg)
