"""Promote a registered model to champion through the evaluation gates, and update Serve.

python jobs/promote.py --model tiny-ppo [--version N | --version latest | --alias A] [--force] [--rollback]
"""

import argparse
import os
import sys
from pathlib import Path

from paddock.cli import USER_ERRORS
from paddock.config import PromoteJob, load_config
from paddock.serving.promote import PromotionError, promote
from paddock.tracking import UpstreamModelError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny" / "promote.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="registered model name, e.g. tiny-ppo")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="version number, or 'latest' (the default)")
    which.add_argument("--alias", help="promote the version that holds this alias")
    p.add_argument(
        "--force", action="store_true", help="promote although a gate's metric is missing (recorded)"
    )
    p.add_argument("--rollback", action="store_true", help="restore the previous champion")
    p.add_argument("--deploy", action="store_true", help="update the Serve app on RAY_ADDRESS's cluster now")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="gates and Serve settings (promote.yaml)")
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
    except (PromotionError, UpstreamModelError, *USER_ERRORS) as exc:
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


if __name__ == "__main__":
    sys.exit(main())
