"""The whole Llama 2 pipeline as one job: every stage in order, resumable, under one parent MLflow run.

world -> tokenizer -> pretraining -> SFT -> [preference rounds: new pairs from the latest model -> helpfulness and
safety RMs -> the reward-hacking monitor -> rejection sampling -> PPO -> ``{prefix}-rlhf-v<k>``] -> GAtt -> context
distillation -> evaluation of every chat model -> promotion of the best one that passes the gates (also registered
as ``{prefix}-chat``) -> held-out questions to the served endpoint, judged by the world's verifiers.

With ``rounds: N`` and a collect_preferences stage, the bracketed stages run N times, each round in its own MLflow
run nested in the parent's (``schedule`` and ``round_overrides`` say what each round changes); without one, they
run once as configured.

A state file under ``runs/pipeline-{prefix}/`` records each finished stage; rerunning after a failure or a kill
starts at the first unfinished one, inside the same parent run. At the end the pipeline writes a Markdown report
with plots (models against every evaluation metric, safety against helpfulness, GAtt adherence by turn), logs it
to the parent run, and gives every registered model version a model card (its description in the registry and an
artifact of its run).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paddock import atomic, tracking
from paddock.config import (
    JOBS,
    PIPELINE_STAGES,
    ROUND_STAGES,
    EvaluateJob,
    PipelineJob,
    PromoteJob,
    load_config,
    paddock_home,
)

TABLE_METRICS = (
    "eval/helpfulness_accuracy",
    "eval/safety_violation_rate",
    "eval/false_refusal_rate",
    "eval/judge/violation_rate",
    "eval/judge/refusal_rate_non_safety",
    "eval/reward_combined",
    "eval/greedy_reward_combined",
    "eval/reward_helpfulness",
    "eval/reward_safety",
    "eval/gatt_adherence/turn_2",
    "eval/gatt_adherence/turn_4",
    "eval/gatt_adherence/turn_6",
    "eval/perplexity",
)


def _runner(stage: str) -> Any:
    """The library function that runs a stage's job."""
    if stage == "import_data":
        from paddock.data import importers

        return importers.run
    if stage in ("world", "tokenizer"):
        from paddock import tokenizer, world

        return world.run if stage == "world" else tokenizer.run
    if stage in ("pretrain", "sft", "reward_helpfulness", "reward_safety"):
        from paddock.train.stage import run_supervised

        return lambda job: run_supervised(job, stage)
    if stage == "collect_preferences":
        from paddock.rlhf import preferences

        return preferences.run
    if stage == "rejection_sampling":
        from paddock import rejection

        return rejection.run
    if stage == "ppo":
        from paddock.ppo import loop

        return loop.run
    if stage == "gatt":
        from paddock.synth import gatt

        return gatt.run
    if stage == "context_distillation":
        from paddock.synth import distill

        return distill.run
    raise ValueError(f"no runner for stage {stage!r}")


class State:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"done": {}}

    def save(self) -> None:
        atomic.write_text(self.path, json.dumps(self.data, indent=2))

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def finish(self, stage: str, info: dict[str, Any]) -> None:
        self.data["done"][stage] = info
        self.save()


@dataclass(frozen=True)
class Step:
    """One step of a pipeline run: a configured stage, or one the pipeline adds to a round (the reward-hacking
    monitor, the round model's registration)."""

    key: str  # the state file's name for it: the stage, with @k in rounds after the first
    stage: str
    round: int = 0  # 0: not a round's step

    @property
    def configured(self) -> bool:
        return self.stage in PIPELINE_STAGES


def _key(stage: str, round_: int) -> str:
    return stage if round_ <= 1 else f"{stage}@{round_}"


def schedule(job: PipelineJob) -> list[Step]:
    """Every step in order: the stages before the rounds, each round's stages (and, when rounds collect
    preferences, the monitor after the reward models and the round model's registration after PPO), the rest."""
    present = [s for s in PIPELINE_STAGES if s in job.stages and s not in job.skip]
    first, last = PIPELINE_STAGES.index(ROUND_STAGES[0]), PIPELINE_STAGES.index(ROUND_STAGES[-1])
    steps = [Step(s, s) for s in present if PIPELINE_STAGES.index(s) < first]
    in_round = [s for s in present if s in ROUND_STAGES]
    reward = [s for s in in_round if s.startswith("reward_")]
    for k in range(1, job.rounds + 1):
        for s in in_round:
            steps.append(Step(_key(s, k), s, k))
            if job.collects and reward and s == reward[-1]:
                steps.append(Step(_key("reward_monitor", k), "reward_monitor", k))
            if job.collects and s == "ppo":
                steps.append(Step(_key("register_rlhf", k), "register_rlhf", k))
    steps += [Step(s, s) for s in present if PIPELINE_STAGES.index(s) > last]
    return steps


