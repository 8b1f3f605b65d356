"""The command lines of jobs/promote.py and jobs/serve.py (argparse flags, not a config-only job)."""

from __future__ import annotations

import argparse
import os
import sys

from paddock.cli import USER_ERRORS
from paddock.config import PromoteJob, load_config
from paddock.serving.promote import PromotionError, promote, serve_forever
from paddock.tracking import UpstreamModelError

DEFAULT_CONFIG = "jobs/configs/tiny/promote.yaml"  # relative to the checkout, where jobs/ scripts run
ERRORS: tuple[type[Exception], ...] = (PromotionError, UpstreamModelError, *USER_ERRORS)


def promote_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Promote a registered model to champion through the evaluation gates, and update Serve."
    )
    p.add_argument("--model", required=True, help="registered model name, e.g. tiny-ppo")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="version number, or 'latest' (the default)")
    which.add_argument("--alias", help="promote the version that holds this alias")
    p.add_argument(
        "--force", action="store_true", help="promote although a gate's metric is missing (recorded)"
    )
    p.add_argument("--rollback", action="store_true", help="restore the previous champion")
    p.add_argument("--deploy", action="store_true", help="update the Serve app on RAY_ADDRESS's cluster now")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="gates and Serve settings (promote.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        job = load_config(PromoteJob, args.config, args.overrides)
        deploy = args.deploy or bool(os.environ.get("RAY_ADDRESS"))
        if deploy:
            from paddock.cluster import connect

            connect()
        version = None if args.version in (None, "latest") else args.version
        result = promote(
            job, args.model, version, args.alias, force=args.force, rollback=args.rollback, deploy_app=deploy
        )
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for check in result.checks:
        print(f"  gate {check.describe()}")
    print(
        f"{result.action}: {result.name} v{result.version} is champion"
        + (f" (previous champion v{result.previous})" if result.previous else "")
        + (" [forced: missing gate metrics]" if result.forced else "")
    )
    print(f"Serve config for 'serve deploy': {result.serve_config}")
    if not deploy:
        print(f"serve it: python jobs/serve.py --model {result.name}")
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Serve a promoted model (OpenAI-compatible chat + reward endpoints) until Ctrl-C."
    )
    p.add_argument("--model", help="registered model name (default: the most recently promoted one)")
    p.add_argument("--alias", default="champion", help="which version to serve (default: champion)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="Serve settings (promote.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"serve.host={args.host}")
    if args.port:
        overrides.append(f"serve.port={args.port}")
    try:
        job = load_config(PromoteJob, args.config, overrides)
        serve_forever(job, args.model, args.alias)
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
