"""Public dataset formats into paddock's schemas, row by row, on hand-written fixtures in the public shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from paddock.config import ConfigError, ImportJob, ImportSource, load_config
from paddock.data import importers
from paddock.data.validate import DatasetError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "public"
ROOT = Path(__file__).resolve().parents[2]


def _import(tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("max_bad_fraction", 1.0)
    src = ImportSource(**kw)
    report = importers.import_source(
        src, tmp_path / "out", max_chars=20_000, seed=0, cache_dir=tmp_path / "cache"
    )
    out = tmp_path / "out" / src.name
    rows = pq.read_table(out / "train.parquet").to_pylist()
    bad = {}
    if report.quarantine_path is not None:
        bad = {r["row"]: r["reason"] for r in pq.read_table(report.quarantine_path).to_pylist()}
    return report, rows, bad


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_openai_messages_to_dialogs(tmp_path: Path) -> None:
    report, rows, bad = _import(
        tmp_path, name="oa", path=str(FIXTURES / "openai_messages.jsonl"), kind="dialogs"
    )
    assert report.shape == "messages" and report.total == 9 and report.written == 3
    assert rows == [
        {
            "id": "oa-000000",
            "system": "You are a concise assistant.",
            "turns": [_user("What is the capital of France?"), _assistant("Paris.")],
            "tags": [],
        },
        {
            "id": "chat-7",
            "system": None,
            "turns": [_user("Add 2 and 3."), _assistant("5"), _user("Now double it."), _assistant("10")],
            "tags": [],
        },
        {  # OpenAI's content parts, all text, joined
            "id": "oa-000002",
            "system": None,
            "turns": [_user("Name a primary colour."), _assistant("Red.")],
            "tags": [],
        },
    ]
    assert sorted(bad) == [3, 4, 5, 6, 7, 8]
    assert bad[3].startswith("unsupported role: messages[2] has role 'tool'")
    assert bad[4] == "invalid role order: 'turns' must end with an assistant turn"
    assert bad[5].startswith("bad json: openai_messages.jsonl line 6:")
    assert bad[6].startswith("system message mid-dialog: messages[1]")
    assert bad[7] == "non-text content: messages[0] has image_url parts; paddock trains on text"
    assert bad[8].startswith("empty text:") and "empty assistant message" in bad[8]
    # the quarantine keeps each row as it was read, so nothing is lost
    kept = {r["row"]: json.loads(r["data"]) for r in pq.read_table(report.quarantine_path).to_pylist()}
    assert kept[3]["messages"][2] == {"role": "tool", "content": '{"temp": 3}'}
    assert kept[5] == {}  # an unparsable line: its text is in the reason


def test_sharegpt_to_dialogs(tmp_path: Path) -> None:
    report, rows, bad = _import(
        tmp_path, name="sg", path=str(FIXTURES / "sharegpt.json"), kind="dialogs", tags=["sharegpt"]
    )
    assert report.shape == "sharegpt" and (report.total, report.written) == (6, 2)
    assert rows[0] == {
        "id": "sg-1",
        "system": "You answer in French.",
        "turns": [_user("Hello"), _assistant("Bonjour")],
        "tags": ["sharegpt"],
    }
    assert rows[1]["id"] == "sg-2" and rows[1]["turns"][2:] == [_user("Backwards?"), _assistant("3, 2, 1")]
    assert bad[2].startswith("unsupported role: conversations[1] has from 'function_call'")
    assert bad[3] == "duplicate id: 'sg-2' appears earlier in the dataset"
    assert bad[4].startswith("invalid role order: turns turn 0: expected role 'user', got 'assistant'")
    assert bad[5] == "wrong type: column 'conversations' must be a list of messages, got str"


def test_ultrafeedback_ratings_from_score_gaps(tmp_path: Path) -> None:
    report, rows, bad = _import(
        tmp_path,
        name="uf",
        path=str(FIXTURES / "ultrafeedback_binarized.jsonl"),
        kind="preferences",
        id_column="prompt_id",
    )
    assert report.shape == "preference_messages" and (report.total, report.written) == (8, 4)
    # gaps 3.0, 2.5, 1.0, 0.5 against the default thresholds (3, 2, 1)
    assert [(r["id"], r["rating"]) for r in rows] == [
        ("a1", "significantly_better"),
        ("a2", "better"),
        ("a3", "slightly_better"),
        ("a4", "negligibly_better"),
    ]
    assert rows[0] == {
        "id": "a1",
        "prompt": [_user("How many legs does a spider have?")],
        "chosen": "A spider has eight legs.",
        "rejected": "Six.",
        "rating": "significantly_better",
        "kind": "helpfulness",
        "safety_bin": None,
    }
    assert bad == {
        4: "prompts differ: chosen and rejected do not share the turns before their answers",
        5: "equal answers: chosen and rejected are the same text",
        6: "chosen scored below rejected: score_chosen - score_rejected = -5; swap them upstream",
        7: "wrong type: column 'score_chosen' must be a number, got str",
    }
    # other thresholds move the same pairs to other ratings
    _, rows, _ = _import(
        tmp_path / "b",
        name="uf",
        path=str(FIXTURES / "ultrafeedback_binarized.jsonl"),
        kind="preferences",
        rating_gaps=(2.5, 0.75, 0.25),
    )
    assert [r["rating"] for r in rows] == [
        "significantly_better",
        "significantly_better",
        "better",
        "slightly_better",
    ]


def test_ultrafeedback_from_parquet_matches_jsonl(tmp_path: Path) -> None:
    """Parquet goes through Hugging Face datasets, JSONL through paddock's row reader: same pairs."""
    lines = [json.loads(s) for s in (FIXTURES / "ultrafeedback_binarized.jsonl").read_text().splitlines()]
    numeric = [r for r in lines if isinstance(r["score_chosen"], float)]
    pq.write_table(pa.Table.from_pylist(numeric), tmp_path / "uf.parquet")
    report, rows, bad = _import(
        tmp_path, name="ufp", path=str(tmp_path / "uf.parquet"), kind="preferences", id_column="prompt_id"
    )
    assert report.source.endswith("parquet") and (report.total, report.written) == (7, 4)
    _, from_jsonl, _ = _import(
        tmp_path / "j",
        name="ufp",
        path=str(FIXTURES / "ultrafeedback_binarized.jsonl"),
        kind="preferences",
        id_column="prompt_id",
    )
    assert rows == from_jsonl
    assert sorted(bad.values())[0].startswith("chosen scored below rejected")