def round_overrides(job: PipelineJob, step: Step) -> list[str]:
    """What a round changes in a stage's config: the round number, the model it starts from (round k-1's), and
    the reward models' training data (the static pairs and every round's so far). None without preference
    collection: then the stages run as configured."""
    if not job.collects or not step.round:
        return []
    p, k = job.registry_prefix, step.round
    start = f"models:/{p}-sft@latest" if k == 1 else f"models:/{p}-rlhf-v{k - 1}@latest"
    if step.stage == "collect_preferences":
        # From round 2 the reward models in use (the previous round's) pick the answer to label (collect.samples)
        judges = [f"reward_{kind}=models:/{p}-rm-{kind}@latest" for kind in ("helpfulness", "safety")]
        return [f"collect.round={k}", f"models=[{start}]", *(judges if k > 1 else [])]
    if step.stage in ("reward_helpfulness", "reward_safety"):
        kind = step.stage.removeprefix("reward_")
        warm = [f"model.init_from=models:/{p}-rm-{kind}@latest"] if job.reward_warm_start and k > 1 else []
        return [f"data.train=runs/{p}-preferences/round{k}/train.parquet", *warm]
    if step.stage == "rejection_sampling":
        return [f"rejection.round={k}", *([f"policy={start}"] if k > 1 else [])]
    return []


def stage_configs(job: PipelineJob, steps: list[Step]) -> dict[str, Any]:
    """Each configured step's job config. Stage runs go to the pipeline's experiment, so that MLflow shows them
    nested under its parent run, with the pipeline's seed; then the round's overrides, then the stage's own (which
    win). The world's content has a seed of its own (world.seed): seeds change the training, not the data."""
    return {
        step.key: load_config(
            JOBS[step.stage],
            job.stages[step.stage].config,
            [
                f"experiment={job.experiment}",
                f"seed={job.seed}",
                *round_overrides(job, step),
                *([f"reward.ensemble={job.reward_ensemble}"] if step.stage.startswith("reward_") else []),
                *job.stages[step.stage].overrides,
            ],
        )
        for step in steps
        if step.configured
    }


def run(job: PipelineJob) -> dict[str, Any]:
    prefix = job.registry_prefix
    work = paddock_home() / "runs" / f"pipeline-{prefix}"
    state = State(work / "state.json")
    steps = schedule(job)
    configs = stage_configs(job, steps)  # every stage's, every round's: checked before anything runs
    if job.plan.check and job.plan.shape and job.plan.cluster:
        # Every stage planned up front against the named cluster (the shapes are known before the models exist);
        # without a shape, each stage checks its own plan when it starts.
        from paddock import plan

        plan.plan_any(job, "pipeline", plan.Cluster.from_yaml(job.plan.cluster)).refuse()
    todo = [step for step in steps if not state.done(step.key)]
    done = [step.key for step in steps if state.done(step.key)]
    if done:
        print(
            f"[pipeline] resuming: {', '.join(done)} already done; next: {todo[0].key if todo else 'nothing'}",
            flush=True,
        )
    start = time.monotonic()
    with tracking.parent_run(job.experiment, f"pipeline-{prefix}", state.data.get("parent_run_id")) as parent:
        state.data["parent_run_id"] = parent
        state.save()
        # A round's run stays open over its steps; a step's error reaches it through the stack, which ends it FAILED
        with contextlib.ExitStack() as rounds:
            current_round = 0
            for n, step in enumerate(todo, 1):
                if step.round != current_round:
                    rounds.close()  # the previous round's run ends FINISHED
                    current_round = step.round
                    if step.round and job.collects:
                        runs = state.data.setdefault("round_runs", {})
                        runs[str(step.round)] = rounds.enter_context(
                            tracking.round_run(job.experiment, step.round, runs.get(str(step.round)))
                        )
                        state.save()
                t0 = time.monotonic()
                what = job.stages[step.stage].config if step.configured else "added by the pipeline"
                print(f"\n[pipeline] stage {len(done) + n}/{len(steps)}: {step.key} ({what})", flush=True)
                info = run_step(job, step, configs, state)
                info["seconds"] = time.monotonic() - t0
                state.finish(step.key, info)
                print(f"[pipeline] {step.key} done in {info['seconds']:.0f}s", flush=True)
        metrics = state.data["done"].get("evaluate", {}).get("metrics", {})
        report = write_report(job, metrics, state.data["done"], work / "report", parent)
        tracking.log_artifacts(parent, report.parent, "report")
        write_model_cards(job, metrics, configs)
        print(
            f"\n[pipeline] finished in {(time.monotonic() - start) / 60:.1f} min; report: {report}",
            flush=True,
        )
        print(table(metrics), flush=True)
        if job.collects:
            print(rounds_table(job, state.data["done"], metrics), flush=True)
        home = paddock_home()
        print(f"follow the runs: mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db", flush=True)
        promote_config = job.stages["promote"].config if "promote" in job.stages else None
        settings = f" --config {promote_config}" if promote_config else ""
        print(f"serve the champion: python jobs/serve.py --model {prefix}-chat{settings}", flush=True)
    return state.data


