"""Ray Data pipelines that feed Ray Train workers: validate, read, tokenise and pack.

Validation runs first, on the driver (``paddock.data.validate``): bad rows are counted and quarantined, and a
dataset over its bad-row limit stops the stage before any worker starts. Ray Data then reads the clean
Parquet (``source``: small files from the driver's memory, large ones streamed) and tokenises and packs it in ``map_batches`` tasks; each worker process loads a tokenizer once and
keeps it (tasks reuse Ray's warm worker processes, where an actor pool would start fresh ones for every
dataset: on a 2-core laptop that start-up cost more than the tokenising). The result is a
dataset of fixed-length rows ``{"input_ids": int32[seq_len], "labels": int32[seq_len]}`` that
``ray.train.get_dataset_shard`` splits across workers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from paddock.data.pairs import bin_index, encode_answer, rating_index
from paddock.data.tokenize import Example, TrainOn, encode_dialog, encode_pretrain_batch, pack
from paddock.data.validate import ValidationReport, load_dataset
from paddock.models import PAD_ID
from paddock.rlhf.reward import rating_margin
from paddock.tokenizer import load_tokenizer


@dataclass
class PreparedData:
    dataset: ray.data.Dataset
    report: ValidationReport
    path: Path


class TokenizeAndPack:
    """One tokenizer, a batch of rows in, packed windows out (the map_batches tasks keep one per process).

    Each batch is packed on its own; its last window is padded with ignored positions, so a batch of
    ``batch_size`` rows wastes less than one window and no token is dropped.
    """

    def __init__(self, tokenizer_dir: str, kind: str, seq_len: int, train_on: TrainOn = "answers"):
        self.tok = load_tokenizer(tokenizer_dir)
        self.kind, self.seq_len, self.train_on = kind, seq_len, train_on

    def examples(self, rows: list[dict]) -> list[Example]:
        if self.kind == "pretrain":
            return encode_pretrain_batch(self.tok, [r["text"] for r in rows])
        if self.kind == "dialogs":
            return [encode_dialog(self.tok, r["turns"], r["system"], self.train_on) for r in rows]
        raise ValueError(f"cannot pack dataset kind {self.kind!r}; packing is for pretrain and dialogs")

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        windows = list(pack(self.examples(batch.to_pylist()), self.seq_len, PAD_ID))
        return {
            "input_ids": np.array([w.input_ids for w in windows], dtype=np.int32).reshape(-1, self.seq_len),
            "labels": np.array([w.labels for w in windows], dtype=np.int32).reshape(-1, self.seq_len),
        }


@functools.lru_cache(maxsize=8)
def _cached(cls: type, *args: Any) -> Any:
    return cls(*args)


def _pack_batch(
    batch: pa.Table, tokenizer_dir: str, kind: str, seq_len: int, train_on: str
) -> dict[str, np.ndarray]:
    return _cached(TokenizeAndPack, tokenizer_dir, kind, seq_len, train_on)(batch)


def _pairs_batch(batch: pa.Table, tokenizer_dir: str, seq_len: int, margin: str) -> dict[str, np.ndarray]:
    return _cached(TokenizePairs, tokenizer_dir, seq_len, margin)(batch)


def validated_parquet(
    path: Path, kind: str, *, max_bad_fraction: float, max_chars: int, work_dir: Path
) -> tuple[Path, ValidationReport]:
    """Validate ``path``; return it unchanged when clean, else a clean copy under ``work_dir``."""
    report = load_dataset(
        path,
        kind,
        max_bad_fraction=max_bad_fraction,
        max_chars=max_chars,
        quarantine_dir=work_dir / "quarantine",
    )
    if report.n_bad == 0:
        return path, report
    clean = work_dir / "clean" / f"{path.parent.name}-{path.name}"
    clean.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(report.good, clean)
    return clean, report


# Inputs up to this size (Parquet on disk) enter Ray Data from the driver's memory in blocks of a batch;
# ``read_parquet``'s file listing and metadata tasks cost ~10 s a read on a 2-core machine whatever the size.
SMALL_INPUT_BYTES = 64 * 2**20


def source(path: Path, batch_rows: int) -> ray.data.Dataset:
    """``path`` as a Ray Dataset: one block per ``batch_rows`` rows when small, streamed when large."""
    if path.stat().st_size > SMALL_INPUT_BYTES:
        return ray.data.read_parquet(str(path))
    table = pq.read_table(path)
    blocks = [table.slice(i, batch_rows) for i in range(0, table.num_rows, batch_rows)]
    return ray.data.from_arrow(blocks or [table])


def packed_dataset(
    path: Path,
    kind: str,
    tokenizer_dir: Path,
    *,
    seq_len: int,
    max_bad_fraction: float,
    max_chars: int,
    work_dir: Path,
    train_on: TrainOn = "answers",
    batch_rows: int = 256,
) -> PreparedData:
    """Validate, then ``source -> map_batches(TokenizeAndPack)``. Lazy: nothing runs until consumed."""
    clean, report = validated_parquet(
        path, kind, max_bad_fraction=max_bad_fraction, max_chars=max_chars, work_dir=work_dir
    )
    ds = source(clean, batch_rows).map_batches(
        _pack_batch,  # type: ignore[arg-type]  # extra arguments arrive as fn_kwargs
        fn_kwargs={
            "tokenizer_dir": str(tokenizer_dir),
            "kind": kind,
            "seq_len": seq_len,
            "train_on": train_on,
        },
        batch_size=batch_rows,
        batch_format="pyarrow",
        num_cpus=0.5,
    )
    return PreparedData(ds, report, clean)


class TokenizePairs:
    """Preference pairs in, right-padded chosen and rejected ids plus margins out (cached like TokenizeAndPack)."""

    def __init__(self, tokenizer_dir: str, seq_len: int, margin: str):
        self.tok = load_tokenizer(tokenizer_dir)
        self.seq_len, self.margin = seq_len, margin

    def _padded(self, ids: list[int]) -> list[int]:
        return ids + [PAD_ID] * (self.seq_len - len(ids))

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = batch.to_pylist()
        chosen = [self._padded(encode_answer(self.tok, r["prompt"], r["chosen"], self.seq_len)) for r in rows]
        rejected = [
            self._padded(encode_answer(self.tok, r["prompt"], r["rejected"], self.seq_len)) for r in rows
        ]
        return {
            "chosen_ids": np.array(chosen, dtype=np.int32).reshape(-1, self.seq_len),
            "rejected_ids": np.array(rejected, dtype=np.int32).reshape(-1, self.seq_len),
            "margin": np.array([rating_margin(r["rating"], self.margin) for r in rows], dtype=np.float32),
            "rating": np.array([rating_index(r["rating"]) for r in rows], dtype=np.int8),
            "safety_bin": np.array([bin_index(r["safety_bin"]) for r in rows], dtype=np.int8),
        }


def pairs_dataset(
    rows_path: Path, tokenizer_dir: Path, *, seq_len: int, margin: str, batch_rows: int = 256
) -> ray.data.Dataset:
    """``source -> map_batches(TokenizePairs)`` over an already validated preferences file."""
    return source(rows_path, batch_rows).map_batches(
        _pairs_batch,  # type: ignore[arg-type]  # extra arguments arrive as fn_kwargs
        fn_kwargs={"tokenizer_dir": str(tokenizer_dir), "seq_len": seq_len, "margin": margin},
        batch_size=batch_rows,
        batch_format="pyarrow",
        num_cpus=0.5,
    )
