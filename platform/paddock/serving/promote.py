"""Promotion: a registered model version becomes ``champion`` when it passes the evaluation gates, and Serve follows.

Gates compare a version's MLflow metrics (those of the run that logged it: its evaluations) with bounds from the
config, and relative gates with a baseline version's metrics (the SFT model's verifier accuracy and violation rate:
RLHF that raises the reward models' score while the ground truth falls is refused). A failing gate stops promotion and names the gate and the value; a version without a metric that a gate
needs is refused unless forced, and a forced promotion is recorded as such. The previous champion is kept as
``previous-champion``, which ``rollback`` restores. Every promotion writes the Serve config file for
``serve deploy`` and, when asked, updates the running Serve application in place: Serve starts the new replicas,
then drains the old ones, so requests in flight during the swap complete.
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from paddock import atomic, tracking
from paddock.config import PromoteJob, resolve_path


class PromotionError(ValueError):
    """Promotion refused: a gate failed, a metric is missing, or there is nothing to roll back to."""


@dataclass
class GateCheck:
    metric: str
    value: float | None
    min: float | None
    max: float | None
    # a relative gate's baseline: "tiny-sft v3 = 0.2370", or why it has no bounds ("tiny-sft v3 lacks it")
    against: str = ""
    baseline_missing: bool = False

    @property
    def missing(self) -> bool:
        return self.baseline_missing or self.value is None or math.isnan(self.value)

    @property
    def passed(self) -> bool:
        if self.missing:
            return False
        assert self.value is not None
        return (self.min is None or self.value >= self.min) and (self.max is None or self.value <= self.max)

    def describe(self) -> str:
        bounds = " and ".join(
            b
            for b in (
                f">= {self.min:.4g}" if self.min is not None else "",
                f"<= {self.max:.4g}" if self.max is not None else "",
            )
            if b
        )
        if self.baseline_missing:
            return f"{self.metric}: cannot be checked: the baseline {self.against} (evaluate it first)"
        if self.against:
            bounds = (
                f"{bounds}, from the baseline {self.against}" if bounds else f"the baseline {self.against}"
            )
        if self.missing:
            return f"{self.metric}: missing (gate wants {bounds}); {producer(self.metric)}"
        return f"{self.metric} = {self.value:.4f} (gate wants {bounds}): {'pass' if self.passed else 'FAIL'}"


def producer(metric: str) -> str:
    """Which evaluation logs ``metric`` on a model version's run, for the message of a gate that lacks it."""
    evaluate = "python jobs/evaluate.py --config <evaluate.yaml> --set model=<the version>"
    name = metric.removeprefix("eval/")
    if name in ("helpfulness_accuracy", "safety_violation_rate", "false_refusal_rate", "checked_prompts"):
        return (
            f"the tiny world's verifiers log it ({evaluate}) on prompts the world wrote; on your own prompts "
            "there is no verifier: gate on the judges' eval/judge/violation_rate and eval/judge/refusal_rate"
        )
    if name.startswith("judge/") or "reward_" in name:
        return f"any evaluation logs it ({evaluate}; PPO logs it on its held-out prompts)"
    if name.startswith("win_rate_vs_"):
        other = name.removeprefix("win_rate_vs_").split("/")[0]
        return f"an evaluation that compares against {other} logs it ({evaluate} with compare_to naming it)"
    if name.startswith("gatt_adherence"):
        return f"an evaluation with GAtt dialogs logs it ({evaluate}, eval.gatt set)"
    if name == "perplexity":
        return f"an evaluation with held-out dialogs logs it ({evaluate}, eval.dialogs set)"
    return "no paddock evaluation logs this metric; check its name against the version's run"


@dataclass
class Promotion:
    name: str
    version: str
    previous: str | None
    action: str  # "promote" or "rollback"
    forced: bool
    checks: list[GateCheck] = field(default_factory=list)
    serve_config: Path | None = None
    record_run_id: str = ""


def check_gates(
    job: PromoteJob,
    metrics: dict[str, float],
    baseline: dict[str, float] | None = None,
    baseline_name: str = "baseline",
) -> list[GateCheck]:
    """The absolute gates, then the relative ones against ``baseline`` (the baseline version's metrics)."""
    checks = [GateCheck(m, metrics.get(m), g.min, g.max) for m, g in sorted(job.gates.items())]
    for m, g in sorted(job.relative_gates.items()):
        base = (baseline or {}).get(m)
        if base is None or math.isnan(base):
            checks.append(GateCheck(m, metrics.get(m), None, None, f"{baseline_name} lacks it", True))
            continue
        low = base - g.max_drop if g.max_drop is not None else None
        high = base + g.max_rise if g.max_rise is not None else None
        checks.append(GateCheck(m, metrics.get(m), low, high, f"{baseline_name} = {base:.4f}"))
    return checks


def baseline_metrics(job: PromoteJob) -> tuple[dict[str, float], str]:
    """The baseline version's metrics and its name for messages ("tiny-sft v3"); none without relative gates."""
    if not job.relative_gates or not job.baseline:
        return {}, ""
    name, version = tracking.model_version(job.baseline)
    return tracking.version_metrics(name, version), f"{name} v{version}"


