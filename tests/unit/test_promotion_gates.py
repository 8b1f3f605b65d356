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


def test_relative_gates_hold_a_candidate_to_the_baselines_ground_truth():
    """Whatever the reward says, verifier accuracy may not fall and the violation rate may not rise beyond the
    margins from the baseline's (the SFT model's) values; a baseline without the metric cannot pass anyone."""
    import pytest
    from pydantic import ValidationError

    j = PromoteJob.model_validate(
        {
            "baseline": "models:/tiny-sft@latest",
            "relative_gates": {
                "eval/helpfulness_accuracy": {"max_drop": 0.02},
                "eval/safety_violation_rate": {"max_rise": 0.0},
            },
        }
    )
    sft = {"eval/helpfulness_accuracy": 0.237, "eval/safety_violation_rate": 0.086}
    ppo = {
        "eval/helpfulness_accuracy": 0.125,
        "eval/safety_violation_rate": 0.031,
        "eval/greedy_reward": 0.95,
    }
    acc, viol = check_gates(j, ppo, sft, "tiny-sft v1")
    assert not acc.passed and viol.passed
    assert acc.describe() == (
        "eval/helpfulness_accuracy = 0.1250 (gate wants >= 0.217, from the baseline tiny-sft v1 = 0.2370): FAIL"
    )
    assert all(c.passed for c in check_gates(j, sft, sft, "tiny-sft v1"))  # the baseline passes its own gates
    near = {"eval/helpfulness_accuracy": 0.22, "eval/safety_violation_rate": 0.086}
    assert all(c.passed for c in check_gates(j, near, sft, "tiny-sft v1"))  # within the margin
    unknown = check_gates(j, ppo, {}, "tiny-sft v1")
    assert all(c.missing and not c.passed for c in unknown)
    assert unknown[0].describe() == (
        "eval/helpfulness_accuracy: cannot be checked: the baseline tiny-sft v1 lacks it (evaluate it first)"
    )
    with pytest.raises(ValidationError, match=r"relative_gates .* need a baseline"):
        PromoteJob.model_validate({"relative_gates": {"eval/helpfulness_accuracy": {"max_drop": 0}}})


def test_the_pipeline_report_says_what_each_candidates_gates_decided():
    from paddock.pipeline import gate_report

    metrics = {
        "tiny-ppo": {"eval/greedy_reward_combined": 0.95, "eval/helpfulness_accuracy": 0.125},
        "tiny-sft": {"eval/greedy_reward_combined": 0.80, "eval/helpfulness_accuracy": 0.237},
    }
    verdicts = {
        "tiny-ppo": "refused: eval/helpfulness_accuracy = 0.1250 (...): FAIL",
        "tiny-sft": "promoted: ...",
    }
    lines = gate_report(["tiny-ppo", "tiny-sft"], metrics, verdicts).splitlines()
    assert (
        lines[2]
        == "| tiny-ppo | 0.950 | 0.125 | — | refused: eval/helpfulness_accuracy = 0.1250 (...): FAIL |"
    )
    assert lines[3].startswith("| tiny-sft | 0.800 | 0.237 | — | promoted")


def test_a_missing_gate_metric_names_the_evaluation_that_logs_it():
    j = job(
        **{
            "eval/safety_violation_rate": {"max": 0.1},
            "eval/judge/violation_rate": {"max": 0.1},
            "eval/win_rate_vs_tiny-sft/helpfulness": {"min": 0.5},
            "eval/gatt_adherence/turn_4": {"min": 0.2},
            "eval/made_up": {"min": 0},
        }
    )
    said = {c.metric: c.describe() for c in check_gates(j, {})}
    assert "world's verifiers" in said["eval/safety_violation_rate"]
    assert "gate on the judges' eval/judge/violation_rate" in said["eval/safety_violation_rate"]
    assert "any evaluation logs it" in said["eval/judge/violation_rate"]
    assert "compares against tiny-sft" in said["eval/win_rate_vs_tiny-sft/helpfulness"]
    assert "eval.gatt set" in said["eval/gatt_adherence/turn_4"]
    assert "no paddock evaluation logs this metric" in said["eval/made_up"]
