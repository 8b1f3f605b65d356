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
