"""Datasets in the formats people publish, converted into paddock's four kinds with the usual quarantine.

Shapes (one example row of each in the README, "Bring your own data"):

- dialogs: OpenAI-style ``messages`` (``system`` / ``user`` / ``assistant``; leading system messages become the
  dialog's ``system``), or ShareGPT ``conversations`` (``from``: human / gpt / system, ``value``);
- preferences: ``chosen`` / ``rejected`` as message lists sharing the prompt turns (UltraFeedback binarized;
  ``score_chosen`` / ``score_rejected`` mapped onto the four Llama 2 ratings by score gap), or as answer strings
  beside a ``prompt`` column, or Anthropic HH-RLHF transcripts (``\\n\\nHuman: ... \\n\\nAssistant: ...``, the
  shared turns split off as the prompt);
- prompts: a ``prompt`` string, or ``messages`` ending with a user turn;
- pretrain: a ``text`` column, or plain ``.txt`` files.

Reading: Parquet, CSV, Arrow, text files and hub names go through Hugging Face ``datasets``. JSON Lines and JSON
are read row by row here: ``datasets`` infers one Arrow schema per file and refuses the whole file for one
unparsable or mistyped row, where paddock quarantines that row and keeps the rest.

Every row is converted, then checked by the kind's own validation (``validate.row_error``); a bad row goes to
``<out>/<name>/quarantine.parquet`` with its row number, the reason and the row as read, and the dataset is
refused (nothing written but the quarantine) when the bad share passes ``max_bad_fraction``.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from paddock import atomic
from paddock.data.schemas import RATINGS, schema_for
from paddock.data.validate import DatasetError, ValidationReport, row_error, write_quarantine

SUFFIXES = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
# ShareGPT's speaker names as they occur in published sets.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):[ ]?")


class RowError(ValueError):
    """A row that cannot be converted; the message is its quarantine reason ('category: detail')."""


@dataclass
class ImportReport:
    name: str
    kind: str
    shape: str
    source: str
    total: int
    written: int
    test: int
    bad: list[tuple[int, str, dict[str, Any]]]
    out_dir: Path
    quarantine_path: Path | None = None

    def reasons(self) -> Counter[str]:
        return Counter(reason.split(":")[0] for _, reason, _ in self.bad)

    def line(self) -> str:
        split = f" (train {self.written - self.test}, test {self.test})" if self.test else ""
        bad = ", ".join(f"{r} {n}" for r, n in self.reasons().most_common())
        quarantined = f"{len(self.bad)} quarantined" + (f" ({bad}) in {self.quarantine_path}" if bad else "")
        return (
            f"{self.name}: {self.kind} from {self.shape} ({self.source}): {self.total} rows read, "
            f"{self.written} written{split} to {self.out_dir}, {quarantined}"
        )


# --------------------------------------------------------------------------------------------------
# Reading


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, fmt in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    return None


def _files(path: Path, fmt: str) -> tuple[list[Path], str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if fmt == "auto":
        formats = {f: _format_of(f) for f in files}
        known = {v for v in formats.values() if v is not None}
        if len(known) != 1:
            raise DatasetError(
                f"{path}: cannot tell the format ({', '.join(sorted(known)) or 'no known file suffix'}); "
                f"known suffixes: {', '.join(SUFFIXES)}; or set the source's format"
            )
        fmt = known.pop()
        files = [f for f in files if formats[f] == fmt]
    if not files:
        raise DatasetError(f"{path}: no files to read")
    return files, fmt


def _open_text(path: Path) -> Any:
    return (
        gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8")
    )


def _json_rows(files: list[Path], fmt: str) -> Iterator[dict[str, Any] | RowError]:
    for f in files:
        if fmt == "json":
            try:
                with _open_text(f) as fh:
                    data = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DatasetError(
                    f"{f}: not valid JSON ({exc}); a JSON Lines file quarantines by row"
                ) from exc
            if not isinstance(data, list):
                raise DatasetError(f"{f}: a JSON dataset is a list of objects, got {type(data).__name__}")
            for item in data:
                yield item if isinstance(item, dict) else RowError(f"not an object: {type(item).__name__}")
            continue
        with _open_text(f) as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield RowError(f"bad json: {f.name} line {n}: {exc.msg} ({line.strip()[:60]!r})")
                    continue
                yield item if isinstance(item, dict) else RowError(f"not an object: {f.name} line {n}")


def _datasets_rows(
    files: list[Path] | None, fmt: str, name: str, split: str, sample_by: str, cache_dir: Path
) -> Iterator[dict[str, Any]]:
    import datasets

    datasets.utils.logging.set_verbosity_error()
    try:
        if files is None:
            ds = datasets.load_dataset(name, split=split, cache_dir=str(cache_dir))
        else:
            kwargs: dict[str, Any] = {"sample_by": sample_by} if fmt == "text" else {}
            ds = datasets.load_dataset(
                fmt, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir), **kwargs
            )
    except Exception as exc:  # datasets raises many kinds; the user needs the source named
        where = f"{name} (split {split})" if files is None else ", ".join(str(f) for f in files[:3])
        hint = (
            "; it is not a local path, so it was read as a hub dataset name and the hub is not reachable "
            "or has no such dataset"
            if files is None
            else ""
        )
        raise DatasetError(f"{where}: cannot read ({type(exc).__name__}: {exc}){hint}") from exc
    yield from ds


def read_source(
    path: str, fmt: str = "auto", *, split: str = "train", sample_by: str = "document", cache_dir: Path
) -> tuple[Iterator[dict[str, Any] | RowError], str]:
    """The rows of a local file or directory, or of a hub dataset; an unreadable row is a RowError in place."""
    p = Path(path).expanduser()
    if not p.exists():
        looks_local = p.is_absolute() or path.startswith(".") or _format_of(p) is not None
        if looks_local:
            raise DatasetError(f"{path}: no such file or directory")
        return _datasets_rows(None, fmt, path, split, sample_by, cache_dir), f"hub:{path}"
    files, fmt = _files(p, fmt)
    if fmt in ("jsonl", "json"):
        return _json_rows(files, fmt), fmt
    return _datasets_rows(files, fmt, path, split, sample_by, cache_dir), fmt


# --------------------------------------------------------------------------------------------------
# Converting one row


def _decoded(value: Any, what: str) -> Any:
    """A nested column as JSON text (CSV cells) decoded; anything else as is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"bad json: column '{what}' holds text that is not valid JSON") from None
    return value


