"""PPO under jobs/pipeline.py, SIGKILLed once its learners have checkpointed, then rerun: it resumes.

A pipeline of the PPO stage alone (the chain's SFT policy and reward models, in the session's PADDOCK_HOME), its
driver a subprocess attached to the session's Ray instance as `ray job submit` drivers are. The learners' Ray Train
run is named by the pipeline's run, which the rerun keeps, so the rerun's learners start from their last
checkpoint and the driver goes on from that iteration with the reward statistics saved beside it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from chain import REPO
from paddock.config import PIPELINE_STAGES
from train_snapshots import wait_for_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

PREFIX = "resume"
ITERATIONS = 4


def ppo_pipeline(path: Path, world_dir: Path, tokenizer_dir: Path) -> Path:
    tiny = "jobs/configs/tiny"
    skip = [s for s in PIPELINE_STAGES if s != "ppo"]
    config = {
        "experiment": "paddock-ppo-resume-test",
        "registry_prefix": PREFIX,
        "stages": {
            "ppo": {
                "config": f"{tiny}/ppo.yaml",
                "overrides": [
                    f"registry_prefix={PREFIX}",
                    f"tokenizer={tokenizer_dir}",
                    "policy=models:/tiny-sft@latest",
                    "reward_helpfulness=models:/tiny-rm-helpfulness@latest",
                    "reward_safety=models:/tiny-rm-safety@latest",
                    f"ppo.prompts={world_dir}/prompts/train.parquet",
                    f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
                    f"ppo.iterations={ITERATIONS}",
                    "ppo.batch_prompts=16",
                    "ppo.mini_batch=16",
                    "ppo.max_new_tokens=16",
                    "ppo.checkpoint_every=1",
                    f"ppo.eval_every={ITERATIONS}",
                    "ppo.eval_max_prompts=8",
                    "ppo.patience=null",
                    # the fewest processes that run every role (as the submitted PPO job in test_cluster_jobs)
                    "ppo.rollout_workers=1",
                    "ppo.placement=colocated",
                    "train.num_workers=1",
                    "train.micro_batch_size=8",
                ],
            },
            **{s: {"config": f"{tiny}/{s}.yaml"} for s in skip},
        },
        "skip": skip,
        "smoke_request": False,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_killed_ppo_resumes_from_its_learners_last_checkpoint(
    chain, home: Path, world_dir: Path, tokenizer_dir: Path, ray_cluster, tmp_path: Path
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "PADDOCK_HOME": str(home),
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    command = [
        sys.executable,
        "jobs/pipeline.py",
        "--config",
        str(ppo_pipeline(tmp_path / "pipeline.yaml", world_dir, tokenizer_dir)),
    ]
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Kill once Ray Train's controller has recorded the learners' first checkpoint: a point in the run's
        # flow, not a time. The driver's output is drained meanwhile (a full pipe would stall it).
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(first.stdout or []), daemon=True)
        reader.start()
        wait_for_checkpoint(home / "ray_results", f"{PREFIX}-ppo-*", timeout_s=600)
        first.send_signal(signal.SIGKILL)  # no cleanup, as when the node running the driver dies
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL, "".join(lines[-30:])
    assert not any("[ppo] done" in line for line in lines)

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    resumed = re.search(r"\[ppo\] resuming from the learners' checkpoint of iteration (\d+)", out)
    assert resumed, out[-4000:]
    start = int(resumed.group(1))
    assert 1 <= start <= ITERATIONS, out[-4000:]
    assert f"learners resumed from the checkpoint of iteration {start}" in out
    # the iterations before the checkpoint are not trained again
    trained = [int(i) for i in re.findall(rf"\[ppo\] iteration (\d+)/{ITERATIONS} \|", out)]
    assert trained == list(range(start + 1, ITERATIONS + 1)), out[-4000:]
    assert f"[ppo] done after {ITERATIONS} iterations" in out
    state = json.loads((home / "runs" / f"pipeline-{PREFIX}" / "state.json").read_text())
    assert list(state["done"]) == ["ppo"]
