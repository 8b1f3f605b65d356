"""The bring-your-own example's data (jobs/configs/byo/data/): what paddock.world.public writes, and that importing it
gives back the tiny world's rows, ratings included, with the broken rows quarantined for the right reasons."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from paddock.config import ImportSource
from paddock.data import importers
from paddock.world import public

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "jobs" / "configs" / "byo" / "data"


@pytest.fixture(scope="module")
def world() -> dict:
    return public.world_rows(seed=0)


def _import(path: Path, kind: str, **settings: object) -> tuple[list[dict], list[tuple[int, str, dict]]]:
    src = ImportSource(name=path.stem, path=str(path), kind=kind, **settings)
    rows, _ = importers.read_source(str(path), "auto", split="train", sample_by="document", cache_dir=path)
    _, _, good, bad = importers.convert(rows, src, max_chars=20_000)
    return good, bad


def test_the_shipped_sample_is_what_the_generator_writes(tmp_path: Path) -> None:
    counts = public.write_public_sample(tmp_path)
    assert counts == {
        "chats.jsonl": 332,  # 330 dialogs and 2 broken rows
        "ultrafeedback.jsonl": 330,
        "hh_harmless.jsonl": 220,
        "prompts.jsonl": 200,
        "eval_prompts.jsonl": 100,
        "pretrain.txt": 400,
    }
    names = sorted(p.name for p in SAMPLE.iterdir())
    assert names == sorted(counts)
    matched, mismatch, errors = filecmp.cmpfiles(SAMPLE, tmp_path, names, shallow=False)
    assert matched == names and not errors, (
        f"regenerate with python -m paddock.world.public {SAMPLE}: {mismatch}"
    )


def test_chats_import_as_the_world_dialogs_and_the_broken_rows_are_quarantined(world: dict) -> None:
    good, bad = _import(SAMPLE / "chats.jsonl", "dialogs")
    assert [(r["system"], r["turns"]) for r in good] == [(d["system"], d["turns"]) for d in world["dialogs"]]
    assert [(row, reason.split(":")[0]) for row, reason, _ in bad] == [
        (17, "bad json"),
        (101, "unsupported role"),
    ]


def test_preference_pairs_import_with_the_world_ratings(world: dict) -> None:
    helpful, bad_h = _import(SAMPLE / "ultrafeedback.jsonl", "preferences", id_column="prompt_id")
    safety, bad_s = _import(SAMPLE / "hh_harmless.jsonl", "preferences", preference_kind="safety")
    assert not bad_h and not bad_s
    want_h = [p for p in world["pairs"] if p["kind"] == "helpfulness"]
    want_s = [p for p in world["pairs"] if p["kind"] == "safety"]
    fields = ("prompt", "chosen", "rejected", "kind")
    # the score gaps give back each pair's rating under the importer's default rating_gaps
    assert [(*(r[f] for f in fields), r["rating"]) for r in helpful] == [
        (*(p[f] for f in fields), p["rating"]) for p in want_h
    ]
    # HH transcripts carry no scores: the pairs come back, their ratings are the configured default
    assert [tuple(r[f] for f in fields) for r in safety] == [tuple(p[f] for f in fields) for p in want_s]
    assert {r["rating"] for r in safety} == {"negligibly_better"}


def test_prompts_import_with_their_safety_flags(world: dict) -> None:
    for name, want in (("prompts", world["prompts"]), ("eval_prompts", world["held_out"])):
        good, bad = _import(SAMPLE / f"{name}.jsonl", "prompts")  # the is_safety column is read unasked
        assert not bad
        assert [(r["turns"], r["is_safety"]) for r in good] == [(p["turns"], p["is_safety"]) for p in want]
        assert any(r["is_safety"] for r in good) and not all(r["is_safety"] for r in good)
