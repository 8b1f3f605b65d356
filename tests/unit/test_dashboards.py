"""Grafana dashboards: every expression names a metric paddock or Ray exports, and the JSON is build.py's."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from paddock.metrics import exported_names

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS = {
    "sum",
    "rate",
    "avg",
    "max",
    "min",
    "by",
    "le",
    "histogram_quantile",
    "irate",
    "increase",
    "without",
}
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def ray_exported() -> set[str]:
    """Metric names Ray's own Grafana panels use: the metrics Ray itself exports."""
    import ray

    panels = Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    return {m for f in panels.glob("*_panels.py") for m in re.findall(r"\bray_[a-z_]+", f.read_text())}


def names_in(expr: str) -> set[str]:
    no_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\([^()]*\bby\b[^()]*\)|by \([^)]*\)", " ", expr)
    return {t for t in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", no_labels) if t not in FUNCTIONS}


def base(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s):
            return name.removesuffix(s)
    return name


@pytest.mark.parametrize("name", ["training.json", "ppo.json", "serving.json"])
def test_every_expression_uses_exported_metrics(name: str):
    dash = json.loads((REPO / "dashboards" / name).read_text())
    ours, rays = exported_names(), ray_exported()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        for metric in names_in(expr):
            assert base(metric) in ours or metric in rays, f"{name}: {metric!r} in {expr!r} is not exported"
    assert any(base(m) in ours for e in exprs for m in names_in(e)), (
        "a paddock dashboard shows paddock metrics"
    )


def test_dashboard_files_are_what_build_py_writes():
    spec = importlib.util.spec_from_file_location("build", REPO / "dashboards" / "build.py")
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, d in build.DASHBOARDS.items():
        assert (REPO / "dashboards" / name).read_text() == build.render(d), (
            f"run dashboards/build.py ({name})"
        )
