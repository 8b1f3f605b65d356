"""RLHF on the shared tiny chain: rejection sampling, then distributed PPO, then PPO under faults.

Rejection sampling draws K answers per training prompt from tiny-sft and fine-tunes on the best; PPO starts
from the result (2 rollout workers, 2 learners with ZeRO-2, the reference and both reward models as scorers).
Results are read on held-out prompts the way a user would judge them: greedy answers scored by both reward
models (the Llama 2 combination) and by the world's verifiers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from chain import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KL_BOUND = 4.0  # nats per answer: the tiny PPO config's kl_limit
ITERATIONS = 10
BATCH = 256  # prompts an iteration: 2.56 passes over the test world's 100 training prompts


_SCORED: dict[tuple[str, str, int], dict[str, Any]] = {}


def held_out_scores(model_dir: Path, chain: dict, world_dir: Path, n: int = 100) -> dict[str, Any]:
    """Greedy answers to the first ``n`` held-out prompts: combined reward (sigmoid scale) and verifier accuracy.

    Greedy decoding is deterministic, so a checkpoint is scored once per session (the RS model is both the RS
    test's subject and PPO's start)."""
    key = (str(model_dir), str(world_dir), n)
    if key not in _SCORED:
        _SCORED[key] = _held_out_scores(model_dir, chain, world_dir, n)
    return _SCORED[key]


def _held_out_scores(model_dir: Path, chain: dict, world_dir: Path, n: int) -> dict[str, Any]:
    import torch
    from paddock.evaluate import world_metrics
    from paddock.models import load_causal_lm, load_scalar_model
    from paddock.rlhf.ppo import combine_rewards
    from paddock.rollout.core import greedy_answers, reward_scores
    from paddock.tokenizer import load_tokenizer
    from paddock.world import verify

    prompts = pq.read_table(world_dir / "prompts" / "test.parquet").to_pylist()[:n]
    tok = load_tokenizer(model_dir)
    turns = [p["turns"] for p in prompts]
    texts = greedy_answers(load_causal_lm(model_dir).eval(), tok, turns, 48)
    r_h = reward_scores(load_scalar_model(chain["rm_h"].checkpoint_dir).eval(), tok, turns, texts, 256)
    r_s = reward_scores(load_scalar_model(chain["rm_s"].checkpoint_dir).eval(), tok, turns, texts, 256)
    combined = combine_rewards(r_h, r_s, torch.tensor([p["is_safety"] for p in prompts]))
    # One verdict per distinct prompt (the held-out set repeats some, and greedy answers to a repeat are the same).
    correct = {
        json.dumps(p["turns"]): float(verify.helpfulness(p["turns"], a))
        for p, a in zip(prompts, texts, strict=True)
    }
    return {"reward_combined": combined.mean().item(), **world_metrics(prompts, texts), "correct": correct}


def _shown(m: dict) -> dict:
    return {k: round(v, 4) for k, v in m.items() if k != "correct"}


def worse_than_chance(before: dict[str, float], after: dict[str, float]) -> float:
    """One-sided exact McNemar (sign) test on verdicts paired by prompt: the probability, were the two models
    equally good, that at least as many prompts would go from right to wrong as did, among the prompts whose
    verdict changed."""
    assert before.keys() == after.keys()
    lost = sum(before[k] > after[k] for k in before)
    changed = lost + sum(after[k] > before[k] for k in before)
    return sum(math.comb(changed, k) for k in range(lost, changed + 1)) / 2**changed


def rlhf_overrides(world_dir: Path, tokenizer_dir: Path) -> list[str]:
    return [
        f"tokenizer={tokenizer_dir}",
        "reward_helpfulness=models:/tiny-rm-helpfulness@latest",
        "reward_safety=models:/tiny-rm-safety@latest",
    ]


@pytest.fixture(scope="module")
def rs(chain, world_dir: Path, tokenizer_dir: Path):
    from paddock import rejection
    from paddock.config import RejectionJob, load_config

    job = load_config(
        RejectionJob,
        REPO / "jobs/configs/tiny/rejection_sampling.yaml",
        [
            *rlhf_overrides(world_dir, tokenizer_dir),
            "policy=models:/tiny-sft@latest",
            f"rejection.prompts={world_dir}/prompts/train.parquet",
        ],
    )
    # The shipped fine-tuning settings, pointed at the test world.
    job.sft_overrides = [
        *job.sft_overrides,
        f"tokenizer={tokenizer_dir}",
        f"data.test={world_dir}/sft/test.parquet",
        "data.seq_len=128",
    ]
    return rejection.run(job)


def test_best_of_n_maximum_rises_while_the_median_stays_flat(rs, results):
    maxima, medians = rs.best_of_n_max, rs.best_of_n_median
    results(
        f"RS best of N=1..8: max {[round(x, 3) for x in maxima]}, median {[round(x, 3) for x in medians]}"
    )
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(maxima)), "E[max of N] cannot fall with N"
    assert maxima[-1] - maxima[0] > 2 * abs(medians[-1] - medians[0])
    assert rs.kept > 0 and rs.mean_best_reward > rs.mean_reward


def test_rejection_sampled_model_beats_sft_on_held_out_prompts(rs, chain, world_dir: Path, results):
    sft = held_out_scores(chain["sft"].checkpoint_dir, chain, world_dir)
    rsm = held_out_scores(rs.finetune.checkpoint_dir, chain, world_dir)
    results(f"held-out greedy, SFT: {_shown(sft)}")
    results(f"held-out greedy, RS:  {_shown(rsm)}")
    assert rsm["reward_combined"] > sft["reward_combined"]


def _kill(match: str, killed: list[str], label: str) -> bool:
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(match in part for part in (p.info["cmdline"] or [])):
            os.kill(p.info["pid"], signal.SIGKILL)
            killed.append(label)
            return True
    return False


@pytest.fixture(scope="module")
def ppo(rs, home: Path, world_dir: Path, tokenizer_dir: Path):
    """The tiny PPO config from the RS model, with three faults on the way: a rollout worker and then a scorer
    (the reference or a reward model) are SIGKILLed after the first evaluation, and a learner after the first
    checkpoint. The run must finish as if nothing happened."""
    from paddock.config import PPOJob, load_config
    from paddock.ppo.loop import run

    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            *rlhf_overrides(world_dir, tokenizer_dir),
            "policy=models:/tiny-rs@latest",
            f"ppo.prompts={world_dir}/prompts/train.parquet",
            f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
            f"ppo.kl_limit={KL_BOUND}",
            f"ppo.iterations={ITERATIONS}",
            "ppo.checkpoint_every=5",
            # Many samples an iteration and a few large mini-batches, as the paper's 512 / 64. At 64 prompts and
            # mini-batches of 16 the gradient was mostly sampling noise: the policy's entropy rose and the
            # validation reward stayed within its noise over 10 or 20 iterations at LR 4e-5 to 2e-4. At 256 / 64
            # it rose in every run on one test chain (two seeds each): LR 1e-4 +0.04 and +0.06 at KL 1.1 and 1.2,
            # LR 2e-4 +0.06 and +0.09 at KL 2.8 (the bound is 4).
            f"ppo.batch_prompts={BATCH}",
            "ppo.mini_batch=64",
            "optim.lr=1.5e-4",
        ],
    )
    killed: list[str] = []

    def saboteur() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and len(killed) < 3:
            evaluated = (home / "runs" / "tiny-ppo" / "best").is_dir()
            if "rollout" not in killed and evaluated and _kill("ray::RolloutWorker", killed, "rollout"):
                continue
            if "rollout" in killed and "scorer" not in killed and _kill("ray::Scorer", killed, "scorer"):
                continue
            # Ray Train writes its snapshot once a reported checkpoint is committed.
            checkpointed = list((home / "ray_results").glob("tiny-ppo-*/checkpoint_manager_snapshot.json"))
            if "learner" not in killed and checkpointed:
                _kill("RayTrainWorker", killed, "learner")
            time.sleep(0.2)

    watcher = threading.Thread(target=saboteur, daemon=True)
    watcher.start()
    result = run(job)
    watcher.join(timeout=1)
    return result, killed


@pytest.mark.reliability
def test_ppo_recovers_from_a_killed_rollout_worker_scorer_and_learner(ppo):
    result, killed = ppo
    assert sorted(killed) == ["learner", "rollout", "scorer"], killed
    assert result.iterations == ITERATIONS and result.stop_reason == "completed"
    # The learners came back from their checkpoint; the restarted rollout worker stamped its rows with its start
    # version, so it was reloaded and asked again.
    assert result.restarts["learners"] >= 1 and result.restarts["rollout_reloads"] >= 1
    b: dict[str, Any] = result.buffer
    assert b["rows_in"] == b["rows_out"] + b["rows_dropped"] + b["rows_held"] and b["reconciles"]
    assert b["rows_out"] >= ITERATIONS * BATCH


def test_ppo_raises_the_held_out_reward_within_the_kl_bound(ppo, rs, chain, world_dir: Path, results):
    result, _ = ppo
    evals = {int(e["iteration"]): e for e in result.evals}
    results(
        f"PPO validation reward by iteration: {[(i, round(e['eval/reward_combined'], 4)) for i, e in evals.items()]}"
    )
    assert result.best_iteration is not None and result.best_iteration > 0, (
        "no PPO iteration beat the starting policy on held-out prompts"
    )
    assert evals[result.best_iteration]["eval/reward_combined"] > evals[0]["eval/reward_combined"]
    kls = [h["ppo/kl"] for h in result.history if "ppo/kl" in h]
    results(
        f"PPO KL per answer: max {max(kls):.3f} (bound {KL_BOUND}), best iteration {result.best_iteration}"
    )
    assert kls and max(kls) < KL_BOUND
    # A user's view: greedy answers of the registered PPO model against its start, by reward and verifier.
    before = held_out_scores(rs.finetune.checkpoint_dir, chain, world_dir)
    after = held_out_scores(result.checkpoint_dir, chain, world_dir)
    p = worse_than_chance(before["correct"], after["correct"])
    results(f"held-out greedy, PPO start (RS): {_shown(before)}")
    results(f"held-out greedy, PPO: {_shown(after)}; verdicts lost vs gained: one-sided McNemar p={p:.3f}")
    assert after["reward_combined"] > before["reward_combined"], (
        "PPO's greedy answers scored below its start's"
    )
    # "Not below": a greedy verdict flips on one prompt in a hundred from a tiny update, either way; what must
    # not happen is PPO losing clearly more right answers than it gains (5% level).
    assert p >= 0.05, f"PPO lost right answers on held-out prompts beyond chance (p={p:.3f})"


def test_ppo_logs_its_metrics_plot_and_registered_model(ppo):
    from paddock import tracking

    result, _ = ppo
    client = tracking.configure()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.model_uri == "models:/tiny-ppo/1"
    wanted = {
        "ppo/reward_combined",
        "ppo/reward_helpfulness",
        "ppo/reward_safety",
        "ppo/kl",
        "ppo/entropy",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/value_loss",
        "ppo/explained_variance",
        "ppo/response_length",
        "ppo/gen_tokens_per_s",
        "ppo/train_tokens_per_s",
        "ppo/weight_sync_s",
        "buffer/occupancy",
        "buffer/staleness_mean",
        "buffer/dropped",
        "eval/reward_combined",
        "eval/helpfulness_accuracy",
    }
    assert wanted <= set(run.data.metrics), wanted - set(run.data.metrics)
    iterations = {int(h["iteration"]) for h in result.history if "ppo/clipfrac" in h}
    assert iterations == set(range(ITERATIONS))
    assert "plots/reward_kl.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}
    # Weights are published by version, once per iteration, and every batch was sampled by a loaded version.
    versions = [h["ppo/policy_version"] for h in result.history if "ppo/policy_version" in h]
    assert versions == sorted(versions)
    assert all(h["ppo/weight_sync_bytes"] > 1e6 for h in result.history if "ppo/weight_sync_bytes" in h)


def test_async_ppo_overlaps_generation_with_training_within_the_staleness_limit(
    rs, world_dir: Path, tokenizer_dir: Path
):
    from paddock.config import PPOJob, load_config
    from paddock.ppo.loop import run

    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            *rlhf_overrides(world_dir, tokenizer_dir),
            "policy=models:/tiny-rs@latest",
            "registry_prefix=async",
            f"ppo.prompts={world_dir}/prompts/train.parquet",
            f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
            "ppo.mode=async",
            "ppo.iterations=4",
            "ppo.batch_prompts=32",
            "ppo.mini_batch=16",
            "ppo.eval_every=100",
            "ppo.eval_max_prompts=8",
        ],
    )
    result = run(job)
    b = result.buffer
    assert result.iterations == 4 and b["reconciles"]
    # Batches sampled one version behind were trained on: generation ran ahead, but never more than one.
    assert 0 < b["staleness_mean"] <= 1.0
    assert b["rows_out"] == 4 * 32
