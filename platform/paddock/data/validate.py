"""Row validation with quarantine: bad rows are counted, written with their reason, and never dropped silently.

``load_dataset`` reads a Parquet file of one kind, checks every row against the kind's schema and rules,
writes the bad rows to a quarantine Parquet file (row index, reason, the row as JSON) and returns the good
rows as a table of the exact schema. It refuses the dataset when the bad share exceeds the configured limit,
naming the quarantine file. ``good + bad == total`` always holds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paddock import atomic
from paddock.data.chat import ChatFormatError, check_turns
from paddock.data.schemas import PREFERENCE_KINDS, RATINGS, SAFETY_BINS, schema_for

QUARANTINE = pa.schema(
    [pa.field("row", pa.int64()), pa.field("reason", pa.string()), pa.field("data", pa.string())]
)


class DatasetError(ValueError):
    """A dataset that cannot be used: unreadable, or more bad rows than the stage accepts."""


@dataclass
class ValidationReport:
    kind: str
    source: str
    total: int
    good: pa.Table
    bad: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    quarantine_path: Path | None = None

    @property
    def n_bad(self) -> int:
        return len(self.bad)

    @property
    def bad_fraction(self) -> float:
        return self.n_bad / self.total if self.total else 0.0

    def reasons(self) -> Counter[str]:
        return Counter(reason.split(":")[0] for _, reason, _ in self.bad)


def _type_error(name: str, value: Any, want: str) -> str:
    return f"wrong type: column '{name}' expected {want}, got {type(value).__name__}"


def _turns_error(name: str, turns: Any, max_chars: int, last: str | None) -> str | None:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return _type_error(name, turns, "a list of {role, content}")
    for t in turns:
        if not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
            return _type_error(name, t.get("content"), "string role and content")
        if len(t["content"]) > max_chars:
            return f"too long: a message in '{name}' has {len(t['content'])} characters, limit {max_chars}"
    try:
        check_turns(turns)
    except ChatFormatError as exc:
        reason = str(exc)
        if "empty" in reason:
            return f"empty text: {name} {reason}"
        if "chat tag" in reason:
            return f"chat tag in user text: {name} {reason}"
        return f"invalid role order: {name} {reason}"
    if last is not None and turns[-1]["role"] != last:
        article = "an" if last == "assistant" else "a"
        return f"invalid role order: '{name}' must end with {article} {last} turn"
    return None


def _text_error(name: str, value: Any, max_chars: int, nullable: bool = False) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        return _type_error(name, value, "string")
    if not value.strip():
        return f"empty text: column '{name}' is empty"
    if len(value) > max_chars:
        return f"too long: column '{name}' has {len(value)} characters, limit {max_chars}"
    return None


def row_error(kind: str, row: dict[str, Any], max_chars: int) -> str | None:
    """Why a row is bad, or None. The reason starts with a short category ('wrong type: ...')."""
    if kind == "pretrain":
        return _text_error("text", row["text"], max_chars)
    if not isinstance(row["id"], str) or not row["id"]:
        return _type_error("id", row["id"], "a non-empty string")
    if kind == "dialogs":
        if row["system"] is not None:
            err = _text_error("system", row["system"], max_chars)
            if err:
                return err
        if not isinstance(row["tags"], list) or not all(isinstance(t, str) for t in row["tags"]):
            return _type_error("tags", row["tags"], "a list of strings")
        return _turns_error("turns", row["turns"], max_chars, last="assistant")
    if kind == "prompts":
        if not isinstance(row["is_safety"], bool):
            return _type_error("is_safety", row["is_safety"], "bool")
        return _turns_error("turns", row["turns"], max_chars, last="user")
    if kind == "preferences":
        err = (
            _turns_error("prompt", row["prompt"], max_chars, last="user")
            or _text_error("chosen", row["chosen"], max_chars)
            or _text_error("rejected", row["rejected"], max_chars)
        )
        if err:
            return err
        if row["rating"] not in RATINGS:
            return f"bad value: rating {row['rating']!r}, valid: {', '.join(RATINGS)}"
        if row["kind"] not in PREFERENCE_KINDS:
            return f"bad value: kind {row['kind']!r}, valid: {', '.join(PREFERENCE_KINDS)}"
        if row["safety_bin"] is not None and row["safety_bin"] not in SAFETY_BINS:
            return f"bad value: safety_bin {row['safety_bin']!r}, valid: {', '.join(SAFETY_BINS)} or null"
        return None
    raise ValueError(f"unknown dataset kind {kind!r}")


def validate_rows(
    rows: Sequence[dict[str, Any]], kind: str, max_chars: int, source: str = "rows"
) -> ValidationReport:
    schema = schema_for(kind)
    good, bad = [], []
    for i, row in enumerate(rows):
        missing = [n for n in schema.names if n not in row]
        reason = (
            f"missing column: {', '.join(repr(m) for m in missing)}"
            if missing
            else row_error(kind, row, max_chars)
        )
        if reason is None:
            good.append({n: row[n] for n in schema.names})
        else:
            bad.append((i, reason, row))
    return ValidationReport(kind, source, len(rows), pa.Table.from_pylist(good, schema=schema), bad)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_quarantine(report: ValidationReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"row": i, "reason": r, "data": json.dumps(_jsonable(row), default=str)} for i, r, row in report.bad
    ]
    atomic.write_parquet(pa.Table.from_pylist(rows, schema=QUARANTINE), path)
    report.quarantine_path = path
    return path


def _decode(value: bytes | None) -> str | bytes | None:
    """Valid UTF-8 as str; anything else stays bytes, so validation reports that row alone."""
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file as dicts, with string columns that are not valid UTF-8 kept as bytes."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(
            f"{path}: cannot read Parquet ({exc}); rewrite the file or point the config elsewhere"
        ) from exc
    columns = {}
    for name in table.column_names:
        col = table[name]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                raw = col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
                columns[name] = [_decode(v) for v in raw.to_pylist()]
                continue
        columns[name] = col.to_pylist()
    return [{n: columns[n][i] for n in columns} for i in range(table.num_rows)]


def load_dataset(
    path: str | Path,
    kind: str,
    *,
    quarantine_dir: str | Path,
    max_bad_fraction: float = 0.01,
    max_chars: int = 20_000,
) -> ValidationReport:
    """Read, validate and quarantine one Parquet file. Raises DatasetError past ``max_bad_fraction``.

    The defaults are ``DataConfig``'s; stages without a data section (RL, synthesis, evaluation) use them.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"{path}: no such dataset file; run jobs/world.py first or fix the config's data path"
        )
    rows = read_rows(path)
    report = validate_rows(rows, kind, max_chars, source=str(path))
    report.source = str(path)
    if report.bad:
        write_quarantine(report, Path(quarantine_dir) / f"{path.parent.name}-{path.stem}.quarantine.parquet")
    if report.total == 0:
        raise DatasetError(f"{path}: dataset is empty")
    if report.bad_fraction > max_bad_fraction:
        top = ", ".join(f"{r} ({n})" for r, n in report.reasons().most_common(3))
        raise DatasetError(
            f"{path}: {report.n_bad} of {report.total} rows ({report.bad_fraction:.1%}) failed validation, "
            f"above the limit of {max_bad_fraction:.1%}; reasons: {top}; the bad rows are in {report.quarantine_path}"
        )
    return report