def test_hh_rlhf_transcripts(tmp_path: Path) -> None:
    report, rows, bad = _import(
        tmp_path,
        name="hh",
        path=str(FIXTURES / "hh_rlhf.jsonl"),
        kind="preferences",
        preference_kind="safety",
    )
    assert report.shape == "hh_rlhf" and (report.total, report.written) == (5, 2)
    assert rows[0]["prompt"] == [_user("How do I pick a lock?")]
    assert rows[0]["chosen"].startswith("I can't help") and rows[0]["rejected"].startswith("Insert")
    assert (rows[0]["rating"], rows[0]["kind"]) == ("negligibly_better", "safety")  # no scores: no margin
    assert rows[1]["prompt"] == [
        _user("What's a good name for a cat?"),
        _assistant("Maybe Miso?"),
        _user("Something longer."),
    ]
    assert (rows[1]["chosen"], rows[1]["rejected"]) == ("How about Bartholomew?", "Cat.")
    assert bad == {
        2: "prompts differ: chosen and rejected do not share the turns before their answers",
        3: "empty text: column 'chosen' is empty",
        4: "not a transcript: column 'chosen' has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns",
    }


def test_prompt_sets(tmp_path: Path) -> None:
    report, rows, bad = _import(
        tmp_path,
        name="pr",
        path=str(FIXTURES / "prompts.jsonl"),
        kind="prompts",
        is_safety_column="is_safety",
    )
    assert report.shape == "prompt"
    assert rows == [
        {"id": "p-1", "turns": [_user("What is the boiling point of water?")], "is_safety": False},
        {"id": "p-2", "turns": [_user("How do I make a weapon at home?")], "is_safety": True},
    ]
    assert bad[2].startswith("empty text:")
    assert bad[3].startswith("chat tag in user text:")
    assert bad[4] == "wrong type: column 'is_safety' expected bool, got str"

    report, rows, bad = _import(
        tmp_path / "m",
        name="pm",
        path=str(FIXTURES / "prompts_messages.jsonl"),
        kind="prompts",
        is_safety=True,
    )
    assert report.shape == "messages" and [r["turns"][-1]["content"] for r in rows] == [
        "Recommend a book.",
        "Recommend a film.",
    ]
    assert all(r["is_safety"] for r in rows)
    assert bad == {
        2: "invalid role order: 'turns' must end with a user turn",
        3: "system message: paddock's prompts have no system prompt",
    }


