"""Serve a promoted model (OpenAI-compatible chat + reward endpoints) until Ctrl-C.

python jobs/serve.py [--model NAME] [--alias champion] [--host 127.0.0.1] [--port 8000]
"""

import argparse
import sys
from pathlib import Path

from paddock.cli import USER_ERRORS
from paddock.config import PromoteJob, load_config
from paddock.serving.promote import PromotionError, serve_forever
from paddock.tracking import UpstreamModelError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny" / "promote.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="registered model name (default: the most recently promoted one)")
    p.add_argument("--alias", default="champion", help="which version to serve (default: champion)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve settings (promote.yaml)")
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
    except (PromotionError, UpstreamModelError, *USER_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
