"""jobs/pipeline.py as a user runs it: SIGKILLed during a middle stage, then rerun.

A small pipeline (world, tokenizer, pretraining, SFT; the other stages skipped) in its own PADDOCK_HOME, driven
as a subprocess attached to the session's Ray instance the way `ray job submit` drivers are. The driver is
killed once SFT has checkpointed; the rerun must start at SFT from its last checkpoint, leave the finished stages as
they were, and finish.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chain import REPO
from paddock.config import PIPELINE_STAGES
from train_snapshots import wait_for_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

RUN = ["world", "tokenizer", "pretrain", "sft"]
SKIP = [s for s in PIPELINE_STAGES if s not in RUN]
SMALL = ["train.cpus_per_worker=0.5", "train.num_workers=2", "data.seq_len=128"]


def small_pipeline(path: Path) -> Path:
    tiny = "jobs/configs/tiny"
    config = {
        "experiment": "paddock-pipeline-test",
        "registry_prefix": "tiny",
        "stages": {
            "world": {
                "config": f"{tiny}/world.yaml",
                "overrides": [
                    "world.pretrain_mb=0.2",
                    "world.sft_dialogs=400",
                    "world.helpfulness_pairs=100",
                    "world.safety_pairs=50",
                    "world.rl_prompts=20",
                    "world.eval_prompts=20",
                    "world.gatt_dialogs=10",
                ],
            },
            "tokenizer": {"config": f"{tiny}/tokenizer.yaml", "overrides": ["tokenizer.vocab_size=600"]},
            "pretrain": {
                "config": f"{tiny}/pretrain.yaml",
                # 8 steps in the driver (local mode): a worker start-up would take longer than the training
                "overrides": [
                    *SMALL,
                    "train.num_workers=0",
                    "train.max_steps=8",
                    "train.eval_every=8",
                    "optim.warmup_steps=2",
                ],
            },
            "sft": {
                "config": f"{tiny}/sft.yaml",
                "overrides": [
                    *SMALL,
                    "train.max_steps=60",  # far from done when the first checkpoint is committed
                    "train.eval_every=60",
                    "train.log_every=5",
                    "train.checkpoint_every=5",
                ],
            },
            **{s: {"config": f"{tiny}/{s}.yaml"} for s in SKIP},
        },
        "skip": SKIP,
        "smoke_request": False,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_killed_pipeline_resumes_at_the_unfinished_stage(ray_cluster, tmp_path: Path):
    import mlflow

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "PADDOCK_HOME": str(home),
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    command = [
        sys.executable,
        "jobs/pipeline.py",
        "--config",
        str(small_pipeline(tmp_path / "pipeline.yaml")),
    ]

    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert first.stdout is not None
    lines = []
    for line in first.stdout:
        lines.append(line)
        step = re.match(r"\[sft\] step (\d+)/", line)  # progress lines come every ~5% of the steps
        if step and int(step.group(1)) >= 5:
            break
    # A checkpoint counts once Ray Train's controller has recorded it in its snapshot, which it does a poll (about
    # 2 s) after the report the driver printed: kill at that point, not at a time.
    wait_for_checkpoint(home / "ray_results", "tiny-sft-*", timeout_s=300)
    first.send_signal(signal.SIGKILL)  # no cleanup, as when the node running the driver dies
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "".join(lines[-30:])

    state_file = home / "runs" / "pipeline-tiny" / "state.json"
    killed = json.loads(state_file.read_text())
    assert list(killed["done"]) == ["world", "tokenizer", "pretrain"]
    finished_files = [home / "world" / "sft" / "train.parquet", home / "tokenizer" / "tokenizer.json"]
    mtimes = [p.stat().st_mtime_ns for p in finished_files]

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resuming: world, tokenizer, pretrain already done; next: sft" in out
    assert "stage 4/4: sft" in out and "[pretrain]" not in out and "[world]" not in out
    # SFT goes on from its own last checkpoint (its Ray Train run is named by the pipeline run, which the rerun
    # keeps), not from step 0
    resumed = [
        line for line in out.splitlines() if line.startswith("[sft] resumed from the checkpoint at step")
    ]
    assert resumed and int(resumed[0].split("step ")[1].split()[0]) >= 5, out[-4000:]

    state = json.loads(state_file.read_text())
    print("stage seconds:", {s: round(info["seconds"]) for s, info in state["done"].items()})
    assert list(state["done"]) == RUN
    assert state["parent_run_id"] == killed["parent_run_id"]
    assert {s: state["done"][s] for s in killed["done"]} == killed["done"], (
        "finished stages were left as they were"
    )
    assert [p.stat().st_mtime_ns for p in finished_files] == mtimes

    store = f"sqlite:///{home}/mlflow.db"
    client = mlflow.MlflowClient(store, store)  # the registry too: mlflow's default is a process-wide global
    for name in ("tiny-base", "tiny-sft"):
        assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"], name
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    status = sorted((c.data.tags.get("mlflow.runName", ""), c.info.status) for c in children)
    assert (
        ("sft", "KILLED") in status and ("sft", "FINISHED") in status and ("pretrain", "FINISHED") in status
    )
    assert not [s for s in status if s[1] == "RUNNING"], status
    report = home / "runs" / "pipeline-tiny" / "report"
    assert "![Loss curves](loss_curves.png)" in (report / "report.md").read_text()
    assert (report / "loss_curves.png").stat().st_size > 10_000