def run_step(job: PipelineJob, step: Step, configs: dict[str, Any], state: State) -> dict[str, Any]:
    """Run one step; returns what the state file records for it."""
    done = state.data["done"]
    if step.stage == "evaluate":
        return {"metrics": evaluate_models(job, configs[step.key])}
    if step.stage == "promote":
        held_out = configs["evaluate"].eval.prompts if "evaluate" in configs else None
        return promote_best(job, configs[step.key], done.get("evaluate", {}).get("metrics", {}), held_out)
    if step.stage == "reward_monitor":
        from paddock.rlhf import preferences

        collect = configs[_key("collect_preferences", step.round)]
        before = done[_key("collect_preferences", step.round)].get("reward_models_before")
        after = current_reward_models(job)
        if after is None:
            raise RuntimeError(
                "the round's reward models are not registered; the monitor has nothing to score"
            )
        pairs = {"after": (after[0], after[1])}
        if before:
            pairs = {"before": (before[0], before[1]), **pairs}
        return {"metrics": preferences.monitor(collect, pairs)}
    if step.stage == "register_rlhf":
        return {"registered": register_round_model(job, step.round)}
    result = _runner(step.stage)(configs[step.key])
    if step.stage == "collect_preferences":
        return {
            "pairs": result.pairs,
            "unsure": result.unsure,
            "quarantined": result.quarantined,
            "policy_helpfulness": result.policy_helpfulness,
            "policy_safety": result.policy_safety,
            "reward_models_before": current_reward_models(job),
        }
    return {}


def current_reward_models(job: PipelineJob) -> list[str] | None:
    """The registered versions of both reward models now (``models:/name/version``), or None before any."""
    uris = []
    for kind in ("helpfulness", "safety"):
        try:
            name, version = tracking.model_version(f"models:/{job.registry_prefix}-rm-{kind}@latest")
        except tracking.UpstreamModelError:
            return None
        uris.append(f"models:/{name}/{version}")
    return uris


def register_round_model(job: PipelineJob, round_: int) -> str:
    """The round's PPO model, registered as ``{prefix}-rlhf-v{round}`` with its lineage (the PPO version it
    copies, whose weights are the ones measured)."""
    name, version = tracking.model_version(f"models:/{job.registry_prefix}-ppo@latest")
    source = f"models:/{name}/{version}"
    target = f"{job.registry_prefix}-rlhf-v{round_}"
    with tracking.stage_run(
        job.experiment, f"register_rlhf_v{round_}", {"source": source}, tags={"paddock.round": str(round_)}
    ) as run:
        uri = run.log_model(
            tracking.resolve_model(source),
            target,
            {"paddock.stage": f"rlhf-v{round_}", "paddock.upstream": source, "paddock.round": str(round_)},
            measured_digest=tracking.version_digest(name, version),
        )
        run.log_metrics(tracking.version_metrics(name, version), step=0)
    print(f"[pipeline] round {round_}'s model {source} registered as {uri}", flush=True)
    return uri


def evaluate_models(job: PipelineJob, template: EvaluateJob) -> dict[str, dict[str, float]]:
    """Every chat model on the same held-out data; win rates against SFT. Returns name -> metrics."""
    import ray

    from paddock import evaluate
    from paddock.cluster import actor_model
    from paddock.rollout.actors import workers_from

    out = {}
    sft = f"models:/{job.registry_prefix}-sft@latest"
    scorers = evaluate.start_scorers(template)  # the same reward models judge every model
    workers: list[Any] = []  # and the same rollout workers answer for each in turn
    try:
        for suffix in job.evaluate_models:
            name = f"{job.registry_prefix}-{suffix}"
            uri = f"models:/{name}@latest"
            try:
                tracking.model_version(uri)
            except tracking.UpstreamModelError:
                print(f"[pipeline] {name} is not registered; not evaluated", flush=True)
                continue
            e = template.model_copy(update={"model": uri, "compare_to": [sft] if suffix != "sft" else []})
            if suffix == "base":  # a pretrained model holds no dialog: its GAtt adherence would be noise
                e = e.model_copy(update={"eval": e.eval.model_copy(update={"gatt": None})})
            if not workers:
                workers = workers_from(actor_model(uri), template.eval, template.inference)
            out[name] = evaluate.run(e, scorers, workers)
    finally:
        for a in [*scorers, *workers]:
            ray.kill(a)
    return out


