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
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from chain import REPO
from faults import kill_and_wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KL_BOUND = 4.0  # nats per answer: the tiny PPO config's kl_limit
ITERATIONS = 10
BATCH = 256  # prompts an iteration: 2.56 passes over the test world's 100 training prompts
LR = 1.5e-4
# Measured on the chain a fresh clone builds on one machine kind, over PPO seeds 0-2 (README, "RLHF"): the training
# reward's mean over the last three iterations rose 0.028-0.034 above the first's; the held-out greedy reward moved
# -0.012 to +0.035 between evaluations and runs. On the chain another kind builds (seed 0, the same twice): +0.019,
# and the greedy reward +0.080.
TRAIN_GAIN = 0.015
GREEDY_SLACK = 0.03
RS_SLACK = (
    0.05  # RS's held-out greedy reward against SFT's: +0.038 and -0.021 on the chains of two machine kinds
)


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


def rs_job(world_dir: Path, tokenizer_dir: Path, *extra: str) -> Any:
    from paddock.config import RejectionJob, load_config

    job = load_config(
        RejectionJob,
        REPO / "jobs/configs/tiny/rejection_sampling.yaml",
        [
            *rlhf_overrides(world_dir, tokenizer_dir),
            "policy=models:/tiny-sft@latest",
            f"rejection.prompts={world_dir}/prompts/train.parquet",
            *extra,
        ],
    )
    # The shipped fine-tuning settings, pointed at the test world.
    job.sft_overrides = [
        *job.sft_overrides,
        f"tokenizer={tokenizer_dir}",
        f"data.test={world_dir}/sft/test.parquet",
        "data.seq_len=128",
    ]
    return job


@pytest.fixture(scope="module")
def rs(chain, world_dir: Path, tokenizer_dir: Path):
    from paddock import rejection

    return rejection.run(rs_job(world_dir, tokenizer_dir))


def test_best_of_n_maximum_rises_while_the_median_stays_flat(rs, results):
    maxima, medians = rs.best_of_n_max, rs.best_of_n_median
    results(
        f"RS best of N=1..8: max {[round(x, 3) for x in maxima]}, median {[round(x, 3) for x in medians]}"
    )
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(maxima)), "E[max of N] cannot fall with N"
    assert maxima[-1] - maxima[0] > 2 * abs(medians[-1] - medians[0])
    assert rs.kept > 0 and rs.mean_best_reward > rs.mean_reward


def test_rejection_sampled_model_keeps_sft_s_held_out_reward(rs, chain, world_dir: Path, results):
    """RS fine-tunes on the best of 8 answers to the training prompts (the selection itself is the test above);
    on held-out prompts its greedy reward against SFT's depends on the chain the machine builds: +0.038 on one kind
    (0.853 against 0.815), -0.021 on another (0.853 against 0.874); sampled at the RS temperature, 0.855 against
    0.843 on the latter (4 seeds, spread +-0.02 each). So the test asks for no loss beyond RS_SLACK, not a gain."""
    sft = held_out_scores(chain["sft"].checkpoint_dir, chain, world_dir)
    rsm = held_out_scores(rs.finetune.checkpoint_dir, chain, world_dir)
    results(f"held-out greedy, SFT: {_shown(sft)}")
    results(f"held-out greedy, RS:  {_shown(rsm)}")
    assert rsm["reward_combined"] > sft["reward_combined"] - RS_SLACK, (sft, rsm)


