"""Whole-or-nothing writes and one run per output directory (paddock.atomic)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from paddock import atomic


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def hold_lock(directory, note: str) -> subprocess.Popen:
    """Another process holding ``directory``'s lock for SFT (until killed), with ``note`` as its holder."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from paddock import atomic\n"
            f"with atomic.locked({str(directory)!r}, 'sft') as lock:\n"
            f"    lock.note({note!r})\n"
            "    print('held', flush=True)\n"
            "    time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_file_written_whole_or_not_at_all(tmp_path):
    state = tmp_path / "state.json"
    atomic.write_text(state, '{"done": {"sft": 1}}')
    with pytest.raises(RuntimeError, match="disk full"), atomic.writing_file(state) as tmp:
        tmp.write_text('{"done": {"sft": 1, "rm')  # killed halfway
        raise RuntimeError("disk full")
    assert state.read_text() == '{"done": {"sft": 1}}' and leftovers(tmp_path) == []
    import pyarrow as pa
    import pyarrow.parquet as pq

    atomic.write_parquet(pa.table({"x": [1, 2]}), tmp_path / "data" / "rows.parquet")
    assert pq.read_table(tmp_path / "data" / "rows.parquet")["x"].to_pylist() == [1, 2]


def test_a_directory_replaced_whole_or_not_at_all(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"new weights")
    out = tmp_path / "final"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "stale.txt").write_text("from the old model")
    with pytest.raises(OSError), atomic.writing_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("killed")
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    atomic.copy_dir(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"new weights" and leftovers(tmp_path) == []


def test_a_second_run_of_a_stage_is_refused_naming_the_first_and_a_killed_holder_frees_it(tmp_path):
    work = tmp_path / "runs" / "tiny-sft"
    holder = hold_lock(work, "sft, MLflow run 0123abcd")
    try:
        with (
            pytest.raises(
                atomic.LockedError, match=r"in use by another run of sft: sft, MLflow run 0123abcd"
            ),
            atomic.locked(work, "sft"),
        ):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a killed holder: the kernel releases its lock
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with atomic.locked(work, "sft") as lock, atomic.locked(work, "sft") as inner:
                assert inner is lock  # reentrant within a process (GAtt's fine-tune inside GAtt)
            break
        except atomic.LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_second_sft_job_on_the_same_home_is_refused_before_it_starts(tmp_path):
    """jobs/sft.py as a user runs it, while another run of SFT holds runs/tiny-sft: exit 2 at once, the error
    naming the holder, nothing written or started."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env |= {"PADDOCK_HOME": str(home)}
    holder = hold_lock(home / "runs" / "tiny-sft", "sft, MLflow run 4567ef01")
    try:
        second = subprocess.run(
            [sys.executable, "jobs/sft.py", "--config", "jobs/configs/tiny/sft.yaml"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert "is in use by another run of sft: sft, MLflow run 4567ef01" in second.stderr
    assert "Traceback" not in second.stderr
    assert sorted(p.name for p in (home / "runs" / "tiny-sft").iterdir()) == [".paddock.lock"]


def test_the_model_cache_takes_whole_downloads_only(tmp_path, monkeypatch):
    """A version is downloaded beside the cache and renamed in whole; an interrupted download of old is replaced;
    a copy another process renamed in first is kept, and the second download is thrown away."""
    import mlflow
    import yaml
    from paddock import tracking

    def write_model(root, marker: str) -> None:
        (root / "artifacts" / "checkpoint").mkdir(parents=True)
        (root / "artifacts" / "checkpoint" / "config.json").write_text(marker)
        flavor = {"python_function": {"artifacts": {"checkpoint": {"path": "artifacts/checkpoint"}}}}
        (root / "MLmodel").write_text(yaml.safe_dump({"flavors": flavor}))

    cache = tmp_path / "models" / "tiny-sft" / "v1"
    cache.mkdir(parents=True)
    (cache / "MLmodel").write_text("half a download")  # interrupted, by the code before atomic downloads
    seen: list[str] = []

    def download(artifact_uri: str, dst_path: str) -> str:
        seen.append(dst_path)
        assert not dst_path.endswith("/v1")  # never into the cache itself
        write_model(tmp_path / dst_path, "ours")
        return dst_path

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    tracking._download("models:/tiny-sft/1", cache)
    assert (cache / "artifacts/checkpoint/config.json").read_text() == "ours"

    other = tmp_path / "models" / "tiny-sft" / "v2"

    def raced(artifact_uri: str, dst_path: str) -> str:
        write_model(other, "theirs")  # another process finishes first
        write_model(tmp_path / dst_path, "ours")
        return dst_path

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", raced)
    tracking._download("models:/tiny-sft/2", other)
    assert (other / "artifacts/checkpoint/config.json").read_text() == "theirs"
    assert leftovers(cache.parent) == []


def test_a_keyed_table_is_read_back_under_its_key_only(tmp_path, capsys):
    """What a stage sampled (``write_keyed``) comes back for the same inputs, with its notes, and not otherwise."""
    import pyarrow as pa

    path = tmp_path / "samples.parquet"
    assert atomic.read_keyed(path, "k", "stage") is None  # nothing written yet
    key = atomic.key_of({"models": ["models:/tiny-sft/1"], "seed": 0, "prompts": [{"id": "p1", "turns": []}]})
    assert key == atomic.key_of(
        {"seed": 0, "prompts": [{"turns": [], "id": "p1"}], "models": ["models:/tiny-sft/1"]}
    )
    assert key != atomic.key_of(
        {"models": ["models:/tiny-sft/2"], "seed": 0, "prompts": [{"id": "p1", "turns": []}]}
    )
    table = pa.table({"text": ["a", "b"]}).replace_schema_metadata({b"other": b"kept"})
    atomic.write_keyed(table, path, key, followed="0.25")

    found = atomic.read_keyed(path, key, "stage")
    assert found is not None
    got, meta = found
    assert got.column("text").to_pylist() == ["a", "b"] and meta == {"followed": "0.25"}
    assert got.schema.metadata[b"other"] == b"kept"
    assert "[stage] reusing" in capsys.readouterr().out
    assert atomic.read_keyed(path, "another key", "stage") is None
    assert "sampling again" in capsys.readouterr().out