def promote_best(
    job: PipelineJob,
    promote_job: PromoteJob,
    metrics: dict[str, dict[str, float]],
    prompts: str | None = None,
) -> dict[str, Any]:
    """Promote the candidate with the best held-out reward that passes the gates (the relative ones hold it to the
    baseline's ground truth); register it as {prefix}-chat. The result says what each candidate's gates decided."""
    from paddock.serving.promote import PromotionError, promote

    names = [f"{job.registry_prefix}-{s}" for s in job.promote_candidates]
    ranked = sorted(
        (n for n in names if n in metrics), key=lambda n: -metrics[n].get("eval/greedy_reward_combined", 0.0)
    )
    refusals = []
    verdicts: dict[str, str] = {}
    for name in ranked:
        try:
            result = promote(promote_job, name)
        except PromotionError as exc:
            refusals.append(str(exc))
            verdicts[name] = "refused: " + "; ".join(
                line.strip() for line in str(exc).splitlines()[1:] if line.strip()
            )
            print(f"[pipeline] {name} not promoted: {exc}", flush=True)
            continue
        verdicts[name] = "promoted: " + "; ".join(c.describe() for c in result.checks)
        for later in ranked[ranked.index(name) + 1 :]:
            verdicts[later] = f"not tried: {name} has a higher held-out reward and passed"
        print(gate_report(ranked, metrics, verdicts), flush=True)
        _, version = tracking.model_version(f"models:/{name}/{result.version}")
        chat = f"{job.registry_prefix}-chat"
        checkpoint = tracking.resolve_model(f"models:/{name}/{version}")
        with tracking.stage_run(
            job.experiment, "register_chat", {"source": f"models:/{name}/{version}"}
        ) as run:
            uri = run.log_model(
                checkpoint,
                chat,
                {"paddock.stage": "chat", "paddock.upstream": f"models:/{name}/{version}"},
                measured_digest=tracking.version_digest(name, version),
            )
            run.log_metrics(metrics[name], step=0)
        chat_version = uri.rsplit("/", 1)[1]
        final = promote(promote_job, chat, chat_version, deploy_app=job.smoke_request)
        info: dict[str, Any] = {
            "promoted": f"models:/{name}/{version}",
            "chat": uri,
            "refused": refusals,
            "verdicts": verdicts,
        }
        if job.smoke_request:
            questions = smoke_prompts(prompts, job.smoke_questions, job.seed)
            accuracy = metrics[name].get("eval/helpfulness_accuracy")
            info["smoke"] = smoke(promote_job, chat, questions, accuracy)
        print(f"[pipeline] promoted {name} v{version} as {chat} v{final.version} (champion)", flush=True)
        return info
    print(gate_report(ranked, metrics, verdicts), flush=True)
    raise PromotionError("no candidate passed the gates:\n" + "\n".join(refusals))


def gate_report(ranked: list[str], metrics: dict[str, dict[str, float]], verdicts: dict[str, str]) -> str:
    """The candidates in the order they were tried (by held-out greedy reward), and what the gates said."""
    rows = ["| candidate | greedy reward | verifier accuracy | violations | gates |", "|---|---|---|---|---|"]
    for name in ranked:
        m = metrics.get(name, {})
        cells = [
            f"{m[k]:.3f}" if k in m else "—"
            for k in (
                "eval/greedy_reward_combined",
                "eval/helpfulness_accuracy",
                "eval/safety_violation_rate",
            )
        ]
        rows.append(f"| {name} | {' | '.join(cells)} | {verdicts.get(name, '')} |")
    return "\n".join(rows)


def smoke_prompts(path: str | None, n: int, seed: int) -> list[dict[str, Any]]:
    """A fixed, seeded choice of ``n`` held-out prompts (the evaluation's); a plain question without one."""
    import random

    import pyarrow.parquet as pq

    from paddock.config import resolve_path

    if path is None or not resolve_path(path).is_file():
        return [{"turns": [{"role": "user", "content": "What is the capital of Peru?"}]}]
    rows = pq.read_table(resolve_path(path)).to_pylist()
    return random.Random(seed).sample(rows, min(n, len(rows)))


def verdict(turns: list[dict[str, str]], answer: str) -> tuple[str, bool | None]:
    """The world's verifier on one served answer: (what it says, helpful or not); None off the tiny world."""
    from paddock.world import verify

    try:
        item = verify.item_for(turns)
    except ValueError:
        return "no verifier for this prompt", None
    if item.kind == "unsafe":
        ok = verify.helpfulness(turns, answer)
        return (
            "safe refusal" if ok else "unsafe" if not verify.safety_ok(turns, answer) else "refused, no help"
        ), ok
    ok = verify.helpfulness(turns, answer)
    return ("correct" if ok else "refused" if verify.is_refusal(answer) else "wrong"), ok


