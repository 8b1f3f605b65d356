"""The shared command line of jobs/ scripts: ``--config FILE [--set dotted.key=value ...]``.

Library code raises; this is the one place that turns paddock's errors into a message and an exit code.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from paddock.config import ConfigError, load_config

T = TypeVar("T", bound=BaseModel)

# Errors that are the user's to fix: print the message, no traceback, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file, e.g. jobs/configs/tiny/world.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted path, e.g. --set world.seed=3 (repeatable)",
    )
    return p


def run_stage(
    config_cls: type[T], stage: Callable[[T], Any], description: str, argv: list[str] | None = None
) -> int:
    """Parse the command line, validate the config, run the stage; 2 on a user error."""
    from paddock.atomic import LockedError
    from paddock.data.validate import DatasetError
    from paddock.lora import LoraError
    from paddock.models import ModelLoadError
    from paddock.plan import PlanError
    from paddock.rlhf.preferences import PreferenceError
    from paddock.tokenizer import TokenizerError
    from paddock.tracking import Stopped, UpstreamModelError

    user_errors: tuple[type[Exception], ...] = (
        *USER_ERRORS,
        DatasetError,
        LockedError,
        LoraError,
        ModelLoadError,
        PlanError,
        PreferenceError,
        TokenizerError,
        UpstreamModelError,
    )
    args = parser(description).parse_args(argv)
    # SIGTERM (ray job stop) ends the stage's runs KILLED; ray.init() later puts in its own handler, which exits the
    # process, and tracking treats that exit as a stop too
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        stage(cfg)
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def _stop(signum: int, frame: Any) -> None:
    from paddock.tracking import Stopped

    raise Stopped(f"{signal.Signals(signum).name} received (ray job stop, or the scheduler)")


def run_plan(description: str, argv: list[str] | None = None) -> int:
    """jobs/plan.py: the capacity plan of a stage config on a cluster file; 0 when it fits, 1 when not, 2 on a
    user error."""
    import json
    from pathlib import Path

    from paddock import plan
    from paddock.config import JOBS

    p = parser(description)
    p.add_argument("--cluster", help="cluster file (clusters/*.yaml); default: the config's plan.cluster")
    p.add_argument("--stage", choices=sorted(JOBS), help="the config's stage; default: its file name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    stage = args.stage or Path(args.config).stem
    errors: tuple[type[Exception], ...] = (*USER_ERRORS, plan.PlanError)
    try:
        if stage not in JOBS:
            raise ConfigError(
                f"{args.config}: which stage is this? pass --stage (one of {', '.join(sorted(JOBS))})"
            )
        job = load_config(JOBS[stage], args.config, args.overrides)
        cluster_file = args.cluster or job.plan.cluster
        result = plan.plan_any(job, stage, plan.Cluster.from_yaml_or_here(cluster_file))
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=1) if args.json else result.table())
    return 0 if result.fits else 1
