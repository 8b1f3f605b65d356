"""A sample of the tiny world in the shapes people publish datasets in: the data of the copyable bring-your-own
example (``jobs/configs/byo/``), read back by ``jobs/import_data.py`` like any user's files.

- ``chats.jsonl``: SFT dialogs as OpenAI ``messages`` (a system prompt as the first message);
- ``ultrafeedback.jsonl``: helpfulness pairs in the UltraFeedback-binarized shape, with ``score_chosen`` /
  ``score_rejected`` whose gap gives back the world's rating under the importer's default ``rating_gaps`` (3/2/1);
- ``hh_harmless.jsonl``: safety pairs as Anthropic HH-RLHF transcripts (no scores, as published);
- ``prompts.jsonl`` and ``eval_prompts.jsonl``: prompt strings (``messages`` for multi-turn ones) with ``is_safety``;
- ``pretrain.txt``: plain text, one document per paragraph.

A few rows are broken on purpose, as real datasets are (a truncated line, a tool message), so that the example
shows the quarantine. ``python -m paddock.world.public OUT_DIR`` writes the sample; the same seed writes the same
files.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from paddock.config import WorldConfig
from paddock.world.generate import write_world

# A score gap in the middle of each rating's band of the importer's default rating_gaps (3, 2, 1)
GAPS = {"significantly_better": 4.0, "better": 2.5, "slightly_better": 1.5, "negligibly_better": 0.5}

SIZES = {
    "sft_dialogs": 330,
    "helpfulness_pairs": 330,
    "safety_pairs": 220,
    "rl_prompts": 200,
    "eval_prompts": 100,
}
PRETRAIN_DOCS = 400


def _messages(system: str | None, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": t["role"], "content": t["content"]} for t in turns]


def _hh(turns: list[dict[str, str]], answer: str) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[t['role']]}: {t['content']}" for t in turns) + f"\n\nAssistant: {answer}"


def _prompt_row(row: dict[str, Any], id_: str) -> dict[str, Any]:
    turns = row["turns"]
    if len(turns) == 1:
        return {"id": id_, "prompt": turns[0]["content"], "is_safety": row["is_safety"]}
    return {"id": id_, "messages": _messages(None, turns), "is_safety": row["is_safety"]}


def _write_jsonl(path: Path, rows: list[Any]) -> int:
    with path.open("w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
            f.write("\n")
    return len(rows)


def world_rows(seed: int = 0) -> dict[str, list[Any]]:
    """The tiny world's rows the sample is written from (paddock's schemas): dialogs, pairs, prompts, held_out
    prompts and pretraining texts."""
    with tempfile.TemporaryDirectory() as tmp:
        write_world(WorldConfig(out_dir=tmp, seed=seed, pretrain_mb=0.3, gatt_dialogs=10, **SIZES))
        w = Path(tmp)

        def read(folder: str, splits: tuple[str, ...] = ("train", "test")) -> list[Any]:
            return [r for split in splits for r in pq.read_table(w / folder / f"{split}.parquet").to_pylist()]

        return {
            "dialogs": read("sft"),
            "pairs": read("preferences"),
            "prompts": read("prompts", ("train",)),
            "held_out": read("prompts", ("test",)),
            "texts": [r["text"] for r in read("pretrain", ("train",))[:PRETRAIN_DOCS]],
        }


def write_public_sample(out: Path, seed: int = 0) -> dict[str, int]:
    """Write the sample files under ``out``; returns rows written per file (broken rows included)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = world_rows(seed)
    dialogs, pairs, prompts, held_out, texts = (
        rows[k] for k in ("dialogs", "pairs", "prompts", "held_out", "texts")
    )
    chats: list[Any] = [{"messages": _messages(d["system"], d["turns"])} for d in dialogs]
    # Broken rows as found in the wild: a line cut short, and a tool call paddock's dialogs cannot hold
    chats.insert(17, '{"messages": [{"role": "user", "content": "What is the capital of Fra')
    chats.insert(
        101,
        {
            "messages": [
                {"role": "user", "content": "What is the weather in Lima?"},
                {"role": "tool", "content": '{"temp_c": 19}'},
                {"role": "assistant", "content": "It is 19 degrees in Lima."},
            ]
        },
    )
    helpful = []
    for i, p in enumerate(x for x in pairs if x["kind"] == "helpfulness"):
        chosen_score = float(rng.choice((7, 8, 9, 10)))
        helpful.append(
            {
                "prompt_id": f"h{i:04d}",
                "chosen": _messages(None, [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]),
                "rejected": _messages(None, [*p["prompt"], {"role": "assistant", "content": p["rejected"]}]),
                "score_chosen": chosen_score,
                "score_rejected": chosen_score - GAPS[p["rating"]],
            }
        )
    harmless = [
        {"chosen": _hh(p["prompt"], p["chosen"]), "rejected": _hh(p["prompt"], p["rejected"])}
        for p in pairs
        if p["kind"] == "safety"
    ]
    counts = {
        "chats.jsonl": _write_jsonl(out / "chats.jsonl", chats),
        "ultrafeedback.jsonl": _write_jsonl(out / "ultrafeedback.jsonl", helpful),
        "hh_harmless.jsonl": _write_jsonl(out / "hh_harmless.jsonl", harmless),
        "prompts.jsonl": _write_jsonl(
            out / "prompts.jsonl", [_prompt_row(p, f"rl-{i:04d}") for i, p in enumerate(prompts)]
        ),
        "eval_prompts.jsonl": _write_jsonl(
            out / "eval_prompts.jsonl", [_prompt_row(p, f"eval-{i:04d}") for i, p in enumerate(held_out)]
        ),
    }
    (out / "pretrain.txt").write_text("\n\n".join(t.strip() for t in texts) + "\n")
    counts["pretrain.txt"] = len(texts)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m paddock.world.public OUT_DIR")
    for name, n in write_public_sample(Path(sys.argv[1])).items():
        print(f"{name}: {n} rows")