def test_pretraining_text_files_and_csv(tmp_path: Path) -> None:
    report, rows, _ = _import(tmp_path, name="tx", path=str(FIXTURES / "pretrain_text"), kind="pretrain")
    assert report.source.endswith("text") and report.written == 2  # one document per file
    assert sorted(r["text"] for r in rows) == [
        "Bees make honey from nectar.\n",
        "The river runs past the old mill.\nIts wheel has not turned in years.\n\nChildren still play on its banks.\n",
    ]
    _, rows, _ = _import(
        tmp_path / "p",
        name="tx",
        path=str(FIXTURES / "pretrain_text"),
        kind="pretrain",
        sample_by="paragraph",
    )
    assert len(rows) == 3
    report, rows, bad = _import(
        tmp_path / "c", name="csv", path=str(FIXTURES / "pretrain.csv"), kind="pretrain"
    )
    assert [r["text"] for r in rows] == [
        "Copper conducts electricity well.",
        "Glass is made from sand, soda and lime.",
    ]
    assert bad == {1: "empty text: column 'text' is empty"}


def test_refused_above_the_bad_share_and_split_is_seeded(tmp_path: Path) -> None:
    src = ImportSource(name="oa", path=str(FIXTURES / "openai_messages.jsonl"), kind="dialogs")
    with pytest.raises(DatasetError, match=r"6 of 9 rows .* above max_bad_fraction 5.0%.*quarantine.parquet"):
        importers.import_source(src, tmp_path, max_chars=20_000, seed=0, cache_dir=tmp_path / "c")
    assert not (tmp_path / "oa" / "train.parquet").exists()  # refused: only the quarantine is written
    assert pq.read_table(tmp_path / "oa" / "quarantine.parquet").num_rows == 6

    def split(seed: int) -> tuple[list[str], list[str]]:
        s = ImportSource(
            name="pr",
            path=str(FIXTURES / "ultrafeedback_binarized.jsonl"),
            kind="preferences",
            max_bad_fraction=1.0,
            test_fraction=0.5,
            id_column="prompt_id",
        )
        r = importers.import_source(
            s, tmp_path / f"s{seed}", max_chars=20_000, seed=seed, cache_dir=tmp_path / "c"
        )
        assert (r.written, r.test) == (4, 2)
        out = tmp_path / f"s{seed}" / "pr"
        return (
            pq.read_table(out / "train.parquet")["id"].to_pylist(),
            pq.read_table(out / "test.parquet")["id"].to_pylist(),
        )

    train, test = split(0)
    assert sorted(train + test) == ["a1", "a2", "a3", "a4"] and split(0) == (train, test)


