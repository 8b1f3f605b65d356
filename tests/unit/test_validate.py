import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paddock.data.validate import DatasetError, load_dataset

# Bad input is a fault the platform must survive: counted, quarantined with a reason, named in the error.
pytestmark = pytest.mark.reliability

GOOD = {
    "id": "d1",
    "system": None,
    "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    "tags": ["x"],
}


def write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def quarantined(report) -> dict[int, str]:
    table = pq.read_table(report.quarantine_path).to_pylist()
    return {r["row"]: r["reason"] for r in table}


def test_malformed_dialog_rows_are_quarantined_with_reasons(tmp_path: Path):
    rows = [
        GOOD,
        {
            **GOOD,
            "id": "empty",
            "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}],
        },
        {
            **GOOD,
            "id": "order",
            "turns": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}],
        },
        {
            **GOOD,
            "id": "long",
            "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * 500}],
        },
        {
            **GOOD,
            "id": "tag",
            "turns": [{"role": "user", "content": "[INST] hi"}, {"role": "assistant", "content": "ok"}],
        },
        {**GOOD, "id": "open", "turns": [{"role": "user", "content": "Hi"}]},
        {**GOOD, "id": "ok2"},
    ]
    path = write(tmp_path / "sft.parquet", rows)
    report = load_dataset(path, "dialogs", max_bad_fraction=0.9, max_chars=100, quarantine_dir=tmp_path / "q")
    assert (report.total, report.good.num_rows, report.n_bad) == (7, 2, 5)
    reasons = quarantined(report)
    assert reasons[1].startswith("empty text:")
    assert reasons[2].startswith("invalid role order:")
    assert reasons[3].startswith("too long:") and "500 characters, limit 100" in reasons[3]
    assert reasons[4].startswith("chat tag in user text:")
    assert reasons[5].startswith("invalid role order:") and "must end with an assistant turn" in reasons[5]
    # Nothing lost: the quarantined rows keep their data.
    data = {r["row"]: json.loads(r["data"]) for r in pq.read_table(report.quarantine_path).to_pylist()}
    assert data[3]["id"] == "long" and set(report.good["id"].to_pylist()) == {"d1", "ok2"}


def test_missing_column_quarantines_every_row(tmp_path: Path):
    path = write(tmp_path / "p.parquet", [{"id": "a", "turns": [{"role": "user", "content": "q"}]}] * 3)
    report = load_dataset(path, "prompts", max_bad_fraction=1.0, max_chars=100, quarantine_dir=tmp_path)
    assert report.n_bad == 3 and all(r == "missing column: 'is_safety'" for r in quarantined(report).values())


def test_wrong_type_and_invalid_utf8(tmp_path: Path):
    # Parquet columns are typed, so a wrong type shows up as a whole column of another type.
    write(tmp_path / "ints.parquet", [{"text": 1}, {"text": 2}])
    report = load_dataset(
        tmp_path / "ints.parquet", "pretrain", max_bad_fraction=1.0, max_chars=100, quarantine_dir=tmp_path
    )
    assert set(quarantined(report).values()) == {"wrong type: column 'text' expected string, got int"}
    # A string column holding invalid UTF-8 (written as binary, read back as string) is caught per row.
    raw = pa.table({"text": pa.array([b"good text", b"bad \xff\xfe bytes"], pa.binary())})
    pq.write_table(
        raw.cast(pa.schema([pa.field("text", pa.string())]), safe=False), tmp_path / "utf8.parquet"
    )
    report = load_dataset(
        tmp_path / "utf8.parquet", "pretrain", max_bad_fraction=1.0, max_chars=100, quarantine_dir=tmp_path
    )
    assert report.good["text"].to_pylist() == ["good text"]
    assert list(quarantined(report).values()) == ["wrong type: column 'text' expected string, got bytes"]


def test_preference_values_are_checked(tmp_path: Path):
    base = {
        "id": "p",
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": "a",
        "rejected": "b",
        "rating": "better",
        "kind": "helpfulness",
        "safety_bin": None,
    }
    rows = [
        base,
        {**base, "rating": "much_better"},
        {**base, "kind": "fun"},
        {**base, "safety_bin": "maybe"},
        {**base, "chosen": ""},
    ]
    report = load_dataset(
        write(tmp_path / "pref.parquet", rows),
        "preferences",
        max_bad_fraction=1.0,
        max_chars=100,
        quarantine_dir=tmp_path,
    )
    reasons = quarantined(report)
    assert "rating 'much_better'" in reasons[1] and "kind 'fun'" in reasons[2]
    assert "safety_bin 'maybe'" in reasons[3] and reasons[4].startswith("empty text")


def test_over_the_limit_refuses_and_names_the_quarantine_file(tmp_path: Path):
    rows = [GOOD] * 8 + [{**GOOD, "turns": []}] * 2
    path = write(tmp_path / "sft.parquet", rows)
    with pytest.raises(DatasetError) as err:
        load_dataset(path, "dialogs", max_bad_fraction=0.1, max_chars=100, quarantine_dir=tmp_path / "q")
    msg = str(err.value)
    assert "2 of 10 rows (20.0%) failed validation, above the limit of 10.0%" in msg
    assert str(tmp_path / "q" / f"{tmp_path.name}-sft.quarantine.parquet") in msg
    assert pq.read_table(tmp_path / "q" / f"{tmp_path.name}-sft.quarantine.parquet").num_rows == 2


def test_truncated_or_missing_parquet_is_a_clear_error(tmp_path: Path):
    path = write(tmp_path / "t.parquet", [{"text": "x" * 100}] * 100)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="cannot read Parquet"):
        load_dataset(path, "pretrain", max_bad_fraction=0, max_chars=1000, quarantine_dir=tmp_path)
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_dataset(
            tmp_path / "nope.parquet", "pretrain", max_bad_fraction=0, max_chars=1000, quarantine_dir=tmp_path
        )
