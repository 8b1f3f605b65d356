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
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from paddock import atomic\n"
            f"with atomic.locked({str(work)!r}, 'sft') as lock:\n"
            "    lock.note('sft, MLflow run 0123abcd')\n"
            "    print('held', flush=True)\n"
            "    time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
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
