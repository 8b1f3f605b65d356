"""The Ray Data pipeline: validation and quarantine, tokenisation and packing, feeding Ray Train workers."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paddock.data.tokenize import IGNORE, encode_dialog
from paddock.data.validate import DatasetError

pytestmark = pytest.mark.integration


def test_packed_sft_data_keeps_every_answer_token(
    ray_cluster, world_dir: Path, tokenizer_dir: Path, tok, tmp_path: Path, monkeypatch
):
    import math

    import paddock.train.data as data
    from paddock.train.data import packed_dataset

    rows = pq.read_table(world_dir / "sft" / "train.parquet").to_pylist()[:120]
    bad = {**rows[0], "id": "bad", "turns": [{"role": "assistant", "content": "no user"}]}
    src = tmp_path / "sft" / "train.parquet"
    src.parent.mkdir()
    pq.write_table(
        pa.Table.from_pylist([*rows, bad], schema=pq.read_schema(world_dir / "sft" / "train.parquet")), src
    )

    def prepare():  # type: ignore[no-untyped-def]
        return packed_dataset(
            src,
            "dialogs",
            tokenizer_dir,
            seq_len=64,
            max_bad_fraction=0.05,
            max_chars=2000,
            work_dir=tmp_path / "run",
            batch_rows=50,
        )

    prepared = prepare()  # a small file: tokenised in the driver
    assert prepared.report.n_bad == 1 and prepared.report.quarantine_path.is_file()
    out = prepared.dataset.take_all()
    monkeypatch.setattr(data, "SMALL_INPUT_BYTES", 0)  # the same file streamed through map_batches tasks
    streamed = prepare().dataset.take_all()
    assert len(streamed) == len(out) and all(
        all((a[k] == b[k]).all() for k in ("input_ids", "labels", "position_ids"))
        for a, b in zip(out, streamed, strict=True)
    )
    # Dialogs are packed whole: only the continuation windows of dialogs longer than a window start mid-dialog.
    lengths = [len(encode_dialog(tok, r["turns"], r["system"]).input_ids) for r in rows]
    continued = sum(math.ceil(n / 64) - 1 for n in lengths if n > 64)
    assert sum(int(r["input_ids"][0]) != tok.bos_token_id for r in out) == continued
    assert all(len(r["input_ids"]) == 64 and len(r["labels"]) == 64 for r in out)
    trained = sum(int((r["labels"] != IGNORE).sum()) for r in out)
    labels = [encode_dialog(tok, r["turns"], r["system"]).labels for r in rows]
    expected = sum(sum(1 for label in ls if label != IGNORE) for ls in labels)
    # A window's first token is predicted from nothing: where a long dialog continues into the next window, the
    # token at the cut carries no loss (it never did: the loss shifts labels by one).
    at_cuts = sum(1 for ls in labels for j in range(64, len(ls), 64) if ls[j] != IGNORE)
    assert trained == expected - at_cuts
    # Examples stay apart: positions count up within a dialog (all its turns) and restart only where a dialog,
    # or the padding, starts.
    starts = 0
    for r in out:
        ids, pos = r["input_ids"].tolist(), r["position_ids"].tolist()
        assert pos[0] == 0
        for i in range(1, 64):
            assert pos[i] == pos[i - 1] + 1 or (pos[i] == 0 and ids[i] in (tok.bos_token_id, 0)), (
                i,
                ids,
                pos,
            )
            starts += pos[i] == 0 and ids[i] == tok.bos_token_id
    assert starts == len(rows) - sum(int(r["input_ids"][0]) == tok.bos_token_id for r in out)


@pytest.mark.reliability
def test_bad_dataset_stops_before_any_worker(world_dir: Path, tokenizer_dir: Path, tmp_path: Path):
    from paddock.train.data import packed_dataset

    src = tmp_path / "pretrain.parquet"
    pq.write_table(pa.table({"text": ["fine", "", " ", "ok"]}), src)
    with pytest.raises(DatasetError, match=r"2 of 4 rows .* the bad rows are in .*quarantine"):
        packed_dataset(
            src, "pretrain", tokenizer_dir, seq_len=32, max_bad_fraction=0.1, max_chars=100, work_dir=tmp_path
        )


def test_each_rank_keeps_its_own_slice_of_every_global_micro_batch(
    ray_cluster, world_dir: Path, tokenizer_dir: Path, tmp_path: Path
):
    """paddock's sharding (``train.loop.micro_batches``): every rank reads the same ordered stream and keeps rows
    [r*mb, (r+1)*mb) of each global micro-batch, so the ranks see disjoint rows that together cover the stream,
    and a resumed rank skips exactly the micro-batches already consumed."""
    import ray.data
    from paddock.train.data import packed_dataset
    from paddock.train.loop import micro_batches

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as prepare() sets it
    prepared = packed_dataset(
        world_dir / "pretrain" / "test.parquet",
        "pretrain",
        tokenizer_dir,
        seq_len=128,
        max_bad_fraction=0.0,
        max_chars=20_000,
        work_dir=tmp_path,
    )
    ds = prepared.dataset.materialize()
    rows = [r["input_ids"].tolist() for r in ds.take_all()]
    mb, world = 4, 2
    steps = len(rows) // (mb * world)
    assert steps >= 5

    def seen(rank: int, skip: int, n: int) -> list[list[int]]:
        it = micro_batches(ds, ("input_ids",), mb, rank, world, skip=skip)
        return [row.tolist() for _ in range(n) for row in next(it)["input_ids"]]

    ranks = [seen(r, 0, steps) for r in range(world)]
    for k in range(steps):
        step = rows[k * mb * world : (k + 1) * mb * world]
        assert ranks[0][k * mb : (k + 1) * mb] == step[:mb]
        assert ranks[1][k * mb : (k + 1) * mb] == step[mb:]
    # A rank resumed after 3 steps starts at the 4th global micro-batch.
    assert seen(1, 3, 1) == rows[3 * mb * world + mb : 4 * mb * world]
