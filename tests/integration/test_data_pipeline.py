"""The Ray Data pipeline: validation and quarantine, tokenisation and packing, feeding Ray Train workers."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paddock.data.tokenize import IGNORE, encode_dialog
from paddock.data.validate import DatasetError

pytestmark = pytest.mark.integration


def test_packed_sft_data_keeps_every_answer_token(
    ray_cluster, world_dir: Path, tokenizer_dir: Path, tok, tmp_path: Path
):
    from paddock.train.data import packed_dataset

    rows = pq.read_table(world_dir / "sft" / "train.parquet").to_pylist()[:120]
    bad = {**rows[0], "id": "bad", "turns": [{"role": "assistant", "content": "no user"}]}
    src = tmp_path / "sft" / "train.parquet"
    src.parent.mkdir()
    pq.write_table(
        pa.Table.from_pylist([*rows, bad], schema=pq.read_schema(world_dir / "sft" / "train.parquet")), src
    )

    prepared = packed_dataset(
        src,
        "dialogs",
        tokenizer_dir,
        seq_len=64,
        max_bad_fraction=0.05,
        max_chars=2000,
        work_dir=tmp_path / "run",
    )
    assert prepared.report.n_bad == 1 and prepared.report.quarantine_path.is_file()
    out = prepared.dataset.take_all()
    assert all(len(r["input_ids"]) == 64 and len(r["labels"]) == 64 for r in out)
    trained = sum(int((r["labels"] != IGNORE).sum()) for r in out)
    expected = sum(
        sum(1 for label in encode_dialog(tok, r["turns"], r["system"]).labels if label != IGNORE)
        for r in rows
    )
    assert trained == expected


def test_bad_dataset_stops_before_any_worker(world_dir: Path, tokenizer_dir: Path, tmp_path: Path):
    from paddock.train.data import packed_dataset

    src = tmp_path / "pretrain.parquet"
    pq.write_table(pa.table({"text": ["fine", "", " ", "ok"]}), src)
    with pytest.raises(DatasetError, match=r"2 of 4 rows .* the bad rows are in .*quarantine"):
        packed_dataset(
            src, "pretrain", tokenizer_dir, seq_len=32, max_bad_fraction=0.1, max_chars=100, work_dir=tmp_path
        )


def test_two_train_workers_each_get_a_disjoint_shard(
    ray_cluster, world_dir: Path, tokenizer_dir: Path, tmp_path: Path
):
    import ray.train
    from paddock.train.data import packed_dataset
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prepared = packed_dataset(
        world_dir / "pretrain" / "test.parquet",
        "pretrain",
        tokenizer_dir,
        seq_len=128,
        max_bad_fraction=0.0,
        max_chars=20_000,
        work_dir=tmp_path,
    )
    total = prepared.dataset.count()
    out_dir = tmp_path / "seen"
    out_dir.mkdir()

    def loop(config):
        ctx = ray.train.get_context()
        seen = []
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8):
            assert batch["input_ids"].shape[1] == 128
            seen += [tuple(row[:16].tolist()) for row in batch["input_ids"]]
        (Path(config["out"]) / f"{ctx.get_world_rank()}.json").write_text(json.dumps(seen))

    TorchTrainer(
        loop,
        train_loop_config={"out": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": prepared.dataset},
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="shards"),
    ).fit()
    shards = [json.loads((out_dir / f"{r}.json").read_text()) for r in (0, 1)]
    assert all(shards) and len(shards[0]) + len(shards[1]) == total