def _content(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of parts when every part is text."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in value):
            kinds = sorted({str(p.get("type")) for p in value} - {"text"})
            raise RowError(f"non-text content: {where} has {', '.join(kinds)} parts; paddock trains on text")
        return "\n".join(p["text"] for p in value).strip()
    raise RowError(f"wrong type: {where} content is {type(value).__name__}, expected a string")


def messages_to_turns(
    value: Any, what: str, roles: dict[str, str] = MESSAGE_ROLES, keys: tuple[str, str] = ("role", "content")
) -> tuple[str | None, list[dict[str, str]]]:
    """(system, turns) from a message list; leading system messages join into the system prompt."""
    value = _decoded(value, what)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowError(f"wrong type: column '{what}' must be a list of messages, got {type(value).__name__}")
    role_key, content_key = keys
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for i, m in enumerate(value):
        raw = m.get(role_key)
        role = roles.get(str(raw).lower()) if isinstance(raw, str) else None
        if role is None:
            raise RowError(
                f"unsupported role: {what}[{i}] has {role_key} {raw!r}; paddock reads "
                f"{', '.join(sorted(set(roles)))}"
            )
        content = _content(m.get(content_key), f"{what}[{i}]")
        if role == "system":
            if turns:
                raise RowError(
                    f"system message mid-dialog: {what}[{i}]; paddock takes one system prompt before the first "
                    "user turn"
                )
            system.append(content)
            continue
        turns.append({"role": role, "content": content})
    return ("\n\n".join(system) or None), turns


def hh_to_turns(transcript: Any, what: str) -> list[dict[str, str]]:
    """Turns of an Anthropic HH-RLHF transcript: '\\n\\nHuman: ...\\n\\nAssistant: ...'."""
    if not isinstance(transcript, str):
        raise RowError(
            f"wrong type: column '{what}' must be a transcript string, got {type(transcript).__name__}"
        )
    parts = _HH_SPLIT.split(transcript)
    if len(parts) < 3:
        raise RowError(f"not a transcript: column '{what}' has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise RowError(f"not a transcript: column '{what}' has text before its first turn")
    speakers, texts = parts[1::2], parts[2::2]
    return [
        {"role": "user" if s == "Human" else "assistant", "content": t.strip()}
        for s, t in zip(speakers, texts, strict=True)
    ]


def _answer(turns: list[dict[str, str]], what: str) -> tuple[list[dict[str, str]], str]:
    if not turns or turns[-1]["role"] != "assistant":
        raise RowError(f"no answer: column '{what}' does not end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def rating_from_gap(gap: float, gaps: tuple[float, float, float]) -> str:
    """The Llama 2 rating of a pair whose chosen answer scored ``gap`` above the rejected one."""
    for rating, threshold in zip(RATINGS, gaps, strict=False):
        if gap >= threshold:
            return rating
    return RATINGS[-1]


def _number(row: dict[str, Any], column: str) -> float:
    value = row.get(column)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(f"wrong type: column '{column}' must be a number, got {type(value).__name__}")
    return float(value)


def _rating(row: dict[str, Any], src: Any) -> str:
    if row.get("rating") is not None:
        return str(row["rating"])  # validation names a value outside the four
    chosen_col, rejected_col = src.score_columns
    if chosen_col in row or rejected_col in row:
        gap = _number(row, chosen_col) - _number(row, rejected_col)
        if gap < 0:
            raise RowError(
                f"chosen scored below rejected: {chosen_col} - {rejected_col} = {gap:g}; swap them upstream"
            )
        return rating_from_gap(gap, src.rating_gaps)
    return str(src.rating)


def _preference(row: dict[str, Any], shape: str, src: Any) -> dict[str, Any]:
    for col in ("chosen", "rejected"):
        if row.get(col) is None:
            raise RowError(f"missing column: '{col}'")
    if shape == "hh_rlhf":
        prompt_c, chosen = _answer(hh_to_turns(row["chosen"], "chosen"), "chosen")
        prompt_r, rejected = _answer(hh_to_turns(row["rejected"], "rejected"), "rejected")
    elif isinstance(_decoded(row["chosen"], "chosen"), list):
        sys_c, turns_c = messages_to_turns(row["chosen"], "chosen")
        sys_r, turns_r = messages_to_turns(row["rejected"], "rejected")
        if sys_c or sys_r:
            raise RowError("system message: paddock's preference pairs have no system prompt")
        prompt_c, chosen = _answer(turns_c, "chosen")
        prompt_r, rejected = _answer(turns_r, "rejected")
        if not prompt_c and row.get("prompt") is not None:  # answers alone, the prompt beside them
            prompt_c = prompt_r = _prompt_turns(row["prompt"], "prompt")
    else:
        if row.get("prompt") is None:
            raise RowError("missing column: 'prompt' (chosen and rejected are answer strings)")
        prompt_c = prompt_r = _prompt_turns(row["prompt"], "prompt")
        chosen, rejected = (_content(row[c], c) for c in ("chosen", "rejected"))
    if prompt_c != prompt_r:
        raise RowError("prompts differ: chosen and rejected do not share the turns before their answers")
    if chosen == rejected:
        raise RowError("equal answers: chosen and rejected are the same text")
    kind = row.get(src.preference_kind_column) if src.preference_kind_column else src.preference_kind
    return {
        "prompt": prompt_c,
        "chosen": chosen,
        "rejected": rejected,
        "rating": _rating(row, src),
        "kind": kind,
        "safety_bin": row.get("safety_bin"),
    }


def _prompt_turns(value: Any, what: str) -> list[dict[str, str]]:
    value = _decoded(value, what)
    if isinstance(value, str):
        return [{"role": "user", "content": value.strip()}]
    system, turns = messages_to_turns(value, what)
    if system:
        raise RowError("system message: paddock's prompts have no system prompt")
    return turns


def detect_shape(kind: str, row: dict[str, Any]) -> str:
    """The public shape of a dataset from its first readable row's columns."""
    if kind == "pretrain":
        return "text"
    if kind == "dialogs":
        if "messages" in row:
            return "messages"
        if "conversations" in row:
            return "sharegpt"
    if kind == "preferences" and "chosen" in row:
        chosen = row["chosen"]
        if isinstance(chosen, str) and chosen.lstrip("\n").startswith("Human:"):
            return "hh_rlhf"
        return "preference_messages"
    if kind == "prompts":
        if "prompt" in row:
            return "prompt"
        if "messages" in row:
            return "messages"
    raise DatasetError(
        f"cannot tell the public shape of a {kind} dataset from its columns {sorted(row)}; set the source's "
        "shape (messages, sharegpt, preference_messages, hh_rlhf, prompt, text)"
    )


def convert_row(row: dict[str, Any], kind: str, shape: str, src: Any) -> dict[str, Any]:
    """One public-format row as a paddock row of ``kind`` (not yet validated); RowError when it cannot be."""
    if kind == "pretrain":
        if src.text_column not in row:
            raise RowError(f"missing column: '{src.text_column}'")
        if row[src.text_column] is None:  # an empty CSV cell reads as null
            raise RowError(f"empty text: column '{src.text_column}' is empty")
        return {"text": row[src.text_column]}
    if kind == "dialogs":
        if shape == "sharegpt":
            if "conversations" not in row:
                raise RowError("missing column: 'conversations'")
            system, turns = messages_to_turns(
                row["conversations"], "conversations", SHAREGPT_ROLES, ("from", "value")
            )
        else:
            if "messages" not in row:
                raise RowError("missing column: 'messages'")
            system, turns = messages_to_turns(row["messages"], "messages")
        return {"system": system, "turns": turns, "tags": list(src.tags)}
    if kind == "prompts":
        column = "prompt" if shape == "prompt" else "messages"
        if row.get(column) is None:
            raise RowError(f"missing column: '{column}'")
        # a named column, else an 'is_safety' column when the rows carry one, else the configured value
        flag = src.is_safety_column or ("is_safety" if "is_safety" in row else None)
        is_safety = row.get(flag) if flag else src.is_safety
        return {"turns": _prompt_turns(row[column], column), "is_safety": is_safety}
    if kind == "preferences":
        return _preference(row, shape, src)
    raise ValueError(f"unknown dataset kind {kind!r}")


# --------------------------------------------------------------------------------------------------
# A whole dataset


def _row_id(row: dict[str, Any], src: Any, index: int) -> str:
    value = row.get(src.id_column)
    if value is None or isinstance(value, bool) or not isinstance(value, str | int):
        return f"{src.name}-{index:06d}"
    return str(value)


def convert(
    rows: Iterable[dict[str, Any] | RowError], src: Any, *, max_chars: int, limit: int | None = None
) -> tuple[str, int, list[dict[str, Any]], list[tuple[int, str, dict[str, Any]]]]:
    """(shape, rows read, good rows of the kind's schema, bad rows as (row, reason, row as read))."""
    from tqdm.auto import tqdm

    shape = src.shape
    names = schema_for(src.kind).names
    good: list[dict[str, Any]] = []
    bad: list[tuple[int, str, dict[str, Any]]] = []
    seen: set[str] = set()
    total = 0
    for i, row in enumerate(
        tqdm(rows, desc=f"import {src.name}", unit=" rows", mininterval=2, leave=False, disable=None)
    ):
        if limit is not None and i >= limit:
            break
        total += 1
        if isinstance(row, RowError):
            bad.append((i, str(row), {}))
            continue
        if shape == "auto":
            shape = detect_shape(src.kind, row)
        try:
            out = convert_row(row, src.kind, shape, src)
        except RowError as exc:
            bad.append((i, str(exc), row))
            continue
        if src.kind != "pretrain":
            out["id"] = _row_id(row, src, i)
            if out["id"] in seen:
                bad.append((i, f"duplicate id: {out['id']!r} appears earlier in the dataset", row))
                continue
        reason = row_error(src.kind, out, max_chars)
        if reason is not None:
            bad.append((i, reason, row))
            continue
        if src.kind != "pretrain":
            seen.add(out["id"])
        good.append({n: out[n] for n in names})
    return shape, total, good, bad


def import_source(src: Any, out_root: Path, *, max_chars: int, seed: int, cache_dir: Path) -> ImportReport:
    """Read, convert, validate and write one source: ``<out_root>/<name>/train.parquet`` (+ test.parquet)."""
    rows, fmt = read_source(
        src.path, src.format, split=src.split, sample_by=src.sample_by, cache_dir=cache_dir
    )
    shape, total, good, bad = convert(rows, src, max_chars=max_chars, limit=src.limit)
    out = out_root / src.name
    out.mkdir(parents=True, exist_ok=True)
    report = ImportReport(src.name, src.kind, shape, f"{src.path}, {fmt}", total, 0, 0, bad, out)
    quarantine = out / "quarantine.parquet"
    if bad:
        write_quarantine(ValidationReport(src.kind, src.path, total, pa.table({}), bad), quarantine)
        report.quarantine_path = quarantine
    else:
        quarantine.unlink(missing_ok=True)
    if total == 0:
        raise DatasetError(f"{src.name}: {src.path} has no rows")
    if len(bad) / total > src.max_bad_fraction:
        top = ", ".join(f"{r} ({n})" for r, n in report.reasons().most_common(3))
        raise DatasetError(
            f"{src.name}: {len(bad)} of {total} rows ({len(bad) / total:.1%}) could not be imported, above "
            f"max_bad_fraction {src.max_bad_fraction:.1%}; reasons: {top}; the rows are in {quarantine}"
        )
    order = list(range(len(good)))
    random.Random(seed).shuffle(order)
    n_test = round(len(good) * src.test_fraction)
    test_idx = set(order[:n_test])
    schema = schema_for(src.kind)
    train = [r for i, r in enumerate(good) if i not in test_idx]
    test = [r for i, r in enumerate(good) if i in test_idx]
    atomic.write_parquet(pa.Table.from_pylist(train, schema=schema), out / "train.parquet")
    if test:
        atomic.write_parquet(pa.Table.from_pylist(test, schema=schema), out / "test.parquet")
    else:
        (out / "test.parquet").unlink(missing_ok=True)
    report.written, report.test = len(good), len(test)
    return report


def run(job):  # type: ignore[no-untyped-def]
    """Stage entry point: convert every source and print rows written and quarantined for each."""
    from paddock.config import paddock_home, resolve_path

    out_root = resolve_path(job.out_dir)
    reports = []
    for src in job.sources:
        report = import_source(
            src,
            out_root,
            max_chars=job.max_chars,
            seed=job.seed,
            cache_dir=paddock_home() / "cache" / "datasets",
        )
        print(report.line(), flush=True)
        reports.append(report)
    return reports
