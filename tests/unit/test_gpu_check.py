"""benchmarks/gpu_check.py, the prepared device check: its path on the CPU here, the real run where CUDA is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str, timeout: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "MASTER_PORT": "29549"}
    subprocess.run(
        [sys.executable, "gpu_check.py", "--out", str(tmp_path), *args],
        cwd=REPO / "benchmarks",
        env=env,
        check=True,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    name = "gpu_check_smoke.json" if "--smoke" in args else "gpu_check.json"
    return json.loads((tmp_path / name).read_text())


@pytest.mark.slow
def test_the_device_check_runs_every_role_on_the_cpu(tmp_path: Path):
    result = _run(tmp_path, "--smoke", timeout=600)
    rows = {r["role"]: r for r in result["rows"]}
    assert set(rows) == {
        "SFT learner",
        "rollout worker",
        "reference scorer",
        "reward scorer",
        "value scorer",
        "learner (policy + value)",
        "whole PPO iteration, colocated",
        "taking turns",
    }
    assert rows["SFT learner"]["tokens_per_s"] > 0 and rows["SFT learner"]["plan_gib"] > 0
    whole = rows["whole PPO iteration, colocated"]
    assert whole["answers"] == 8 and whole["response_tokens"] > 0 and whole["published_gib"] > 0
    assert whole["policy_loss"] is not None  # the learners took their PPO steps
    turns = rows["taking turns"]  # the learners' states made the round trip (nothing is freed on a CPU)
    assert (
        turns["learner_rest_s"] > 0
        and turns["learner_wake_s"] > 0
        and turns["learner_rest_freed_gib"] is None
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_device_check_measures_every_role_on_a_gpu(tmp_path: Path):
    result = _run(tmp_path, timeout=480)
    for row in result["rows"]:
        print(json.dumps(row))
        if "plan_gib" in row:
            assert row["measured_gib"] > 0 and row["measured_vs_plan"] > 0
        if row["role"] == "taking turns":  # each side gives up most of what it holds for the other's turn
            assert row["learner_rest_freed_gib"] > 0 and row["engine_sleep_freed_gib"] > 0
    assert result["meta"]["wall_s"] < 480


def test_the_rollout_device_script_runs_its_path_on_the_cpu(tmp_path: Path):
    """benchmarks/gpu_rollout.py --smoke: transformers rollouts measured; without vLLM its rows say so (the vLLM
    half runs in .venv-vllm: tests/integration/test_vllm_engine.py)."""
    import importlib.util

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "gpu_rollout.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO / "benchmarks",
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
        text=True,
    )
    rows = json.loads((tmp_path / "gpu_rollout_smoke.json").read_text())["rows"]
    hf = next(r for r in rows if r["engine"] == "transformers")
    assert hf["tokens"] == 16 * 16 and hf["tokens_per_s"] > 0
    vl = next(r for r in rows if r["engine"] == "vllm")
    if importlib.util.find_spec("vllm") is None:
        assert vl == {"part": "rollouts", "engine": "vllm", "skipped": "vLLM is not installed here"}
    else:
        assert vl["tokens"] == 16 * 16 and vl["vs_transformers"] > 0
        load = next(r for r in rows if r["part"] == "weight load")
        assert load["vs_raw"] > 0