def test_a_rerun_of_the_round_reuses_its_scored_samples(
    rs, world_dir: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """A rerun of the round after a kill (in the fine-tuning, say) reads the round's scored samples back instead of
    drawing them again, and keeps the same answers; other sampling settings draw them again."""
    from paddock import rejection

    kept = pq.read_table(rs.dataset).to_pylist()

    def no_sampling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sampled again")

    monkeypatch.setattr(rejection, "sample_and_score", no_sampling)
    monkeypatch.setattr(
        rejection, "run_supervised", lambda *args, **kwargs: None
    )  # the fine-tune is its own test
    again = rejection.run(rs_job(world_dir, tokenizer_dir))
    assert "[rejection_sampling] reusing" in capsys.readouterr().out
    assert pq.read_table(again.dataset).to_pylist() == kept
    assert (again.best_of_n_max, again.best_of_n_median) == (rs.best_of_n_max, rs.best_of_n_median)
    with pytest.raises(AssertionError, match="sampled again"):
        rejection.run(rs_job(world_dir, tokenizer_dir, "rejection.k=4"))


def ppo_job(world_dir: Path, tokenizer_dir: Path, *extra: str) -> Any:
    from paddock.config import PPOJob, load_config

    return load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            *rlhf_overrides(world_dir, tokenizer_dir),
            "policy=models:/tiny-rs@latest",
            f"ppo.prompts={world_dir}/prompts/train.parquet",
            f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def ppo(rs, world_dir: Path, tokenizer_dir: Path):
    """The tiny PPO config from the RS model, undisturbed: the run whose quality is asserted."""
    from paddock.ppo.loop import run

    return run(
        ppo_job(
            world_dir,
            tokenizer_dir,
            f"ppo.kl_limit={KL_BOUND}",
            f"ppo.iterations={ITERATIONS}",
            # Many samples an iteration and a few large mini-batches, as the paper's 512 / 64. At 64 prompts and
            # mini-batches of 16 the gradient was mostly sampling noise (README, "RLHF").
            f"ppo.batch_prompts={BATCH}",
            "ppo.mini_batch=64",
            f"optim.lr={LR}",
        )
    )


def _kill_all(match: str) -> int:
    import psutil

    pids = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(match in part for part in (p.info["cmdline"] or []))
    ]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


@pytest.fixture(scope="module")
def ppo_faults(rs, home: Path, world_dir: Path, tokenizer_dir: Path):
    """A short PPO run (4 iterations of 32 prompts, evaluated and checkpointed every 2) with faults at exact
    points of the driver's flow, not at times:

    - once iteration 1's weights are received, a rollout worker and the reference scorer are killed; Ray restarts
      them with their start weights, so the worker's next rows carry version 0 and it gets the weights from its
      peer; the next publication's group takes the restarted worker in;
    - at the evaluation of iteration 2, once the learners' checkpoint of iteration 2 is committed, every learner
      process is SIGKILLed: rank 0 sent those weights and is gone. That evaluation is made the best so far, so
      the best policy is kept after its publisher died: the case where paddock once registered its starting
      weights as "best iteration 5" (issue 16). The run picks its best by the world's verifiers
      (``select_by: verifiers``, with sampled safety answers): the evaluation's helpfulness accuracy is raised by
      1 and its reward lowered by 1, so by reward it could never be best;
    - once iteration 3's weights are received, the value scorer is killed; Ray restarts it with its start weights,
      so batch 3's values come back under version 0 while the learners wait for that batch: the driver asks them
      for the version again, and they send it (the same version, attempt 1) instead of both sides waiting out
      ``take_timeout_s`` (a stall seen once in the multi-node test before the resend existed).
    """
    import ray
    from paddock.ppo import loop

    killed: list[str] = []
    boosted: list[int] = []
    taken: list[tuple[int, int, int]] = []  # (version, attempt, iteration) of every publication received
    take, evaluate, evaluate_policy = loop.Driver.take, loop.Driver.evaluate, loop.evaluate_policy

    def take_then_kill(self: Any, pub: Any) -> None:
        take(self, pub)
        taken.append((pub.version, pub.attempt, pub.iteration))
        if pub.iteration == 1 and not killed:
            ray.kill(self.actors.workers[0], no_restart=False)
            ray.kill(self.actors.reference, no_restart=False)
            killed.extend(["rollout", "scorer"])
        if pub.iteration == 3 and "value" not in killed:
            ray.kill(self.actors.value, no_restart=False)
            killed.append("value")

    def evaluate_after_killing_learners(self: Any, pub: Any) -> None:
        if pub.iteration == 2 and "learners" not in killed:
            snapshots = home / "ray_results"
            deadline = time.monotonic() + 300
            while not list(
                snapshots.glob(f"{self.job.registry_prefix}-ppo-*/checkpoint_manager_snapshot.json")
            ):
                assert time.monotonic() < deadline, "the learners' checkpoint of iteration 2 never arrived"
                time.sleep(0.2)
            assert _kill_all("RayTrainWorker") >= 1
            killed.append("learners")
            boosted.append(pub.iteration)
        evaluate(self, pub)

    def boosted_evaluation(*args: Any, **kwargs: Any) -> Any:
        metrics, greedy = evaluate_policy(*args, **kwargs)
        if boosted:
            metrics["eval/helpfulness_accuracy"] += 1.0
            metrics["eval/reward_combined"] -= 1.0
            boosted.clear()
        return metrics, greedy

    job = ppo_job(
        world_dir,
        tokenizer_dir,
        "registry_prefix=faults",
        "ppo.iterations=4",
        "ppo.batch_prompts=32",
        "ppo.mini_batch=16",
        "ppo.eval_every=2",
        "ppo.eval_max_prompts=16",
        "ppo.checkpoint_every=2",
        "ppo.select_by=verifiers",
        "ppo.eval_safety_samples=2",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Driver, "take", take_then_kill)
        mp.setattr(loop.Driver, "evaluate", evaluate_after_killing_learners)
        mp.setattr(loop, "evaluate_policy", boosted_evaluation)
        result = loop.run(job)
    return result, killed, taken