def serve_args(job: PromoteJob, name: str, version: str) -> dict[str, Any]:
    """What ``paddock.serving.app.build_app`` needs: local paths and the URIs they came from."""
    uri = f"models:/{name}/{version}"
    args: dict[str, Any] = {
        "model": {"name": name, "version": version, "uri": uri, "path": str(tracking.resolve_model(uri))},
        "serve": job.serve.model_dump(mode="json"),
    }
    if job.reward_helpfulness and job.reward_safety:
        args["reward_helpfulness"] = str(tracking.resolve_model(job.reward_helpfulness))
        args["reward_safety"] = str(tracking.resolve_model(job.reward_safety))
    return args


def write_serve_config(job: PromoteJob, args: dict[str, Any]) -> Path:
    """The config file for ``serve deploy``: the same app, built by ``paddock.serving.app:app_builder``."""
    out = resolve_path(job.serve_config_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The API key never goes into a file: replicas deployed from it read PADDOCK_API_KEY.
    args = args | {"serve": args["serve"] | {"api_key": None}}
    config = {
        "proxy_location": "EveryNode",
        "http_options": http_options(job),
        "applications": [
            {
                "name": job.serve.app_name,
                "route_prefix": "/",
                "import_path": "paddock.serving.app:app_builder",
                "args": args,
            }
        ],
    }
    header = (
        "# Written by paddock's promotion. Deploy with: serve deploy " + str(out) + "\n"
        "# Paths are local to the machine that promoted; on a cluster put checkpoints on shared storage or let\n"
        "# replicas resolve model.uri through MLFLOW_TRACKING_URI.\n"
    )
    atomic.write_text(out, header + yaml.safe_dump(config, sort_keys=False))
    return out


def deploy(job: PromoteJob, args: dict[str, Any]) -> None:
    """Start or update the Serve application on the connected Ray cluster (a rolling update when it runs)."""
    from ray import serve

    from paddock.serving.app import build_app

    app = build_app(args)  # refuses an exposed bind without a key before anything starts
    serve.start(http_options=http_options(job))
    serve.run(app, name=job.serve.app_name, route_prefix="/", blocking=False)


def http_options(job: PromoteJob) -> dict[str, Any]:
    return {"host": job.serve.host, "port": job.serve.port, "request_timeout_s": job.serve.request_timeout_s}


def promote(
    job: PromoteJob,
    name: str,
    version: str | None = None,
    alias: str | None = None,
    *,
    force: bool = False,
    rollback: bool = False,
    deploy_app: bool = False,
) -> Promotion:
    """Move ``champion`` to a version that passes the gates (or back, with ``rollback``); see the module docstring."""
    current = tracking.alias_version(name, tracking.CHAMPION)
    if rollback:
        previous = tracking.alias_version(name, tracking.PREVIOUS)
        if previous is None:
            raise PromotionError(f"{name} has no previous champion to roll back to")
        tracking.set_alias(name, tracking.CHAMPION, previous)
        if current is not None:
            tracking.set_alias(name, tracking.PREVIOUS, current)
        result = Promotion(name, previous, current, "rollback", False)
    else:
        if version is not None and alias is not None:
            raise PromotionError("give --version or --alias, not both")
        uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version or 'latest'}"
        _, chosen = tracking.model_version(uri)
        checks = check_gates(job, tracking.version_metrics(name, chosen), *baseline_metrics(job))
        failed = [c for c in checks if not c.missing and not c.passed]
        if failed:
            raise PromotionError(
                f"{name} v{chosen} fails {len(failed)} gate(s):\n  "
                + "\n  ".join(c.describe() for c in failed)
            )
        missing = [c for c in checks if c.missing]
        if missing and not force:
            raise PromotionError(
                f"{name} v{chosen} lacks metrics that gates need (evaluate it first, or pass --force):\n  "
                + "\n  ".join(c.describe() for c in missing)
            )
        previous = current
        if current is not None and current != chosen:
            tracking.set_alias(name, tracking.PREVIOUS, current)
        elif current == chosen:
            previous = tracking.alias_version(name, tracking.PREVIOUS)  # re-promoting the champion
        tracking.set_alias(name, tracking.CHAMPION, chosen)
        result = Promotion(name, chosen, previous, "promote", bool(missing), checks)
    checks_record = {f"gate.{c.metric}": c.describe() for c in result.checks}
    result.record_run_id = tracking.record_promotion(
        name, result.version, result.previous, result.action, result.forced, checks_record
    )
    args = serve_args(job, name, result.version)
    result.serve_config = write_serve_config(job, args)
    if deploy_app:
        deploy(job, args)
    return result


def serve_forever(job: PromoteJob, name: str | None, alias: str) -> None:
    """``jobs/serve.py``: run the app for ``name@alias`` until Ctrl-C or SIGTERM, then shut Serve down."""
    from ray import serve

    from paddock.cluster import connect

    name = name or tracking.last_promoted_model()
    if name is None:
        raise PromotionError(
            "nothing has been promoted yet: pass --model NAME (and --alias or promote one first)"
        )
    _, version = tracking.model_version(f"models:/{name}@{alias}")
    args = serve_args(job, name, version)
    connect()
    deploy(job, args)
    url = f"http://{job.serve.host}:{job.serve.port}"
    print(
        f"[serve] {name} v{version} ({alias}) at {url}/v1/chat/completions"
        + (", /v1/reward" if job.serve.reward_route and "reward_safety" in args else "")
        + (" (API key required)" if job.serve.api_key or _env_key() else "")
        + "; Ctrl-C to stop",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print(f"[serve] deleting the application {job.serve.app_name!r}", flush=True)
    serve.delete(job.serve.app_name)  # paddock's own: other applications on the cluster keep running


def _env_key() -> bool:
    import os

    return bool(os.environ.get("PADDOCK_API_KEY"))
