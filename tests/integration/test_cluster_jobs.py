"""jobs/ under `ray job submit` against a real `ray start --head` cluster on 127.0.0.1 (auth off, explicitly).

The cluster is a second Ray instance beside the test session's embedded one, with its own ports and temp dir;
it is stopped by killing exactly its own processes (``ray stop`` would take the session's instance too).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from chain import REPO, overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PADDOCK_HOME")}
    return env | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def head():
    temp = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, dash, metrics = free_port(), free_port(), free_port()
    # Every port the head binds is chosen here: the defaults (the agent's 52365 above all) may already be held by
    # the session's embedded instance or a neighbour, and an agent that cannot bind leaves no one to take jobs.
    agent_http, agent_grpc, runtime_env_agent = free_port(), free_port(), free_port()
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
        ],
        check=True,
        env=cli_env(),
        capture_output=True,
        timeout=180,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ok = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=cli_env(), capture_output=True
        )
        if ok.returncode == 0:
            break
        time.sleep(1)
    yield address, f"http://127.0.0.1:{metrics}/metrics"
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(temp) in part for part in (p.info["cmdline"] or [])):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.info["pid"], signal.SIGKILL)


def stage_args(stage: str, sets: list[str]) -> list[str]:
    """``jobs/<stage>.py --config jobs/configs/tiny/<stage>.yaml --set ...``."""
    return [
        f"jobs/{stage}.py",
        "--config",
        f"jobs/configs/tiny/{stage}.yaml",
        *(x for s in sets for x in ("--set", s)),
    ]


def scrape(url: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def submit(
    address: str, runtime_env: Path, *args: str, watch: str | None = None
) -> tuple[str, str, set[str]]:
    """Submit and wait; returns (final status, logs, paddock metric names seen on the ``watch`` endpoint)."""
    return wait(address, start(address, runtime_env, *args), watch)


def start(address: str, runtime_env: Path, *args: str) -> str:
    """Submit without waiting; the job's id."""
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--no-wait",
        "--runtime-env",
        str(runtime_env),
        "--",
        sys.executable,  # the venv's python, whatever PATH the cluster inherited
        *args,
    ]
    # A head under load may take a while to register its job agent; the job head answers 500 until then.
    deadline = time.monotonic() + 180
    while True:
        out = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stderr
    found = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout)  # the CLI colours its output
    assert found, out.stdout
    return found.group(0)