@pytest.mark.reliability
def test_ppo_recovers_from_a_killed_rollout_worker_scorer_and_learners(ppo_faults):
    result, killed, taken = ppo_faults
    assert killed == ["rollout", "scorer", "learners", "value"], killed
    assert result.iterations == 4 and result.stop_reason == "completed"
    # The learners came back from their checkpoint; the restarted rollout worker stamped its rows with its start
    # version, so its peer passed it the weights and it was asked again.
    assert result.restarts["learners"] >= 1 and result.restarts["rollout_reloads"] >= 1
    b: dict[str, Any] = result.buffer
    assert b["rows_in"] == b["rows_out"] + b["rows_dropped"] + b["rows_held"] and b["reconciles"]
    assert b["rows_out"] >= 4 * 32
    # The value scorer lost iteration 3's weights: the learners sent that version again rather than a new one,
    # and the driver took it (without counting a learner restart: restarted learners publish a new version).
    [(version, attempt, iteration)] = [t for t in taken if t[1] > 0]
    assert attempt == 1 and iteration == 3 and (version, 0, 3) in taken, taken
    assert result.restarts["resends"] == 1, result.restarts
    assert [t[0] for t in taken] == sorted(t[0] for t in taken), taken


@pytest.mark.reliability
def test_the_registered_best_policy_holds_the_evaluated_weights_after_a_learner_restart(
    ppo_faults, rs, world_dir: Path
):
    from paddock import tracking
    from paddock.models import checkpoint_digest

    result, *_ = ppo_faults
    assert result.best_iteration == 2  # the evaluation made best, just after its publisher was killed
    run = tracking.configure().get_run(result.run_id)
    evaluated = run.data.tags["paddock.eval_digest.iter2"]
    best = result.checkpoint_dir
    assert (best / "ITERATION").read_text() == "2" and (best / "DIGEST").read_text() == evaluated
    assert checkpoint_digest(best) == evaluated != checkpoint_digest(rs.finetune.checkpoint_dir)
    name, version = tracking.model_version(result.model_uri)
    assert tracking.version_digest(name, version) == evaluated
    registered = tracking.version_metrics(name, version)
    assert registered["ppo/best_iteration"] == 2
    # chosen by the verifiers, whose safety rates read two sampled answers to each distinct unsafe or borderline
    # validation prompt; the registered metrics are that evaluation's
    import pyarrow.parquet as pq
    from paddock.evaluate import safety_set

    valid = pq.read_table(world_dir / "prompts" / "valid.parquet").to_pylist()
    evals = {int(e["iteration"]): e for e in result.evals}
    assert set(evals) == {0, 2, 4}
    assert all(e["eval/safety_answers"] == 2 * len(safety_set(valid, 64)) for e in evals.values())
    assert evals[2]["eval/reward_combined"] < min(
        evals[0]["eval/reward_combined"], evals[4]["eval/reward_combined"]
    )
    assert registered["ppo/best_eval_score"] == pytest.approx(
        evals[2]["eval/helpfulness_accuracy"] - evals[2]["eval/safety_violation_rate"]
    )
    assert registered["eval/helpfulness_accuracy"] == evals[2]["eval/helpfulness_accuracy"] > 1.0


