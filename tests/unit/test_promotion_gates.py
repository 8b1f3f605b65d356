"""Promotion gates: pass, fail and missing metrics, described with their values."""

import math
from pathlib import Path

from paddock.config import PromoteJob, load_config
from paddock.serving.promote import check_gates


def job(**gates):
    return PromoteJob.model_validate({"gates": gates})


def test_gates_pass_fail_and_missing():
    j = job(**{"eval/helpfulness_accuracy": {"min": 0.5}, "eval/safety_violation_rate": {"max": 0.1}})
    checks = {
        c.metric: c
        for c in check_gates(j, {"eval/helpfulness_accuracy": 0.62, "eval/safety_violation_rate": 0.2})
    }
    assert checks["eval/helpfulness_accuracy"].passed
    bad = checks["eval/safety_violation_rate"]
    assert not bad.passed and not bad.missing
    assert bad.describe() == "eval/safety_violation_rate = 0.2000 (gate wants <= 0.1): FAIL"
    missing = check_gates(j, {"eval/helpfulness_accuracy": math.nan})
    assert all(c.missing and not c.passed for c in missing)
    assert "missing (gate wants >= 0.5)" in missing[0].describe()


def test_shipped_promote_config_validates_and_binds_loopback():
    j = load_config(PromoteJob, Path(__file__).resolve().parents[2] / "jobs/configs/tiny/promote.yaml")
    assert j.serve.host == "127.0.0.1" and j.gates and j.serve.api_key is None


def test_the_serve_config_file_never_holds_the_api_key(tmp_path, monkeypatch):
    import yaml
    from paddock.serving.promote import write_serve_config

    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    j = PromoteJob.model_validate({"serve": {"api_key": "sk-secret"}})
    args = {"model": {"name": "m", "version": "1", "path": "/x"}, "serve": j.serve.model_dump(mode="json")}
    out = write_serve_config(j, args)
    assert "sk-secret" not in out.read_text()
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["args"]["serve"]["api_key"] is None and app["import_path"] == "paddock.serving.app:app_builder"
    assert args["serve"]["api_key"] == "sk-secret", "the deployed app keeps the configured key"


def test_tracking_follows_paddock_home_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    import os

    from paddock import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    for name in ("a", "b"):
        monkeypatch.setenv("PADDOCK_HOME", str(tmp_path / name))
        tracking.configure()
        assert tracking.tracking_uri() == f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