def smoke(
    promote_job: PromoteJob, model: str, prompts: list[dict[str, Any]], accuracy: float | None = None
) -> list[dict[str, Any]]:
    """Held-out questions to the served endpoint through the official openai client, each answer with the world
    verifier's verdict; Serve's application is deleted after."""
    import os

    import openai
    from ray import serve

    base = f"http://{promote_job.serve.host}:{promote_job.serve.port}/v1"
    client = openai.OpenAI(base_url=base, api_key=os.environ.get("PADDOCK_API_KEY", "unused"))
    print(f"[pipeline] served at {base}", flush=True)
    out = []
    for p in prompts:
        answer = client.chat.completions.create(
            model=model, messages=p["turns"], max_tokens=48, temperature=0
        )
        text = answer.choices[0].message.content or ""
        said, ok = verdict(p["turns"], text)
        print(f"  user: {p['turns'][-1]['content']}\n  {model}: {text}\n    verifier: {said}", flush=True)
        out.append({"question": p["turns"][-1]["content"], "answer": text, "verdict": said, "helpful": ok})
    judged = [o["helpful"] for o in out if o["helpful"] is not None]
    if judged:
        overall = f"; {accuracy:.1%} on the evaluation's held-out prompts" if accuracy is not None else ""
        print(f"  the champion answered {sum(judged)} of these {len(judged)} helpfully{overall}", flush=True)
    serve.delete(promote_job.serve.app_name)  # paddock's own application, not the cluster's others
    return out


# --------------------------------------------------------------------------------------------------
# Report and model cards


def table(metrics: dict[str, dict[str, float]]) -> str:
    cols = [m for m in TABLE_METRICS if any(m in v for v in metrics.values())]
    cols += sorted({k for v in metrics.values() for k in v if k.startswith("eval/win_rate")})
    head = "| model | " + " | ".join(c.removeprefix("eval/") for c in cols) + " |"
    rows = [head, "|---" * (len(cols) + 1) + "|"]
    for name, m in metrics.items():
        rows.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" if c in m else "—" for c in cols) + " |")
    return "\n".join(rows)


LOSS_STAGES = (
    "pretrain",
    "sft",
    "reward_helpfulness",
    "reward_safety",
    "rs_finetune",
    "gatt_finetune",
    "context_distillation",
)


def _save(fig: Any, out: Path, file: str, title: str) -> tuple[str, str]:
    """Write a report figure and close it; returns (title, file) for the report's list."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / file, dpi=120)
    plt.close(fig)
    return title, file


def stage_runs(parent_run_id: str) -> dict[str, Any]:
    """The newest FINISHED nested run of each stage under the pipeline's parent run, by stage name (``name@k``
    for a stage of round k > 1, whose run is nested in the round's run)."""
    client = tracking.configure()
    parent = client.get_run(parent_run_id)

    def children(run_id: str) -> list[Any]:
        return client.search_runs(
            [parent.info.experiment_id],
            f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
        )

    out: dict[str, Any] = {}
    for c in children(parent_run_id):
        stage = c.data.tags.get("paddock.stage", c.info.run_name)
        if stage != "round":
            out[stage] = c
            continue
        k = int(c.data.tags.get("paddock.round", "1"))
        for g in children(c.info.run_id):
            out[_key(g.data.tags.get("paddock.stage", g.info.run_name), k)] = g
    return out


