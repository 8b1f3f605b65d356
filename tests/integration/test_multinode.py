"""PPO on a Ray cluster of a head and two worker nodes that share nothing but the storage and MLflow, one of
which goes away mid-run; then an evaluation of the registered policy and a fine-tune on the node left.

Each node is a raylet of its own (``ray.cluster_utils.Cluster``) with its own ``PADDOCK_HOME``; the driver is a
separate process with a third one, as under ``ray job submit``. The chain's models are registered on a real
``mlflow server`` (basic auth), Ray Train's checkpoints and the actors' handoffs go to ``PADDOCK_STORAGE`` (a
directory standing in for a bucket). The learners and the actors are spread over both worker nodes and resolve
the models into their own node's cache; the rollout worker that saves the evaluated policy leaves it in the
storage, and the driver copies it home. Once the learners' first checkpoint is recorded (a deterministic point),
one worker node is removed (its raylet and every process on it): the learners restart from that checkpoint on
the node left, the lost actors restart there and fetch the models into its cache, and the run finishes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from chain import REPO
from mlflow_server import PASSWORD, USER
from train_snapshots import wait_for_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.slow]

AFTER_LOSS_S = 1200  # the most PPO may take after the node's loss (the whole test takes about 260 s here)


def test_ppo_spreads_over_two_worker_nodes_that_share_only_storage_and_mlflow(
    chain, server, world_dir, tokenizer_dir, tmp_path
):  # type: ignore[no-untyped-def]
    from paddock import tracking
    from ray.cluster_utils import Cluster

    with tracking.stage_run("paddock-tiny", "upload", {}) as upload:  # the chain's models, on the server
        for name, stage in [
            ("mn-base", "pretrain"),
            ("mn-sft", "sft"),
            ("mn-rm-helpfulness", "rm_h"),
            ("mn-rm-safety", "rm_s"),
        ]:
            assert upload.log_model(chain[stage].checkpoint_dir, name) == f"models:/{name}/1"
    storage = tmp_path / "storage"
    homes = {n: tmp_path / f"home-{n}" for n in ("head", "a", "b", "driver")}
    common = {
        "RAY_AUTH_MODE": "disabled",
        "PADDOCK_STORAGE": str(storage),
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "env_vars": common | {"PADDOCK_HOME": str(homes["head"])}},
    )
    nodes = {
        n: cluster.add_node(num_cpus=8, env_vars=common | {"PADDOCK_HOME": str(homes[n])}) for n in ("a", "b")
    }
    cluster.wait_for_nodes()
    overrides = [
        f"tokenizer={tokenizer_dir}",
        "registry_prefix=mn",
        "policy=models:/mn-sft@latest",
        "reward_helpfulness=models:/mn-rm-helpfulness@latest",
        "reward_safety=models:/mn-rm-safety@latest",
        f"ppo.prompts={world_dir}/prompts/train.parquet",
        f"ppo.eval_prompts={world_dir}/prompts/valid.parquet",
        "ppo.iterations=4",
        "ppo.batch_prompts=16",
        "ppo.mini_batch=8",
        "ppo.max_new_tokens=16",
        "ppo.eval_every=4",
        "ppo.eval_max_prompts=8",
        "ppo.checkpoint_every=1",
        "ppo.spread=true",
        "train.placement_strategy=SPREAD",
        "train.micro_batch_size=4",
        # Waits sized for a tiny model on a busy 2-core machine, not the defaults' 7B-70B ones (an hour for a
        # call, 15 minutes for a weight stream or a batch): whatever the node's loss leaves waiting on a process
        # that is gone gives up within minutes, and the run recovers as it would at full size
        "actor_timeout_s=300",
        "ppo.weight_sync_timeout_s=120",
        "ppo.take_timeout_s=300",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= common | {"RAY_ADDRESS": cluster.address, "PADDOCK_HOME": str(homes["driver"])}
    # Ray Train's controller takes a worker whose health check hangs for dead after this (its default: 10 min)
    env["RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"] = "120"
    command = [sys.executable, "jobs/ppo.py", "--config", "jobs/configs/tiny/ppo.yaml"]
    for o in overrides:
        command += ["--set", o]

    def job(name: str, *sets: str) -> subprocess.CompletedProcess[str]:
        """``jobs/<name>.py`` with its tiny config and ``sets``, as another driver on the cluster."""
        args = [sys.executable, f"jobs/{name}.py", "--config", f"jobs/configs/tiny/{name}.yaml"]
        args += [arg for o in sets for arg in ("--set", o)]
        return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    try:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
        reader.start()
        wait_for_checkpoint(storage, "mn-ppo-*", timeout_s=900, proc=proc)
        cluster.remove_node(nodes["b"])
        removed_at = len(lines)
        try:
            code = proc.wait(timeout=AFTER_LOSS_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            reader.join(timeout=30)
            said = "".join(line for line in lines if "[ppo]" in line)
            pytest.fail(
                f"PPO had not finished {AFTER_LOSS_S} s after the node's loss (at line {removed_at}); what it said:\n"
                f"{said[-6000:]}\nits last lines:\n{''.join(lines[-40:])[-4000:]}"
            )
        reader.join(timeout=30)
        # A second driver evaluates the registered policy on the node left: its rollout workers and scorers open
        # the models they are handed as pinned URIs, resolved into that node's cache (paths on the driver's disk
        # would not be there)
        evaluation = job(
            "evaluate",
            "model=models:/mn-ppo/1",
            "compare_to=[models:/mn-sft/1]",
            "reward_helpfulness=models:/mn-rm-helpfulness@latest",
            "reward_safety=models:/mn-rm-safety@latest",
            f"eval.prompts={world_dir}/prompts/test.parquet",
            f"eval.gatt={world_dir}/gatt/test.parquet",
            f"eval.dialogs={world_dir}/sft/test.parquet",
            "eval.max_prompts=8",
            "eval.max_gatt_dialogs=2",
            "eval.max_dialogs=8",
            "eval.safety_samples=1",
            "eval.max_new_tokens=16",
        )
        # A third driver fine-tunes on the node left with two Ray Train workers: they open the upstream model as a
        # pinned URI resolved into that node's cache, and save the tokenizer the driver sent them as bytes
        sft = job(
            "sft",
            f"tokenizer={tokenizer_dir}",
            "registry_prefix=mn",
            "model.init_from=models:/mn-base@latest",
            f"data.train={world_dir}/sft/train.parquet",
            f"data.test={world_dir}/sft/test.parquet",
            "data.seq_len=128",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.zero_stage=2",
            "train.max_steps=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.checkpoint_every=1",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    log = "".join(lines)
    assert code == 0, log[-6000:]
    assert "done after 4 iterations" in log and "registered models:/mn-ppo/1" in log, log[-3000:]
    print("".join(line for line in lines[removed_at:] if line.startswith("[ppo]")))  # after the loss
    # every worker node resolved the policy into its own cache (learners and rollout workers on both); the
    # driver's home holds what the driver itself read, and no node wrote Ray Train's results at home
    for n in ("a", "b"):
        assert (homes[n] / "models" / "mn-sft" / "v1" / "MLmodel").is_file(), sorted(homes[n].rglob("*"))[:20]
        assert not (homes[n] / "ray_results").exists()
    assert any(storage.glob("mn-ppo-*/checkpoint_*")), sorted(storage.iterdir())
    # the evaluated policy came home through the storage, which keeps no handoff afterwards
    best = homes["driver"] / "runs" / "mn-ppo" / "best"
    assert (best / "DIGEST").is_file() and (best / "model.safetensors").is_file()
    assert not any((storage / "paddock-handoff").rglob("*.safetensors"))
    # the registered version is on the server, and its weights are the ones evaluated
    registered = tracking.resolve_model("models:/mn-ppo/1")
    from paddock.models import checkpoint_digest

    assert checkpoint_digest(registered) == (best / "DIGEST").read_text().strip()
    # nothing committed was lost: every row the buffer took in went out to the learners, was dropped as stale, or
    # was still held at the end; the learners restarted at least once
    client = tracking.configure()
    [run] = client.search_runs(
        [tracking.experiment_id("paddock-tiny")], "tags.`paddock.registered_name` = 'mn-ppo'"
    )
    m = run.data.metrics
    assert m["ppo/learner_restarts"] >= 1, m
    assert m["buffer/rows_in_total"] == (
        m["buffer/rows_out_total"] + m["buffer/rows_dropped_total"] + m["buffer/rows_held_end"]
    )
    assert m["buffer/rows_out_total"] >= 4 * 16
    out = evaluation.stdout + evaluation.stderr
    assert evaluation.returncode == 0, out[-4000:]
    assert "eval/win_rate_vs_mn-sft" in out, out[-3000:]  # the compared model, loaded by the workers too
    for name in ("mn-ppo", "mn-sft", "mn-rm-helpfulness", "mn-rm-safety"):
        assert (homes["a"] / "models" / name / "v1" / "MLmodel").is_file(), name
    assert "eval/helpfulness_accuracy" in tracking.version_metrics("mn-ppo", "1")
    out = sft.stdout + sft.stderr
    assert sft.returncode == 0, out[-4000:]
    assert (homes["a"] / "models" / "mn-base" / "v1" / "MLmodel").is_file()  # the workers' own copy
    assert not (homes["a"] / "ray_results").exists() and any(storage.glob("mn-sft-*/checkpoint_*"))
    from paddock.tokenizer import load_tokenizer

    tuned, tok = tracking.resolve_model("models:/mn-sft/2"), load_tokenizer(tokenizer_dir)
    assert load_tokenizer(tuned).encode("What is the capital of Peru?") == tok.encode(
        "What is the capital of Peru?"
    )
