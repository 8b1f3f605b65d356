"""Hyperparameter sweeps of a supervised stage with Ray Tune's ASHA scheduler.

Train V2 pattern: each Tune trial is a function that builds the stage's ``TorchTrainer`` and runs it with
``TuneReportCallback``, which forwards the workers' reports to Tune. The data is prepared and validated once
on the driver and shared by all trials. MLflow stays single-writer: after the search, the driver logs one
parent run with a nested run per trial (its parameters and every step it ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from paddock import tracking
from paddock.config import JOBS, SupervisedJob, SweepJob, load_config, set_dotted, train_storage
from paddock.train.loop import LoopSpec
from paddock.train.stage import Prepared, make_trainer, prepare

STAGE_CONFIGS = {"pretrain": "pretrain", "sft": "sft", "reward_model": "reward_helpfulness"}


@dataclass
class SweepResult:
    best_config: dict[str, Any]
    best_metric: float
    parent_run_id: str
    trials: list[dict[str, Any]]


def trial_spec(base: LoopSpec, config: dict[str, Any], max_steps: int, report_every: int) -> LoopSpec:
    """The prepared spec with a trial's values: dotted keys of the stage config (``optim.lr`` ...)."""
    tree = base.model_dump(mode="json")
    for key, value in config.items():
        set_dotted(tree, key, value)
    tree["total_steps"] = max_steps
    tree["train"] |= {
        "max_steps": max_steps,
        "log_every": report_every,
        "eval_every": report_every,
        "checkpoint_every": max_steps * 10,
    }
    return LoopSpec.model_validate(tree)


def _trial(config: dict[str, Any], prepared: Prepared, max_steps: int, report_every: int) -> None:
    spec = trial_spec(prepared.spec, config, max_steps, report_every)
    name = f"{prepared.name}-sweep-{tune.get_context().get_trial_id()}"
    make_trainer(prepared, name, [TuneReportCallback()], spec=spec).fit()


def run_sweep(job: SweepJob) -> SweepResult:
    sw = job.sweep
    stage_job = load_config(JOBS[STAGE_CONFIGS[sw.stage]], sw.base_config, sw.overrides)
    assert isinstance(stage_job, SupervisedJob)
    if stage_job.train.num_workers == 0:
        raise ValueError(
            "train.num_workers: a sweep's trials run on Ray Train workers; give at least 1, got 0"
        )
    prepared = prepare(stage_job, sw.stage)
    space = {"optim.lr": tune.loguniform(sw.lr_min, sw.lr_max), sw.knob: tune.choice(sw.knob_values)}
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(
                _trial, prepared=prepared, max_steps=sw.max_steps, report_every=sw.report_every
            ),
            {"CPU": 0.01},
        ),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=sw.metric,
            mode=sw.mode,
            num_samples=sw.num_samples,
            max_concurrent_trials=sw.max_concurrent,
            scheduler=ASHAScheduler(
                max_t=max(1, sw.max_steps // sw.report_every),
                grace_period=sw.grace_period,
                reduction_factor=sw.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(name=f"{prepared.name}-sweep", storage_path=train_storage(), verbose=0),
    )
    grid = tuner.fit()
    best = grid.get_best_result()
    best_config = dict(best.config or {})
    trials: list[dict[str, Any]] = []
    with tracking.stage_run(
        job.experiment, f"sweep_{sw.stage}", job.model_dump(mode="json"), tags={"paddock.sweep": "parent"}
    ) as parent:
        for i in range(len(grid)):
            result = grid[i]
            frame = result.metrics_dataframe
            records = [
                r
                for rep in (frame["records"] if frame is not None and "records" in frame else [])
                for r in rep
            ]
            final = records[-1] if records else {}
            trials.append(
                {
                    "config": result.config or {},
                    "steps": len(records),
                    sw.metric: final.get(sw.metric),
                    "error": str(result.error or ""),
                }
            )
            with tracking.stage_run(
                job.experiment,
                f"trial-{result.path.rsplit('_', 2)[-2] if '_' in result.path else result.path}",
                {"trial": result.config or {}},
                tags={"paddock.sweep": "trial"},
                nested=True,
            ) as child:
                for r in records:
                    child.log_metrics(r, step=int(r["step"]))
        parent.log_params({f"best.{k}": v for k, v in best_config.items()})
        best_metric = float((best.metrics or {})[sw.metric])
        parent.log_metrics({f"best/{sw.metric}": best_metric}, step=0)
        print(
            f"[sweep] {len(trials)} trials; best {sw.metric} = {best_metric:.4f} with "
            + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best_config.items()
            )
        )
        for t in sorted(
            trials, key=lambda t: (t[sw.metric] is None, t[sw.metric] or 0), reverse=sw.mode == "max"
        ):
            m = t[sw.metric]
            print(
                f"  {t['config']}: {t['steps']} steps, {sw.metric} {m if m is None else round(float(m), 4)}"
            )
        return SweepResult(best_config, best_metric, parent.run_id, trials)