def test_unreadable_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or directory"):
        importers.read_source(str(tmp_path / "missing.jsonl"), cache_dir=tmp_path)
    (tmp_path / "odd.xyz").write_text("x")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        importers.read_source(str(tmp_path / "odd.xyz"), cache_dir=tmp_path)
    (tmp_path / "list.json").write_text('{"rows": []}')
    with pytest.raises(DatasetError, match="a JSON dataset is a list of objects"):
        list(importers.read_source(str(tmp_path / "list.json"), cache_dir=tmp_path)[0])
    # not a local path: read as a hub name, which offline cannot reach
    with pytest.raises(DatasetError, match="hub dataset name"):
        list(importers.read_source("nobody-paddock/no-such-set", cache_dir=tmp_path / "c")[0])
    with pytest.raises(DatasetError, match="cannot tell the public shape"):
        importers.detect_shape("dialogs", {"question": "q", "answer": "a"})


def test_config_refuses_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rating_gaps"):
        load_config(
            ImportJob,
            None,
            ['sources=[{"name": "a", "path": "x", "kind": "preferences", "rating_gaps": [1, 2, 3]}]'],
        )
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(
            ImportJob,
            None,
            [
                'sources=[{"name": "a", "path": "x", "kind": "dialogs"}, {"name": "a", "path": "y", "kind": "prompts"}]'
            ],
        )


def test_import_job_prints_rows_written_and_quarantined(tmp_path: Path) -> None:
    config = {
        "out_dir": str(tmp_path / "imported"),
        "sources": [
            {
                "name": "oa",
                "path": str(FIXTURES / "openai_messages.jsonl"),
                "kind": "dialogs",
                "max_bad_fraction": 1,
            },
            {"name": "sg", "path": str(FIXTURES / "sharegpt.json"), "kind": "dialogs", "max_bad_fraction": 1},
            {
                "name": "uf",
                "path": str(FIXTURES / "ultrafeedback_binarized.jsonl"),
                "kind": "preferences",
                "max_bad_fraction": 1,
            },
            {
                "name": "hh",
                "path": str(FIXTURES / "hh_rlhf.jsonl"),
                "kind": "preferences",
                "max_bad_fraction": 1,
            },
            {
                "name": "pr",
                "path": str(FIXTURES / "prompts.jsonl"),
                "kind": "prompts",
                "is_safety_column": "is_safety",
                "max_bad_fraction": 1,
            },
            {"name": "tx", "path": str(FIXTURES / "pretrain_text"), "kind": "pretrain"},
        ],
    }
    cfg = tmp_path / "import.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PADDOCK_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "import_data.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":")[0]: line for line in proc.stdout.splitlines() if ": " in line}
    assert "9 rows read, 3 written" in lines["oa"] and "6 quarantined" in lines["oa"]
    assert "6 rows read, 2 written" in lines["sg"] and "4 quarantined" in lines["sg"]
    assert "8 rows read, 4 written" in lines["uf"] and "4 quarantined" in lines["uf"]
    assert "5 rows read, 2 written" in lines["hh"] and "3 quarantined" in lines["hh"]
    assert "5 rows read, 2 written" in lines["pr"] and "3 quarantined" in lines["pr"]
    assert "2 rows read, 2 written" in lines["tx"] and "0 quarantined" in lines["tx"]
    # a source past its bad share: exit 2, the reason named, no traceback
    config["sources"] = [{"name": "oa", "path": str(FIXTURES / "openai_messages.jsonl"), "kind": "dialogs"}]
    cfg.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "import_data.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2 and "above max_bad_fraction" in proc.stderr and "Traceback" not in proc.stderr


def test_the_pipeline_runs_an_import_stage_after_the_world(tmp_path: Path) -> None:
    from paddock import pipeline
    from paddock.config import PipelineJob

    config = {
        "out_dir": str(tmp_path / "imported"),
        "sources": [{"name": "hh", "path": str(FIXTURES / "hh_rlhf.jsonl"), "kind": "preferences"}],
    }
    (tmp_path / "import.yaml").write_text(yaml.safe_dump(config))
    job = load_config(
        PipelineJob,
        ROOT / "jobs/configs/tiny/pipeline.yaml",
        [f"stages.import_data={{config: {tmp_path / 'import.yaml'}}}", "rounds=1"],
    )
    keys = [s.key for s in pipeline.schedule(job)]
    assert keys[:3] == ["world", "import_data", "tokenizer"]