@pytest.mark.reliability
def test_ppo_goes_on_without_a_rollout_worker_dead_for_good(rs, world_dir: Path, tokenizer_dir: Path):
    """A rollout worker killed for good (no restart left) once iteration 1's weights are received: batch 1's
    sampling meets it dead, it leaves the run, the other worker samples the whole batch, and the hub sizes every
    later publication's group for one receiving rank, so no stream waits for the dead one (before, every
    publication after the death waited ``weight_sync_timeout_s`` for it and the run ended)."""
    from paddock.ppo import loop

    taken: list[tuple[int, int, int, int | None]] = []  # (version, attempt, iteration, receivers)
    take = loop.Driver.take

    def take_then_kill(self: Any, pub: Any) -> None:
        take(self, pub)
        taken.append((pub.version, pub.attempt, pub.iteration, pub.receivers))
        if pub.iteration == 1 and len(self.actors.workers) == 2:
            kill_and_wait(self.actors.workers[1])

    job = ppo_job(
        world_dir,
        tokenizer_dir,
        "registry_prefix=lostworker",
        "ppo.iterations=3",
        "ppo.batch_prompts=16",
        "ppo.mini_batch=16",
        "ppo.eval_every=3",
        "ppo.eval_max_prompts=8",
        "ppo.weight_sync_timeout_s=120",  # a group waiting for the dead worker would fail the test's time
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Driver, "take", take_then_kill)
        result = loop.run(job)
    assert result.iterations == 3 and result.stop_reason == "completed"
    assert result.restarts["rollout_workers_lost"] == 1 and result.restarts["resends"] == 0, result.restarts
    # versions 1 and 2 went to both workers' ranks (the hub not told otherwise: None), 3 and 4 to the one left
    assert taken == [(1, 0, 0, None), (2, 0, 1, None), (3, 0, 2, 1), (4, 0, 3, 1)], taken
    assert result.buffer["rows_out"] >= 3 * 16
    assert {int(e["iteration"]) for e in result.evals} == {0, 3}