def wait(address: str, job_id: str, watch: str | None = None) -> tuple[str, str, set[str]]:
    """Wait for the job to end; (final status, logs, paddock metric names seen on ``watch``)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 900
    seen: set[str] = set()
    status = client.get_job_status(job_id)
    while time.monotonic() < deadline and not status.is_terminal():
        if watch:
            seen |= {
                line.split("{")[0] for line in scrape(watch).splitlines() if line.startswith("ray_paddock_")
            }
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    names = {JobStatus.SUCCEEDED: "SUCCEEDED", JobStatus.FAILED: "FAILED", JobStatus.STOPPED: "STOPPED"}
    return names.get(status, str(status)), logs, seen


@pytest.fixture(scope="module")
def runtime_env(chain, home: Path, tmp_path_factory) -> Path:
    """jobs/runtime_env.yaml, with the session's PADDOCK_HOME (its SQLite MLflow is fine on one machine)."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    env["py_modules"] = [str(REPO / "platform" / "paddock")]
    env["env_vars"] = env.get("env_vars", {}) | {"PADDOCK_HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    path = tmp_path_factory.mktemp("renv") / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


def test_submitted_sft_job_succeeds_and_leaves_its_mlflow_run(head, runtime_env, world_dir, tokenizer_dir):
    from paddock import tracking

    sets = [
        *overrides(world_dir, tokenizer_dir)["sft"],
        "train.max_steps=6",
        "train.eval_every=6",
        "registry_prefix=submitted",
    ]
    args = stage_args("sft", sets)
    address, metrics_url = head
    status, logs, seen = submit(address, runtime_env, *args, watch=metrics_url)
    assert status == "SUCCEEDED", logs[-3000:]
    # The workers' training gauges were on the node's Prometheus endpoint while the job ran.
    assert {"ray_paddock_train_loss", "ray_paddock_train_tokens_per_s", "ray_paddock_train_mfu"} <= seen, seen
    assert "[sft] done: models:/submitted-sft/1" in logs
    client = tracking.configure()
    runs = client.search_runs(
        [client.get_experiment_by_name("paddock-tiny").experiment_id],
        "tags.`paddock.registered_name` = 'submitted-sft'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train/loss"] > 0


@pytest.mark.reliability
def test_ray_job_stop_ends_the_stage_run_killed_and_frees_its_directory(
    head, runtime_env, home, world_dir, tokenizer_dir
):
    """``ray job stop`` sends SIGTERM (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, 3 s): the SFT run it stops
    mid-stage ends KILLED, not RUNNING for ever, and its output directory is free for the next run."""
    from paddock import atomic, tracking

    sets = [
        *overrides(world_dir, tokenizer_dir)["sft"],
        "train.max_steps=400",
        "train.eval_every=400",
        "registry_prefix=stopped",
    ]
    address = head[0]
    job_id = start(address, runtime_env, *stage_args("sft", sets))
    client = tracking.configure()
    experiment = client.get_experiment_by_name("paddock-tiny").experiment_id
    query = "tags.`paddock.registered_name` = 'stopped-sft'"
    lock_file = home / "runs" / "stopped-sft" / ".paddock.lock"
    deadline = time.monotonic() + 300
    runs: list = []
    while time.monotonic() < deadline:  # stop it once its stage run has started and holds the directory
        runs = client.search_runs([experiment], query)
        if runs and lock_file.is_file() and runs[0].info.run_id in lock_file.read_text():
            break
        time.sleep(0.5)
    assert runs and runs[0].info.status == "RUNNING", "the job never started its stage"
    subprocess.run(
        [str(BIN / "ray"), "job", "stop", "--address", address, job_id],
        env=cli_env(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    status, logs, _ = wait(address, job_id)
    assert status == "STOPPED", logs[-3000:]
    [run] = client.search_runs([experiment], query)
    assert run.info.status == "KILLED", (run.info.status, logs[-3000:])
    assert run.data.tags["paddock.error"].startswith("SystemExit"), run.data.tags["paddock.error"]
    with atomic.locked(home / "runs" / "stopped-sft", "sft") as lock:  # free, and it names the stopped run
        assert f"MLflow run {run.info.run_id}" in lock.previous


@pytest.mark.reliability
def test_submitted_job_with_a_bad_config_fails_with_the_error_in_its_logs(head, runtime_env):
    status, logs, _ = submit(
        head[0],
        runtime_env,
        "jobs/sft.py",
        "--config",
        "jobs/configs/tiny/sft.yaml",
        "--set",
        "train.num_workers=-1",
    )
    assert status == "FAILED"
    assert "train.num_workers: input should be greater than or equal to 0, got -1" in logs


def test_submitted_ppo_step_exports_ppo_metrics(head, runtime_env, world_dir, tokenizer_dir):
    address, metrics_url = head
    sets = [
        f"tokenizer={tokenizer_dir}",
        "policy=models:/tiny-sft@latest",
        f"ppo.prompts={world_dir}/prompts/train.parquet",
        f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
        "ppo.iterations=2",
        "ppo.batch_prompts=8",
        "ppo.mini_batch=8",
        "train.micro_batch_size=4",
        "ppo.max_new_tokens=8",
        "ppo.eval_every=100",
        "ppo.eval_max_prompts=4",
        # the fewest processes that still run every role: one rollout worker, one learner, one scorer for the
        # reference and both reward models
        "ppo.rollout_workers=1",
        "ppo.placement=colocated",
        "train.num_workers=1",
        "registry_prefix=submitted",
    ]
    args = stage_args("ppo", sets)
    status, logs, seen = submit(address, runtime_env, *args, watch=metrics_url)
    assert status == "SUCCEEDED", logs[-3000:]
    assert {
        "ray_paddock_ppo_reward_combined",
        "ray_paddock_ppo_kl",
        "ray_paddock_ppo_buffer_occupancy",
    } <= seen, seen