def stage_figures(parent_run_id: str, out: Path) -> list[tuple[str, str]]:
    """Plots of the stages' own metrics, read back from their MLflow runs: loss curves, reward-model accuracy per
    rating, the best-of-N curve, PPO reward and KL. Returns (title, file) for each figure written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paddock.data.schemas import RATINGS

    client = tracking.configure()
    runs = stage_runs(parent_run_id)

    def history(run: Any, key: str) -> tuple[list[int], list[float]]:
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        return [m.step for m in points], [m.value for m in points]

    figures: list[tuple[str, str]] = []
    losses = [s for s in LOSS_STAGES if s in runs]
    if losses:
        fig, ax = plt.subplots(figsize=(7, 4))
        for stage in losses:
            steps, values = history(runs[stage], "train/loss")
            if steps:
                ax.plot([x / steps[-1] for x in steps], values, label=stage, lw=1)
        ax.set_xlabel("fraction of the stage's steps")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_title("loss curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figures.append(_save(fig, out, "loss_curves.png", "Loss curves"))
    rms = [s for s in ("reward_helpfulness", "reward_safety") if s in runs]
    if rms:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(rms)
        for i, stage in enumerate(rms):
            m = runs[stage].data.metrics
            own = (
                "ensemble/" if "ensemble/eval/accuracy" in m else ""
            )  # the registered model's: the ensemble's
            ax.bar(
                [r + i * width for r in range(len(RATINGS))],
                [m.get(f"{own}eval/accuracy/{r}", float("nan")) for r in RATINGS],
                width,
                label=stage.removeprefix("reward_"),
            )
        ax.set_xticks(
            [r + 0.4 - width / 2 for r in range(len(RATINGS))], [r.replace("_", " ") for r in RATINGS]
        )
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title("reward-model accuracy per preference rating (Llama 2, table 8)")
        ax.legend(fontsize=8)
        figures.append(_save(fig, out, "rm_accuracy_per_rating.png", "Reward-model accuracy per rating"))
    if "rejection_sampling" in runs:
        n, maxima = history(runs["rejection_sampling"], "rs/best_of_n_max")
        _, medians = history(runs["rejection_sampling"], "rs/best_of_n_median")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(n, maxima, "o-", label="max of N")
        ax.plot(n, medians, "o-", label="median of N")
        ax.set_xlabel("N samples per prompt")
        ax.set_ylabel("combined reward")
        ax.set_title("best of N (Llama 2, figure 7)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figures.append(_save(fig, out, "best_of_n.png", "Rejection sampling: best of N"))
    ppo_runs = sorted((k for k in runs if k == "ppo" or k.startswith("ppo@")), key=lambda k: (len(k), k))
    if ppo_runs:
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax2 = ax1.twinx()
        for i, key in enumerate(ppo_runs):
            label = f" (round {key.partition('@')[2] or 1})" if len(ppo_runs) > 1 else ""
            it, reward = history(runs[key], "ppo/reward_combined")
            kit, kl = history(runs[key], "ppo/kl")
            eit, held_out = history(runs[key], "eval/reward_combined")
            colour = f"C{i}"
            ax1.plot(it, reward, color=colour, label=f"train reward{label}")
            if eit:
                ax1.plot(eit, held_out, "o--", color=colour, label=f"held-out reward{label}")
            ax2.plot(kit, kl, ":", color=colour, label=f"KL to reference{label}")
        ax1.set_xlabel("PPO iteration")
        ax1.set_ylabel("combined reward")
        ax2.set_ylabel("KL (nats/answer, dotted)")
        ax1.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="lower right", fontsize=7)
        ax1.set_title("PPO reward and KL")
        figures.append(_save(fig, out, "ppo_reward_kl.png", "PPO reward and KL"))
    return figures


def round_rows(
    job: PipelineJob, done: dict[str, Any], metrics: dict[str, dict[str, float]]
) -> list[dict[str, float]]:
    """Per preference round: what the policy's answers were worth to the verifiers, what the reward models made of
    them before and after retraining, and the round model's held-out evaluation."""
    rows = []
    for k in range(1, job.rounds + 1):
        collect = done.get(_key("collect_preferences", k))
        if collect is None:
            continue
        mon = done.get(_key("reward_monitor", k), {}).get("metrics", {})
        model = metrics.get(f"{job.registry_prefix}-rlhf-v{k}", {})
        rows.append(
            {
                "round": k,
                "pairs": collect.get("pairs", float("nan")),
                "policy_helpful": collect.get("policy_helpfulness", float("nan")),
                # on the fresh pairs with a clear preference (ties are labelled by a coin)
                "rm_before_fresh": mon.get("monitor/before/fresh_agreement_clear", float("nan")),
                "rm_after_fresh": mon.get("monitor/after/fresh_agreement_clear", float("nan")),
                "fresh_clear_pairs": mon.get("monitor/after/fresh_clear_pairs", float("nan")),
                # on every clear pair of the held-out prompts' answers (no reward model picked them)
                "rm_before_answers": mon.get("monitor/before/answers_agreement_clear", float("nan")),
                "rm_after_answers": mon.get("monitor/after/answers_agreement_clear", float("nan")),
                "answer_clear_pairs": mon.get("monitor/after/answers_clear_pairs", float("nan")),
                "rm_before_static": mon.get("monitor/before/static_agreement", float("nan")),
                "rm_after_static": mon.get("monitor/after/static_agreement", float("nan")),
                "model_accuracy": model.get("eval/helpfulness_accuracy", float("nan")),
                "model_violations": model.get("eval/safety_violation_rate", float("nan")),
                "model_reward": model.get("eval/greedy_reward_combined", float("nan")),
            }
        )
    return rows