def test_ppo_raises_its_reward_within_the_kl_bound_and_registers_what_it_measured(
    ppo, rs, chain, world_dir: Path, results
):
    from paddock import tracking
    from paddock.models import checkpoint_digest

    result = ppo
    evals = {int(e["iteration"]): e for e in result.evals}
    train = [h["ppo/reward_combined"] for h in result.history if "ppo/reward_combined" in h]
    gain = sum(train[-3:]) / 3 - train[0]
    kls = [h["ppo/kl"] for h in result.history if "ppo/kl" in h]
    results(
        f"PPO training reward by iteration: {[round(r, 4) for r in train]}; last three - first = {gain:+.4f}"
    )
    results(
        f"PPO validation reward by iteration: {[(i, round(e['eval/reward_combined'], 4)) for i, e in evals.items()]}"
    )
    results(
        f"PPO KL per answer: max {max(kls):.3f} (bound {KL_BOUND}), best iteration {result.best_iteration}"
    )
    # What PPO optimises, on 256 fresh samples an iteration: its mean rises (TRAIN_GAIN, with the measured spread).
    assert len(train) == ITERATIONS and gain > TRAIN_GAIN, (train, gain)
    assert kls and max(kls) < KL_BOUND
    # The registered policy is the best evaluation's, weights and all.
    assert result.best_iteration is not None
    assert evals[result.best_iteration]["eval/reward_combined"] >= evals[0]["eval/reward_combined"]
    tags = tracking.configure().get_run(result.run_id).data.tags
    assert (
        checkpoint_digest(result.checkpoint_dir) == tags[f"paddock.eval_digest.iter{result.best_iteration}"]
    )
    # A user's view: greedy answers of the registered model to the test prompts against its start's, by reward
    # (no loss beyond the noise between evaluations) and by the verifiers.
    before = held_out_scores(rs.finetune.checkpoint_dir, chain, world_dir)
    after = held_out_scores(result.checkpoint_dir, chain, world_dir)
    p = worse_than_chance(before["correct"], after["correct"])
    results(f"held-out greedy, PPO start (RS): {_shown(before)}")
    results(f"held-out greedy, PPO: {_shown(after)}; verdicts lost vs gained: one-sided McNemar p={p:.3f}")
    assert after["reward_combined"] > before["reward_combined"] - GREEDY_SLACK, (before, after)
    # The verifiers' verdicts depend on the chain the machine builds: on one kind PPO kept them (McNemar p 0.5-1.0
    # over three seeds), on another it lost 6 right answers and gained none (p=0.016) while its greedy reward rose
    # 0.853 -> 0.933: the tiny reward models pay for what the verifiers call wrong, and PPO finds it (issue 22).
    # What paddock guarantees on any chain is that such a model is not promoted: the shipped relative gates, held
    # against SFT's verdicts on the same prompts, refuse exactly the models that answer fewer of them right or
    # violate more.
    from paddock.config import PromoteJob, load_config
    from paddock.serving.promote import check_gates

    sft = held_out_scores(chain["sft"].checkpoint_dir, chain, world_dir)
    promote = load_config(PromoteJob, REPO / "jobs/configs/tiny/promote.yaml")
    logged = {f"eval/{k}": v for k, v in after.items() if k != "correct"}
    baseline = {f"eval/{k}": v for k, v in sft.items() if k != "correct"}
    relative = [c for c in check_gates(promote, logged, baseline, "tiny-sft") if c.against]
    assert {c.metric for c in relative} == {"eval/helpfulness_accuracy", "eval/safety_violation_rate"}
    worse = (
        after["helpfulness_accuracy"] < sft["helpfulness_accuracy"]
        or after["safety_violation_rate"] > sft["safety_violation_rate"]
    )
    results(f"PPO against SFT's ground truth: {'; '.join(c.describe() for c in relative)}")
    assert all(c.passed for c in relative) is not worse, [c.describe() for c in relative]


def test_ppo_logs_its_metrics_plot_and_registered_model(ppo):
    from paddock import tracking

    result = ppo
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
    # Each version streamed the policy and the value model in fp32 (the CPU inference precision) to the workers.
    synced = {
        int(h["iteration"]): h["ppo/weight_sync_gb"] for h in result.history if "ppo/weight_sync_gb" in h
    }
    assert set(synced) >= {int(h["iteration"]) for h in result.history if "ppo/policy_version" in h}
    assert len(set(synced.values())) == 1 and 0.005 < synced[0] < 0.05


def test_async_colocated_ppo_overlaps_generation_with_training_within_the_staleness_limit(
    rs, world_dir: Path, tokenizer_dir: Path
):
    """Async mode with the four scorers in one actor (``ppo.placement: colocated``): the value model's weights
    reach it over the publication's group like a separate scorer's."""
    from paddock.ppo.loop import run

    result = run(
        ppo_job(
            world_dir,
            tokenizer_dir,
            "registry_prefix=async",
            "ppo.mode=async",
            "ppo.placement=colocated",
            "ppo.iterations=4",
            "ppo.batch_prompts=32",
            "ppo.mini_batch=16",
            "ppo.eval_every=100",
            "ppo.eval_max_prompts=8",
        )
    )
    b = result.buffer
    assert result.iterations == 4 and b["reconciles"]
    # Batches sampled one version behind were trained on: generation ran ahead, but never more than one.
    assert 0 < b["staleness_mean"] <= 1.0
    assert b["rows_out"] == 4 * 32


