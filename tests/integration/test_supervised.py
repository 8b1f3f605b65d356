"""Pretraining, SFT and the reward models on the tiny world: 2 Ray Train workers, ZeRO-2, MLflow.

The seeded chain (pretrain -> SFT -> both RMs) is trained once per session (conftest); these tests read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from chain import REPO, overrides
from paddock.config import PretrainJob, load_config
from ray.train import UserCallback

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# First pretraining losses of the seeded tiny chain (tests/integration/conftest.py: 2 workers, ZeRO-2, CPU
# fp32). A change that moves them changed the model, data order or optimiser: check it was meant, then update.
# Last moved by packing that keeps documents apart in attention (position ids restart at each document; before:
# 6.9035, 6.7642, 6.6286, 6.4585, 6.2994).
GOLDEN_FIRST_LOSSES = [6.8955, 6.7525, 6.6130, 6.4469, 6.2834]


def test_pretraining_loss_falls_and_matches_golden_values(chain):
    history = chain["pretrain"].history
    losses = [h["train/loss"] for h in history]
    assert [h["step"] for h in history] == list(range(1, 301))
    assert losses[-1] < 0.6 * losses[0]
    assert history[-1]["eval/loss"] < 0.6 * losses[0]
    assert all(h["train/tokens_per_s"] > 0 and 0 < h["train/mfu"] < 5 for h in history)
    print("first pretraining losses:", [round(x, 4) for x in losses[:5]])
    if GOLDEN_FIRST_LOSSES is not None:
        assert losses[:5] == pytest.approx(GOLDEN_FIRST_LOSSES, abs=2e-3)


def test_stages_leave_mlflow_runs_and_registered_models(chain):
    import mlflow
    from paddock import tracking

    client = tracking.configure()
    for name, result in (
        ("tiny-base", chain["pretrain"]),
        ("tiny-sft", chain["sft"]),
        ("tiny-rm-helpfulness", chain["rm_h"]),
        ("tiny-rm-safety", chain["rm_s"]),
    ):
        assert result.model_uri == f"models:/{name}/1"
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["train.zero_stage"] == "2" and "optim.lr" in run.data.params
        assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= set(
            run.data.metrics
        )
        assert len(client.get_metric_history(result.run_id, "train/loss")) == len(result.history)
        artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
        assert "plots/loss.png" in artifacts
        assert run.inputs.dataset_inputs, "datasets are logged as run inputs"
        assert (result.checkpoint_dir / "model.safetensors").is_file() and (
            result.checkpoint_dir / "tokenizer.json"
        ).is_file()
    # The SFT stage resolved its upstream through the registry.
    assert client.get_run(chain["sft"].run_id).data.tags["paddock.upstream"] == "models:/tiny-base@latest"
    assert mlflow.get_tracking_uri().startswith("sqlite:///")


def test_sft_model_answers_in_the_chat_format_and_stops(chain, world_dir: Path):
    from paddock.generate import chat
    from paddock.models import load_causal_lm
    from paddock.tokenizer import load_tokenizer

    model, tok = (
        load_causal_lm(chain["sft"].checkpoint_dir).eval(),
        load_tokenizer(chain["sft"].checkpoint_dir),
    )
    prompts = pq.read_table(world_dir / "prompts" / "test.parquet").to_pylist()[:30]
    # A refusal is ~60 tokens with the tests' 1000-token vocabulary: leave room for it.
    outs = [chat(model, tok, p["turns"], max_new_tokens=96) for p in prompts]
    finished = sum(o.finished for o in outs)
    print(f"{finished}/{len(outs)} answers end with EOS:", [o.text for o in outs][:6])
    assert finished >= 0.75 * len(outs), [o.text for o in outs]
    assert not any("[INST]" in o.text or "<<SYS>>" in o.text for o in outs)
    assert sum(o.text.endswith((".", "!", "?")) for o in outs if o.finished) >= 0.8 * finished


def test_helpfulness_rm_prefers_chosen_and_clear_pairs_most(chain):
    m = chain["rm_h"].metrics
    assert m["eval/accuracy"] > 0.65
    assert m["eval/accuracy/significantly_better"] > m["eval/accuracy/negligibly_better"]


def test_safety_rm_separates_safe_from_unsafe_answers(chain):
    m = chain["rm_s"].metrics
    assert m["eval/accuracy"] > 0.75
    # far above chance (0.5) on the tests' world: its safe-against-unsafe test pairs are few, a pair is ~0.05, and
    # fresh clones have measured 0.895 (2ee6b3a) and above 0.9 before
    assert m["eval/accuracy/safe_vs_unsafe"] > 0.8


def test_sft_loss_only_on_answers_reaches_low_eval_loss(chain):
    history = chain["sft"].history
    assert history[-1]["eval/loss"] < history[0]["train/loss"]


def test_local_mode_trains_like_two_workers(chain, world_dir: Path, tokenizer_dir: Path):
    """``train.num_workers: 0`` runs the loop in the driver (how the tiny RS, GAtt and CD fine-tunes run): one
    rank taking two micro-batches a step sees the sequences two workers see, so its losses over SFT's 10 warmup
    steps (where the schedule does not depend on the run's length, as long as the run is no shorter than the
    warmup) are the chain's SFT losses (4.8e-7 apart on the demo's SFT); the model is registered."""
    from paddock.config import SFTJob
    from paddock.train.stage import run_supervised

    o = overrides(world_dir, tokenizer_dir)["sft"]
    local = [*o, "train.num_workers=0", "train.grad_accum=2", "train.max_steps=10", "registry_prefix=local"]
    result = run_supervised(load_config(SFTJob, REPO / "jobs/configs/tiny/sft.yaml", local), "sft")
    losses = [h["train/loss"] for h in result.history]
    two_workers = [h["train/loss"] for h in chain["sft"].history[:10]]
    print("local:", [round(x, 5) for x in losses], "two workers:", [round(x, 5) for x in two_workers])
    assert losses == pytest.approx(two_workers, abs=1e-4)
    assert (
        result.model_uri == "models:/local-sft/1" and (result.checkpoint_dir / "model.safetensors").is_file()
    )


def test_a_reward_ensemble_trains_its_members_and_scores_as_their_mean(
    chain, world_dir: Path, tokenizer_dir: Path
):
    """``reward.ensemble: 2``: two helpfulness RMs from seeds 0 and 1 (local mode, 8 steps each) registered as one
    version holding both, whose digest covers both; the run logs both members' curves and the ensemble's own eval
    accuracy; a scorer actor's model and the logged MLflow model score with the mean of the members' logits."""
    import mlflow
    import torch
    from paddock import tracking
    from paddock.config import RewardJob
    from paddock.models import checkpoint_digest, ensemble_members, load_scalar_model
    from paddock.rollout.actors import ScorerModel
    from paddock.rollout.core import reward_scores
    from paddock.tokenizer import load_tokenizer
    from paddock.train.stage import run_supervised

    o = overrides(world_dir, tokenizer_dir)["rm_h"]
    local = [*o, "reward.ensemble=2", "train.num_workers=0", "train.grad_accum=2", "train.max_steps=8"]
    job = load_config(
        RewardJob, REPO / "jobs/configs/tiny/reward_helpfulness.yaml", [*local, "registry_prefix=ens"]
    )
    result = run_supervised(job, "reward_helpfulness")
    out = result.checkpoint_dir
    assert result.model_uri == "models:/ens-rm-helpfulness/1"
    assert ensemble_members(out) == [out, out / "members" / "1"]
    client = tracking.configure()
    run = client.get_run(result.run_id)
    assert {"train/loss", "member1/train/loss", "eval/accuracy", "member1/eval/accuracy"} <= set(
        run.data.metrics
    )
    assert 0.0 <= run.data.metrics["ensemble/eval/accuracy"] <= 1.0
    assert run.data.metrics["ensemble/eval/pairs"] == run.data.metrics["eval/pairs"]
    losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    member1 = [m.value for m in client.get_metric_history(result.run_id, "member1/train/loss")]
    assert len(losses) == len(member1) == 8 and losses != member1  # another seed, another run
    assert "plots/loss_member1.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}
    version = client.get_model_version("ens-rm-helpfulness", "1")
    assert version.tags[tracking.DIGEST_TAG] == checkpoint_digest(out)

    # scored as the mean logit of the two, wherever a reward model scores
    pairs = pq.read_table(world_dir / "preferences" / "test.parquet").to_pylist()[:6]
    prompts, answers = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    tok = load_tokenizer(out)
    members = [load_scalar_model(m).eval() for m in ensemble_members(out)]
    logits = torch.stack([torch.logit(reward_scores(m, tok, prompts, answers, 256)) for m in members])
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the members disagree
    scorer = ScorerModel(str(out), "reward", seq_len=256)
    torch.testing.assert_close(
        torch.tensor(scorer.rewards(prompts, answers)), torch.sigmoid(logits.mean(0)), atol=1e-4, rtol=0
    )
    from transformers import AutoTokenizer

    text = "What is the capital of Peru?"
    ids = torch.tensor([AutoTokenizer.from_pretrained(out, local_files_only=True).encode(text)])  # as served
    with torch.no_grad():
        each = [float(m(input_ids=ids).logits[0, 0]) for m in members]
    served = mlflow.pyfunc.load_model(result.model_uri).predict([text])
    assert served == pytest.approx([sum(each) / 2], abs=1e-4)


def test_an_ensemble_trained_by_ray_train_workers_is_scored_in_a_ray_task_as_here(
    chain, world_dir: Path, tokenizer_dir: Path
):
    """``reward.ensemble: 2`` with Ray Train workers (two ranks a member, as on a cluster): the ensemble's eval runs
    in a Ray task with one worker's resources, reading the members' Ray Train checkpoints (their ``hf/``) from
    Ray Train's storage, and gives the metrics that scoring the registered members in this process gives."""
    from paddock import tracking
    from paddock.config import RewardJob
    from paddock.models import ensemble_members
    from paddock.train.loop import ensemble_eval
    from paddock.train.stage import ensemble_batches, prepare, run_supervised

    o = overrides(world_dir, tokenizer_dir)["rm_h"]  # train.num_workers=2
    sets = [*o, "reward.ensemble=2", "train.max_steps=4", "train.eval_every=4", "registry_prefix=ensray"]
    job = load_config(RewardJob, REPO / "jobs/configs/tiny/reward_helpfulness.yaml", sets)
    assert job.train.num_workers == 2
    result = run_supervised(job, "reward_helpfulness")
    m = tracking.configure().get_run(result.run_id).data.metrics
    members = ensemble_members(result.checkpoint_dir)
    batches = ensemble_batches(prepare(job, "reward_helpfulness"))
    here = ensemble_eval(members, batches, use_gpu=False)
    assert m["ensemble/eval/pairs"] == here["eval/pairs"] == m["eval/pairs"]
    assert m["ensemble/eval/margin"] == pytest.approx(here["eval/margin"], rel=1e-4, abs=1e-6)
    assert abs(m["ensemble/eval/accuracy"] - here["eval/accuracy"]) <= 1 / here["eval/pairs"]  # a tie at most
    # both members count: member 0 alone scores another margin
    alone = ensemble_eval(members[:1], batches, use_gpu=False)
    assert alone["eval/margin"] != pytest.approx(here["eval/margin"], rel=1e-3, abs=1e-5)


