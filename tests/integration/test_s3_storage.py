"""``PADDOCK_STORAGE`` as an S3 bucket: a local S3 endpoint (moto's server on loopback) stands in for the bucket.

A user on a cluster without a shared filesystem sets ``PADDOCK_STORAGE=s3://bucket/prefix`` and the usual AWS
variables (``AWS_ENDPOINT_URL`` for an S3-compatible store). Ray Train's checkpoints go there, and actors hand
directories to the driver through it (``cluster.handoff_dir``, ``put_dir``, ``fetch_dir``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from chain import REPO, overrides

pytestmark = [pytest.mark.integration]

BUCKET = "paddock-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A bucket on a loopback S3 endpoint, and the environment that reaches it."""
    pytest.importorskip("moto")
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir(BUCKET)
    yield env
    server.stop()


def _listing(env: dict[str, str], prefix: str) -> list[str]:
    import pyarrow.fs

    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    infos = fs.get_file_info(
        pyarrow.fs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    )
    return sorted(
        i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == pyarrow.fs.FileType.File
    )


def test_a_handoff_goes_through_the_bucket_and_is_read_once(
    s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paddock.cluster import fetch_dir, handoff_dir, put_dir

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PADDOCK_STORAGE", f"s3://{BUCKET}/handoffs")
    source = tmp_path / "best"
    (source / "nested").mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"\x01" * 4096)
    (source / "nested" / "DIGEST").write_text("abc\n")
    dest = handoff_dir("0123456789abcdef", "best")
    assert dest == f"s3://{BUCKET}/handoffs/paddock-handoff/01234567/best"
    put_dir(str(source), dest)
    assert _listing(s3, "handoffs/paddock-handoff/01234567/best") == ["model.safetensors", "nested/DIGEST"]
    home = tmp_path / "home" / "best"
    fetch_dir(dest, home)
    assert (home / "model.safetensors").read_bytes() == b"\x01" * 4096
    assert (home / "nested" / "DIGEST").read_text() == "abc\n"
    assert _listing(s3, "handoffs/paddock-handoff/01234567/best") == []  # read once, then gone


@pytest.mark.slow
def test_a_supervised_stage_checkpoints_to_the_bucket(
    s3: dict[str, str], world_dir: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """A pretraining run with Ray Train workers (its own Ray instance, as a job's driver starts one) writes its
    checkpoints to ``s3://<bucket>/ray_results`` and nothing under its home's ``ray_results``, and registers."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env |= s3 | {"PADDOCK_HOME": str(home), "PADDOCK_STORAGE": f"s3://{BUCKET}/ray_results"}
    sets = [
        *overrides(world_dir, tokenizer_dir)["pretrain"],
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=4",
        "optim.warmup_steps=1",
    ]
    command = [sys.executable, "jobs/pretrain.py", "--config", "jobs/configs/tiny/pretrain.yaml"]
    for s in sets:
        command += ["--set", s]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "[pretrain] done: models:/tiny-base/1" in out, out[-3000:]
    stored = _listing(s3, "ray_results")
    runs = {p.split("/")[0] for p in stored}
    assert len(runs) == 1 and next(iter(runs)).startswith("tiny-base-"), stored[:20]
    checkpoints = {p.split("/")[1] for p in stored if p.split("/")[1].startswith("checkpoint_")}
    assert len(checkpoints) >= 2, stored  # steps 2 and 4
    assert not (home / "ray_results").exists()