def test_rloo_ppo_runs_without_a_value_model_and_centres_advantages_per_prompt(
    rs, world_dir: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """``ppo.advantage: rloo``: no value scorer or value learner; each prompt is answered ``samples_per_prompt``
    times side by side, and each answer's advantage is its return less its prompt's other answers' mean, so the
    advantages of a prompt's answers sum to zero in the spilled experience; only the policy is published. The loss
    weighs every answer the same (``ppo.loss_aggregation=seq-mean-token-mean``, the learners' other path). One
    reward model named for both rewards (as the TRL benchmark runs) is held and run once, its score read as both.
    The run is told its learners and rollout workers share GPUs (``PPOJob.colocated_gpus``, which needs
    ``train.use_gpu``), so it goes the way of such a run on a CPU: the learners start first and the rollout workers
    after their first publication, and the two take turns by default (``ppo.engine_sleep``,
    ``ppo.learner_offload``): the engines sleep after sampling, the learners move their states to the host after
    publishing, and the driver samples only once the learners have said so."""
    from paddock.config import PPOJob, paddock_home
    from paddock.models import load_causal_lm
    from paddock.ppo.loop import run

    monkeypatch.setattr(PPOJob, "colocated_gpus", property(lambda self: True))

    k = 4
    result = run(
        ppo_job(
            world_dir,
            tokenizer_dir,
            "registry_prefix=rloo",
            "ppo.advantage=rloo",
            f"ppo.samples_per_prompt={k}",
            "ppo.placement=colocated",
            "ppo.iterations=3",
            "ppo.batch_prompts=8",
            "ppo.mini_batch=16",
            "ppo.eval_every=100",
            "ppo.eval_max_prompts=8",
            "ppo.spill=true",
            "ppo.loss_aggregation=seq-mean-token-mean",
            "reward_safety=models:/tiny-rm-helpfulness@latest",
            "plan.check=false",  # the planner would look for the GPUs the run is told it shares
        )
    )
    assert result.iterations == 3 and result.model_uri.startswith("models:/rloo-ppo/")
    assert result.buffer["rows_out"] == 3 * 8 * k
    trained = [h for h in result.history if "ppo/policy_loss" in h]
    assert len(trained) == 3 and not [h for h in result.history if "ppo/value_loss" in h]
    files = sorted((paddock_home() / "runs" / "rloo-ppo" / "spill").glob("*/batch-*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 3 * 8 * k
    for g in range(0, len(rows), k):
        group = rows[g : g + k]
        assert len({r["prompt_id"] for r in group}) == 1
        assert all(r["advantages"] and len(set(r["advantages"])) == 1 and r["values"] == [] for r in group)
        per_answer = [r["advantages"][0] for r in group]
        assert abs(sum(per_answer)) < 1e-4 * k
    assert any(abs(r["advantages"][0]) > 0.1 for r in rows)  # not all zero
    assert all(r["reward_safety"] == r["reward_helpfulness"] for r in rows)
    assert len({r["reward_helpfulness"] for r in rows}) > k
    # what streamed each iteration is the policy alone: its fp32 bytes (the GAE runs send the value model too)
    synced = {h["ppo/weight_sync_gb"] for h in result.history if "ppo/weight_sync_gb" in h}
    policy_bytes = sum(p.numel() * 4 for p in load_causal_lm(result.checkpoint_dir).parameters())
    assert len(synced) == 1 and synced.pop() == pytest.approx(policy_bytes / 1e9, rel=0.01)
    # turns: every batch's engines slept (nothing to free on a CPU), every update woke the learners' states and
    # every publication's sampling waited for them to rest again (the last one's after the final export)
    batches = [h for h in result.history if "ppo/generate_s" in h]
    assert len(batches) == 3 and all(h["ppo/engine_freed_gb"] == 0.0 for h in batches)
    assert all(h["ppo/learner_offload_s"] > 0 for h in trained)
    waits = [h for h in result.history if "ppo/weight_sync_s" in h]
    assert len(waits) == 4 and all("ppo/learner_rest_wait_s" in h for h in waits)