def rounds_table(job: PipelineJob, done: dict[str, Any], metrics: dict[str, dict[str, float]]) -> str:
    """The reward-hacking monitor by round, as Markdown."""

    def cell(v: float) -> str:
        return "—" if v != v else f"{v:.3f}"

    lines = [
        "| round | pairs (clear held-out ones; clear pairs of held-out answers) | policy answers helpful | "
        "RMs before: fresh / answer pairs / static | RMs after: fresh / answer pairs / static | "
        "round model: verifier accuracy | violations | greedy reward |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def count(v: float) -> str:
        return "—" if v != v else str(int(v))

    for r in round_rows(job, done, metrics):
        lines.append(
            f"| {r['round']} | {int(r['pairs'])} ({count(r['fresh_clear_pairs'])}; "
            f"{count(r['answer_clear_pairs'])}) | {cell(r['policy_helpful'])} | "
            f"{cell(r['rm_before_fresh'])} / {cell(r['rm_before_answers'])} / {cell(r['rm_before_static'])} | "
            f"{cell(r['rm_after_fresh'])} / {cell(r['rm_after_answers'])} / {cell(r['rm_after_static'])} | "
            f"{cell(r['model_accuracy'])} | {cell(r['model_violations'])} | {cell(r['model_reward'])} |"
        )
    return "\n".join(lines)


def rounds_figure(
    job: PipelineJob, done: dict[str, Any], metrics: dict[str, dict[str, float]], out: Path
) -> tuple[str, str] | None:
    """Reward and verifier by round, side by side: the reward models' agreement with the labels on the policy's
    answers and on the static pairs (before and after each round's retraining), and each round model's verifier
    accuracy, violation rate and greedy reward (round 0: SFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = round_rows(job, done, metrics)
    if not rows:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [r["round"] for r in rows]
    for key, label, style in (
        ("rm_before_fresh", "before retraining, policy's answers (clear pairs)", "o--"),
        ("rm_after_fresh", "after retraining, policy's answers (clear pairs)", "o-"),
        ("rm_before_answers", "before retraining, every clear pair of held-out answers", "^--"),
        ("rm_after_answers", "after retraining, every clear pair of held-out answers", "^-"),
        ("rm_before_static", "before retraining, static pairs", "s--"),
        ("rm_after_static", "after retraining, static pairs", "s-"),
    ):
        left.plot(ks, [r[key] for r in rows], style, label=label)
    left.set_xlabel("round")
    left.set_ylabel("reward agrees with the labels")
    left.set_title("reward models on fresh and static pairs")
    left.set_xticks(ks)
    left.set_ylim(0, 1)
    left.axhline(0.5, color="grey", lw=0.8)
    left.legend(fontsize=7)
    sft = metrics.get(f"{job.registry_prefix}-sft", {})
    xs = [0, *ks]
    for key, label in (
        ("eval/helpfulness_accuracy", "verifier accuracy"),
        ("eval/safety_violation_rate", "violation rate"),
        ("eval/greedy_reward_combined", "greedy reward"),
    ):
        ys = [sft.get(key, float("nan"))] + [
            metrics.get(f"{job.registry_prefix}-rlhf-v{k}", {}).get(key, float("nan")) for k in ks
        ]
        right.plot(xs, ys, "o-", label=label)
    right.set_xlabel("round (0: SFT)")
    right.set_xticks(xs)
    right.set_ylim(0, 1)
    right.set_title("round models, held out: reward against ground truth")
    right.legend(fontsize=7)
    return _save(fig, out, "rounds.png", "Preference rounds: reward against ground truth")


def write_report(
    job: PipelineJob,
    metrics: dict[str, dict[str, float]],
    done: dict[str, Any],
    out: Path,
    parent_run_id: str | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figures = stage_figures(parent_run_id, out) if parent_run_id else []
    if metrics:
        fig, ax = plt.subplots(figsize=(6, 5))
        for name, m in metrics.items():
            if "eval/reward_safety" in m and "eval/reward_helpfulness" in m:
                ax.scatter(m["eval/reward_helpfulness"], m["eval/reward_safety"], s=60)
                ax.annotate(name, (m["eval/reward_helpfulness"], m["eval/reward_safety"]), fontsize=8)
        ax.set_xlabel("mean helpfulness RM score (held out)")
        ax.set_ylabel("mean safety RM score (held out)")
        ax.set_title("safety against helpfulness, per model")
        ax.grid(alpha=0.3)
        figures.append(_save(fig, out, "safety_vs_helpfulness.png", "Safety against helpfulness"))
        turns = [2, 4, 6]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, m in metrics.items():
            if all(f"eval/gatt_adherence/turn_{t}" in m for t in turns):
                ax.plot(turns, [m[f"eval/gatt_adherence/turn_{t}"] for t in turns], "o-", label=name)
        ax.set_xlabel("user turn")
        ax.set_ylabel("answers following the first-turn instruction")
        ax.set_title("GAtt adherence by turn")
        ax.set_xticks(turns)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figures.append(
            _save(fig, out, "gatt_adherence.png", "GAtt adherence by turn (with and without GAtt)")
        )
    lines = [
        f"# paddock pipeline report: {job.registry_prefix}",
        "",
        "Every chat model on the same held-out prompts, GAtt dialogs and dialogs (jobs/evaluate.py). Rewards are on",
        "the sigmoid scale; the win rate compares greedy answers by the Llama 2 combined reward (ties count half).",
        "",
        table(metrics),
        "",
        "## Stages",
        "",
        "| stage | seconds | notes |",
        "|---|---|---|",
    ]
    for stage, info in done.items():
        note = info.get("promoted", "") if isinstance(info, dict) else ""
        lines.append(f"| {stage} | {info.get('seconds', 0):.0f} | {note} |")
    lines += [
        "",
        "Every stage's run is nested under this pipeline's parent run in MLflow, with its own plots (`plots/`).",
        "",
    ]
    if job.collects:
        lines += [
            "## Preference rounds",
            "",
            "Each round asked the previous round's model (round 1: SFT) for two answers per prompt, labelled them",
            "(`annotator` in collect_preferences.yaml), retrained both reward models on every pair so far, then ran",
            "rejection sampling and PPO. Agreement: how often the combined reward orders two answers as the labels",
            "do, on held-out pairs of the round's policy answers (fresh), on every clear pair of its answers to",
            "prompts no round's collected pairs trained on (answer pairs: the held-out prompts and",
            "`collect.monitor_prompts` more) and on the static test pairs.",
            "",
            rounds_table(job, done, metrics),
            "",
        ]
        figure = rounds_figure(job, done, metrics, out)
        if figure:
            figures.insert(0, figure)
    verdicts = done.get("promote", {}).get("verdicts", {})
    if verdicts:
        lines += [
            "## Promotion",
            "",
            "Candidates in the order they were tried (by held-out greedy reward), and what their gates said: the",
            "relative gates hold each one to the baseline's ground truth (promote.yaml's `baseline`), whatever the",
            "reward models say.",
            "",
            gate_report(list(verdicts), metrics, verdicts),
            "",
        ]
    for title, file in figures:
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


CARD = """# {name} v{version}

A paddock model trained the way Llama 2 was (Touvron et al., 2023), at the scale of this configuration.

## Model
- Stage: {stage}; upstream: {upstream}
- Architecture: Llama 2 decoder ({n_params} parameters); weights in safetensors
- Training configuration: the params of MLflow run {run_id}

## Data
{data}

## Evaluation (held-out, jobs/evaluate.py)
{evaluation}

## Intended use
Research and demonstration of the Llama 2 training pipeline on paddock. Models trained on the tiny world answer
questions about its facts and tasks only; they are not general assistants.

## Limits and safety
- Evaluated by reward models trained on the same world and by the world's verifiers; both can be gamed by the policy.
- Safety violation rate and false refusals above are on held-out prompts only; red-team before any real use.
- Larger configurations need their own evaluation: nothing here transfers across scales.
"""


def write_model_cards(
    job: PipelineJob, metrics: dict[str, dict[str, float]], configs: dict[str, Any]
) -> None:
    """A card for the newest version of every model the pipeline registered: registry description and artifact."""
    import tempfile

    rounds = [f"rlhf-v{k}" for k in range(1, job.rounds + 1)] if job.collects else []
    suffixes = ["base", "sft", "rm-helpfulness", "rm-safety", "rs", "ppo", *rounds, "gatt", "cd", "chat"]
    for suffix in suffixes:
        name = f"{job.registry_prefix}-{suffix}"
        try:
            _, version = tracking.model_version(f"models:/{name}@latest")
        except tracking.UpstreamModelError:
            continue
        run_id, params, run_metrics = tracking.version_run(name, version)
        evaluation = metrics.get(name) or {k: v for k, v in run_metrics.items() if k.startswith("eval/")}
        data = (
            "\n".join(
                f"- {k}: {v}"
                for k, v in sorted(params.items())
                if k.startswith(
                    ("data.", "ppo.prompts", "rejection.prompts", "gatt.dialogs", "distill.prompts")
                )
            )
            or "- see the run's inputs"
        )
        card = CARD.format(
            name=name,
            version=version,
            stage=suffix,
            upstream=params.get("model.init_from") or params.get("policy") or params.get("source") or "—",
            n_params=params.get("derived.n_params", "see run"),
            run_id=run_id,
            data=data,
            evaluation="\n".join(f"- {k}: {v:.4f}" for k, v in sorted(evaluation.items()))
            or "- not evaluated",
        )
        tracking.describe_version(name, version, card)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "MODEL_CARD.md").write_text(card)
            tracking.log_artifacts(run_id, Path(tmp), "model_card")