@pytest.mark.reliability
def test_killed_worker_resumes_to_the_same_loss(
    chain, home: Path, world_dir: Path, tokenizer_dir: Path, tmp_path
):
    """SIGKILL a Ray Train worker right after a checkpoint (step 10 or later) is registered, that checkpoint cut
    short: the restart passes over it for the whole one before it, and the run ends on the same loss as an
    uninterrupted run of the same config (same seed, data order and steps)."""
    from paddock.train.stage import run_supervised

    # Defined here, not at module level: the Train controller unpickles it, and a class local to a function is
    # sent by value (the test module is not importable on the controller's side).
    class DamageAndKill(UserCallback):
        """On the controller, at a fixed point of the run's flow: once the first checkpoint at or after ``step`` is
        registered (the one a restart is handed), cut its model file short, as a save cut off midway leaves it, and
        SIGKILL a Ray Train worker. The marker file records the damaged checkpoint's step."""

        def __init__(self, step: int, marker: str):
            self.step, self.marker = step, marker

        def after_report(self, run_context, metrics, checkpoint) -> None:  # type: ignore[no-untyped-def]
            import signal

            import psutil

            step = int(metrics[0]["step"])
            if checkpoint is None or Path(self.marker).exists() or step < self.step:
                return
            if (Path(checkpoint.path) / "state.json").exists():  # the final export: nothing left to resume
                return
            model_file = Path(checkpoint.path) / "ds" / f"step{step}" / "mp_rank_00_model_states.pt"
            model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
            # Ray titles worker processes "ray::RayTrainWorker..."; the embedded instance runs no State API.
            workers = [
                p
                for p in psutil.process_iter(["pid", "cmdline"])
                if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))
            ]
            os.kill(workers[0].info["pid"], signal.SIGKILL)
            Path(self.marker).write_text(str(step))

    o = overrides(world_dir, tokenizer_dir)
    short = [*o["pretrain"], "train.max_steps=25", "train.checkpoint_every=5", "train.eval_every=25"]
    clean = run_supervised(
        load_config(PretrainJob, REPO / "jobs/configs/tiny/pretrain.yaml", [*short, "registry_prefix=clean"]),
        "pretrain",
    )
    job = load_config(
        PretrainJob, REPO / "jobs/configs/tiny/pretrain.yaml", [*short, "registry_prefix=resume"]
    )
    marker = tmp_path / "killed"
    resumed = run_supervised(job, "pretrain", callbacks=[DamageAndKill(10, str(marker))])
    assert marker.exists(), "no worker was killed: the run ended before a checkpoint at step 10 or later"
    damaged = int(marker.read_text())
    steps = [h["step"] for h in resumed.history]
    print(f"damaged the checkpoint of step {damaged}; steps seen: {steps}")
    # Records reach the driver with each report, the damaged checkpoint's steps among them, before the kill.
    # A restart from the whole checkpoint before it (damaged - 5) runs the step after that one again; from the
    # damaged one it would not; from scratch, step 1 would run twice.
    assert sorted(set(steps)) == list(range(1, 26)), "every step ran, up to the last"
    assert steps.count(1) == 1, "the run restarted from a checkpoint, not step 0"
    assert steps.count(damaged - 4) == 2 and steps.count(damaged - 5) == 1, (
        f"it fell back past the damaged checkpoint of step {damaged} to step {damaged - 5}"
    )
    assert resumed.history[-1]["train/loss"] == pytest.approx(clean.history[-1]["train/loss"], abs=1e-4)
    assert resumed.history[-1]["eval/loss"] == pytest.approx(clean.history[-1]["eval/loss"], abs=1e-4)


def test_asha_sweep_over_sft_logs_nested_trials(chain, world_dir: Path, tokenizer_dir: Path):
    from paddock import tracking
    from paddock.config import SweepJob
    from paddock.train.sweep import run_sweep

    o = overrides(world_dir, tokenizer_dir)["sft"]
    job = load_config(
        SweepJob,
        REPO / "jobs/configs/tiny/sweep_sft.yaml",
        [
            "sweep.num_samples=2",
            "sweep.max_concurrent=2",  # side by side: one trial's worker start-up overlaps the other's steps
            "sweep.max_steps=10",
            "sweep.report_every=5",
            f"sweep.overrides={o!r}".replace("'", '"'),
        ],
    )
    result = run_sweep(job)
    assert len(result.trials) == 2 and all(not t["error"] for t in result.trials)
    assert result.best_metric == min(t["eval/loss"] for t in result.trials)
    assert 1e-4 <= result.best_config["optim.lr"] <= 3e-3 and result.best_config["optim.warmup_steps"] in (
        0,
        20,
    )
    client = tracking.configure()
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 2 and all(
        len(client.get_metric_history(c.info.run_id, "train/loss")) >= 5 for c in children
    )
