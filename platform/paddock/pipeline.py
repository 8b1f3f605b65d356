"""The whole Llama 2 pipeline as one job: every stage in order, resumable, under one parent MLflow run.

world -> tokenizer -> pretraining -> SFT -> helpfulness and safety RMs -> rejection sampling -> PPO -> GAtt ->
context distillation -> evaluation of every chat model -> promotion of the best one that passes the gates (also
registered as ``{prefix}-chat``) -> one request to the served endpoint.

A state file under ``runs/pipeline-{prefix}/`` records each finished stage; rerunning after a failure or a kill
starts at the first unfinished one, inside the same parent run. At the end the pipeline writes a Markdown report
with plots (models against every evaluation metric, safety against helpfulness, GAtt adherence by turn), logs it
to the parent run, and gives every registered model version a model card (its description in the registry and an
artifact of its run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from paddock import atomic, tracking
from paddock.config import (
    JOBS,
    PIPELINE_STAGES,
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
    if stage in ("world", "tokenizer"):
        from paddock import tokenizer, world

        return world.run if stage == "world" else tokenizer.run
    if stage in ("pretrain", "sft", "reward_helpfulness", "reward_safety"):
        from paddock.train.stage import run_supervised

        return lambda job: run_supervised(job, stage)
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


def run(job: PipelineJob) -> dict[str, Any]:
    prefix = job.registry_prefix
    work = paddock_home() / "runs" / f"pipeline-{prefix}"
    state = State(work / "state.json")
    # Every stage's config is checked before anything runs. Stage runs go to the pipeline's experiment, so that
    # MLflow shows them nested under its parent run (a stage's own overrides still win).
    configs: dict[str, Any] = {
        s: load_config(
            JOBS[s], job.stages[s].config, [f"experiment={job.experiment}", *job.stages[s].overrides]
        )
        for s in PIPELINE_STAGES
        if s in job.stages and s not in job.skip
    }
    if job.plan.check and job.plan.shape and job.plan.cluster:
        # Every stage planned up front against the named cluster (the shapes are known before the models exist);
        # without a shape, each stage checks its own plan when it starts.
        from paddock import plan

        plan.plan_any(job, "pipeline", plan.Cluster.from_yaml(job.plan.cluster)).refuse()
    todo = [s for s in PIPELINE_STAGES if s in configs and not state.done(s)]
    done = [s for s in PIPELINE_STAGES if s in configs and state.done(s)]
    if done:
        print(
            f"[pipeline] resuming: {', '.join(done)} already done; next: {todo[0] if todo else 'nothing'}",
            flush=True,
        )
    start = time.monotonic()
    with tracking.parent_run(job.experiment, f"pipeline-{prefix}", state.data.get("parent_run_id")) as parent:
        state.data["parent_run_id"] = parent
        state.save()
        for n, stage in enumerate(todo, 1):
            t0 = time.monotonic()
            print(
                f"\n[pipeline] stage {len(done) + n}/{len(configs)}: {stage} ({job.stages[stage].config})",
                flush=True,
            )
            info: dict[str, Any]
            if stage == "evaluate":
                info = {"metrics": evaluate_models(job, configs[stage])}
            elif stage == "promote":
                info = promote_best(
                    job, configs[stage], state.data["done"].get("evaluate", {}).get("metrics", {})
                )
            else:
                _runner(stage)(configs[stage])
                info = {}
            info["seconds"] = time.monotonic() - t0
            state.finish(stage, info)
            print(f"[pipeline] {stage} done in {info['seconds']:.0f}s", flush=True)
        metrics = state.data["done"].get("evaluate", {}).get("metrics", {})
        report = write_report(job, metrics, state.data["done"], work / "report", parent)
        tracking.log_artifacts(parent, report.parent, "report")
        write_model_cards(job, metrics, configs)
        print(
            f"\n[pipeline] finished in {(time.monotonic() - start) / 60:.1f} min; report: {report}",
            flush=True,
        )
        print(table(metrics), flush=True)
        home = paddock_home()
        print(f"follow the runs: mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db", flush=True)
        print(f"serve the champion: python jobs/serve.py --model {prefix}-chat", flush=True)
    return state.data


def evaluate_models(job: PipelineJob, template: EvaluateJob) -> dict[str, dict[str, float]]:
    """Every chat model on the same held-out data; win rates against SFT. Returns name -> metrics."""
    import ray

    from paddock import evaluate
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
                workers = workers_from(str(tracking.resolve_model(uri)), template.eval, template.inference)
            out[name] = evaluate.run(e, scorers, workers)
    finally:
        for a in [*scorers, *workers]:
            ray.kill(a)
    return out


def promote_best(
    job: PipelineJob, promote_job: PromoteJob, metrics: dict[str, dict[str, float]]
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
            info["smoke"] = smoke(promote_job, chat)
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


def smoke(promote_job: PromoteJob, model: str) -> str:
    """One chat request to the served endpoint through the official openai client; Serve is shut down after."""
    import os

    import openai
    from ray import serve

    base = f"http://{promote_job.serve.host}:{promote_job.serve.port}/v1"
    client = openai.OpenAI(base_url=base, api_key=os.environ.get("PADDOCK_API_KEY", "unused"))
    question = "What is the capital of Peru?"
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    text = answer.choices[0].message.content or ""
    print(f"[pipeline] served at {base}\n  user: {question}\n  {model}: {text}", flush=True)
    serve.delete(promote_job.serve.app_name)  # paddock's own application, not the cluster's others
    return text


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
    """The newest FINISHED nested run of each stage under the pipeline's parent run, by stage name."""
    client = tracking.configure()
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    return {c.data.tags.get("paddock.stage", c.info.run_name): c for c in children}


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
            ax.bar(
                [r + i * width for r in range(len(RATINGS))],
                [m.get(f"eval/accuracy/{r}", float("nan")) for r in RATINGS],
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
    if "ppo" in runs:
        it, reward = history(runs["ppo"], "ppo/reward_combined")
        kit, kl = history(runs["ppo"], "ppo/kl")
        eit, held_out = history(runs["ppo"], "eval/reward_combined")
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax1.plot(it, reward, label="train reward (combined)")
        if eit:
            ax1.plot(eit, held_out, "o--", label="held-out reward")
        ax1.set_xlabel("PPO iteration")
        ax1.set_ylabel("combined reward")
        ax2 = ax1.twinx()
        ax2.plot(kit, kl, color="tab:red", label="KL to reference")
        ax2.set_ylabel("KL (nats/answer)")
        ax1.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        ax1.set_title("PPO reward and KL")
        figures.append(_save(fig, out, "ppo_reward_kl.png", "PPO reward and KL"))
    return figures


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

    suffixes = ["base", "sft", "rm-helpfulness", "rm-safety", "rs", "ppo", "gatt", "cd", "chat"]
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
            upstream=params.get("model.init_from") or params.get("policy") or "—",
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
