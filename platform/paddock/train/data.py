"""Ray Data pipelines that feed Ray Train workers: validate, read, tokenise and pack.

Validation runs first, on the driver (``paddock.data.validate``): bad rows are counted and quarantined, and a
dataset over its bad-row limit stops the stage before any worker starts. Large inputs are then streamed:
Ray Data reads the clean Parquet and tokenises and packs it in ``map_batches`` tasks; each worker process
loads a tokenizer once and keeps it (tasks reuse Ray's warm worker processes, where an actor pool would
start fresh ones for every dataset). Small inputs (``SMALL_INPUT_BYTES``, every tiny-world file) are
tokenised in the driver, batch by batch with the same function, and enter Ray Data as Arrow blocks: the
tiny pretraining corpus packs in under a second that way against 20-55 s of ``map_batches`` task
scheduling on a 2-core machine. Both give the same rows in the same order. The result is a
dataset of fixed-length rows ``{"input_ids", "labels", "position_ids": int32[seq_len]}`` that
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

from paddock import atomic
from paddock.data.pairs import bin_index, encode_answer, rating_index
from paddock.data.tokenize import (
    PACKED_COLUMNS,
    Example,
    TrainOn,
    encode_dialog,
    encode_pretrain_batch,
    pack,
)
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

    Each batch is packed on its own; its last window is padded with ignored positions, so no token is
    dropped. Pretraining text is cut wherever a window ends; a dialog is kept whole in one window unless it
    is longer than a window (``pack``'s ``split_examples``).
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
        examples = self.examples(batch.to_pylist())
        windows = list(pack(examples, self.seq_len, PAD_ID, split_examples=self.kind == "pretrain"))
        return {
            key: np.array([getattr(w, key) for w in windows], dtype=np.int32).reshape(-1, self.seq_len)
            for key in PACKED_COLUMNS
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
    atomic.write_parquet(report.good, clean)
    return clean, report


# Inputs up to this size (Parquet on disk) are tokenised in the driver and enter Ray Data as Arrow blocks;
# ``read_parquet``'s listing tasks alone cost ~10 s a read on a 2-core machine whatever the size, and the
# ``map_batches`` tasks another 10-45 s on the tiny world for under a second of tokenising.
SMALL_INPUT_BYTES = 64 * 2**20


def _mapped(path: Path, fn: Any, fn_kwargs: dict[str, Any], batch_rows: int) -> ray.data.Dataset:
    """``fn`` over ``path`` in batches of ``batch_rows`` rows: in the driver when small, else streamed."""
    if path.stat().st_size > SMALL_INPUT_BYTES:
        return ray.data.read_parquet(str(path)).map_batches(
            fn,
            fn_kwargs=fn_kwargs,
            batch_size=batch_rows,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
    table = pq.read_table(path)
    blocks = []
    for i in range(0, max(table.num_rows, 1), batch_rows):
        out = fn(table.slice(i, batch_rows), **fn_kwargs)
        blocks.append(pa.table({k: _column(v) for k, v in out.items()}))
    return ray.data.from_arrow(blocks)


def _column(values: np.ndarray) -> pa.Array:
    """A numpy column as Arrow: 2-D arrays as Ray's tensor extension type, which ``map_batches`` also makes."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(values) if values.ndim > 1 else pa.array(values)


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
    """Validate, then tokenise and pack (``TokenizeAndPack``) in batches of ``batch_rows`` rows."""
    clean, report = validated_parquet(
        path, kind, max_bad_fraction=max_bad_fraction, max_chars=max_chars, work_dir=work_dir
    )
    fn_kwargs = {"tokenizer_dir": str(tokenizer_dir), "kind": kind, "seq_len": seq_len, "train_on": train_on}
    return PreparedData(_mapped(clean, _pack_batch, fn_kwargs, batch_rows), report, clean)


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
    """``TokenizePairs`` over an already validated preferences file, in batches of ``batch_rows`` rows."""
    fn_kwargs = {"tokenizer_dir": str(tokenizer_dir), "seq_len": seq_len, "margin": margin}
    return _mapped(rows_path, _pairs_batch, fn_kwargs, batch_rows)
