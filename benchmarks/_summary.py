"""Collect every benchmark's JSON (benchmarks/results/*.json) into one Markdown table per benchmark.

``make bench`` runs each benchmark, then this script, which prints the tables and writes them to
``benchmarks/results/summary.md``. Each JSON is ``{"meta": {...}, "rows": [{...}, ...]}``; the columns are the
rows' keys in first-seen order, floats to three significant figures (whole numbers from 100).

    python benchmarks/_summary.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return "—" if v is None else str(v)


def table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], dict | list)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def summary(results: Path) -> str:
    files = sorted(results.glob("*.json"))
    if not files:
        raise SystemExit(f"no benchmark results in {results}: run the benchmarks first (make bench)")
    out = ["# paddock benchmarks", ""]
    for f in files:
        data = json.loads(f.read_text())
        meta = ", ".join(f"{k} {cell(v)}" for k, v in data.get("meta", {}).items())
        out += [f"## {f.stem}", "", meta, "", *table(data["rows"]), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    text = summary(Path(args.results))
    (Path(args.results) / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
