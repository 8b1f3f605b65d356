"""Bad input stops a stage early, with a message that names the problem."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paddock.config import PretrainJob, SFTJob, load_config
from paddock.data.validate import DatasetError
from paddock.tracking import UpstreamModelError

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
REPO = Path(__file__).resolve().parents[2]


def job_script(script: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PADDOCK_HOME": str(home)}
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_wrong_config_field_fails_before_any_worker(tmp_path: Path):
    out = job_script(
        "pretrain.py",
        "--config",
        "jobs/configs/tiny/pretrain.yaml",
        "--set",
        "train.zero_stage=5",
        "--set",
        "optim.lr=-1",
        home=tmp_path,
    )
    assert out.returncode == 2
    assert "train.zero_stage: input should be less than or equal to 3, got 5" in out.stderr
    assert "optim.lr: input should be greater than 0, got -1" in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_stage_that_cannot_fit_is_refused_before_any_worker(
    tmp_path: Path, tokenizer_dir: Path, world_dir: Path
):
    out = job_script(
        "pretrain.py",
        "--config",
        "jobs/configs/tiny/pretrain.yaml",
        "--set",
        f"tokenizer={tokenizer_dir}",
        "--set",
        f"data.train={world_dir}/pretrain/train.parquet",
        "--set",
        "model.shape=70b",
        home=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        "pretrain does not fit" in out.stderr
        and "GiB missing" in out.stderr
        and "train.num_workers" in out.stderr
    )
    assert "plan.check=false" in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_dataset_over_its_bad_row_limit_names_the_quarantine(
    tmp_path: Path, tokenizer_dir: Path, ray_cluster, monkeypatch
):
    from paddock.train.stage import run_supervised

    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    bad = tmp_path / "bad" / "train.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"text": ["fine text"] * 8 + [""] * 2}), bad)
    job = load_config(
        PretrainJob,
        REPO / "jobs/configs/tiny/pretrain.yaml",
        [f"tokenizer={tokenizer_dir}", f"data.train={bad}", f"data.test={bad}", "data.max_bad_fraction=0.05"],
    )
    with pytest.raises(
        DatasetError, match=r"2 of 10 rows \(20\.0%\) .* the bad rows are in .*bad-train\.quarantine\.parquet"
    ):
        run_supervised(job, "pretrain")
    assert not (tmp_path / "ray_results").exists()


def test_missing_upstream_model_is_named(tmp_path: Path, tokenizer_dir: Path, monkeypatch):
    from paddock.train.stage import run_supervised

    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    job = load_config(
        SFTJob,
        REPO / "jobs/configs/tiny/sft.yaml",
        [f"tokenizer={tokenizer_dir}", "model.init_from=models:/nobody-base@latest"],
    )
    with pytest.raises(
        UpstreamModelError,
        match="upstream model models:/nobody-base@latest does not exist: no registered model named 'nobody-base'",
    ):
        run_supervised(job, "sft")
    job = load_config(
        SFTJob,
        REPO / "jobs/configs/tiny/sft.yaml",
        [f"tokenizer={tokenizer_dir}", f"model.init_from={tmp_path / 'nope'}"],
    )
    with pytest.raises(UpstreamModelError, match="no such directory"):
        run_supervised(job, "sft")
    out = job_script(
        "sft.py",
        "--config",
        "jobs/configs/tiny/sft.yaml",
        "--set",
        f"tokenizer={tokenizer_dir}",
        home=tmp_path,
    )
    assert out.returncode == 2 and "models:/tiny-base@latest does not exist" in out.stderr
