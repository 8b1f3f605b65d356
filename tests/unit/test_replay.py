"""Replay: a sampling stage's fine-tune data mixed with earlier dialogs (train.stage.with_replay)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paddock.config import GAttJob
from paddock.data.schemas import DIALOGS
from paddock.data.validate import DatasetError
from paddock.train.stage import finetune_sft_job, with_replay

REPO = Path(__file__).resolve().parents[2]


def dialogs(path: Path, prefix: str, n: int) -> Path:
    rows = [
        {
            "id": f"{prefix}{i}",
            "system": None,
            "turns": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ],
            "tags": [prefix],
        }
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=DIALOGS), path)
    return path


def job(tmp_path: Path, **fields) -> GAttJob:
    return GAttJob(sft_config=str(REPO / "jobs/configs/tiny/sft.yaml"), registry_prefix="t", **fields)


def test_replay_adds_ratio_times_the_new_rows_without_repeats(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    own = dialogs(tmp_path / "gatt.parquet", "g", 10)
    dialogs(tmp_path / "sft.parquet", "s", 50)
    out = with_replay(job(tmp_path, replay=str(tmp_path / "sft.parquet"), replay_ratio=1.5), own, "gatt")
    rows = pq.read_table(out).to_pylist()
    replayed = [r for r in rows if "replay" in r["tags"]]
    assert len(rows) == 25 and len(replayed) == 15
    assert len({r["id"] for r in replayed}) == 15  # drawn without repeats while the pool lasts
    assert {r["id"] for r in rows if "replay" not in r["tags"]} == {f"g{i}" for i in range(10)}
    # Seeded: the same job draws the same rows in the same order.
    again = with_replay(job(tmp_path, replay=str(tmp_path / "sft.parquet"), replay_ratio=1.5), own, "gatt")
    assert pq.read_table(again).to_pylist() == rows


def test_a_small_replay_pool_is_cycled(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    own = dialogs(tmp_path / "cd.parquet", "c", 10)
    dialogs(tmp_path / "sft.parquet", "s", 4)
    out = with_replay(job(tmp_path, replay=str(tmp_path / "sft.parquet"), replay_ratio=1.0), own, "cd")
    replayed = [r for r in pq.read_table(out).to_pylist() if "replay" in r["tags"]]
    assert len(replayed) == 10 and {r["id"] for r in replayed} == {f"replay-s{i}" for i in range(4)}


def test_the_draw_is_split_evenly_over_several_replay_sets(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    own = dialogs(tmp_path / "cd.parquet", "c", 11)
    dialogs(tmp_path / "sft.parquet", "s", 50)
    dialogs(tmp_path / "gatt.parquet", "g", 3)  # smaller than its share: cycled
    out = with_replay(job(tmp_path, replay=["sft.parquet", "gatt.parquet"], replay_ratio=1.0), own, "cd")
    replayed = [r for r in pq.read_table(out).to_pylist() if "replay" in r["tags"]]
    by_set = {p: [r for r in replayed if p in r["tags"]] for p in ("s", "g")}
    assert len(replayed) == 11 and len(by_set["s"]) == 6 and len(by_set["g"]) == 5
    assert len({r["id"] for r in by_set["s"]}) == 6 and {r["id"] for r in by_set["g"]} == {
        f"replay-g{i}" for i in range(3)
    }
    with pytest.raises(DatasetError, match=r"nope\.parquet: no such dataset file"):
        finetune_sft_job(job(tmp_path, replay=["sft.parquet", "nope.parquet"]), None, "cd")


def test_fine_tune_reads_the_mixed_file_and_a_missing_replay_set_fails_before_sampling(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    own = dialogs(tmp_path / "gatt.parquet", "g", 4)
    dialogs(tmp_path / "sft.parquet", "s", 8)
    sft = finetune_sft_job(job(tmp_path, replay="sft.parquet"), own, "gatt")
    assert sft.data.train == str(tmp_path / "gatt.replay.parquet") and sft.registry_suffix == "gatt"
    with pytest.raises(DatasetError, match=r"nope\.parquet: no such dataset file"):
        finetune_sft_job(job(tmp_path, replay="nope.parquet"), None, "gatt")
