"""The four dataset kinds paddock reads, as fixed pyarrow schemas (ARCHITECTURE.md, "Datasets")."""

from __future__ import annotations

import pyarrow as pa

TURN = pa.struct(
    [pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)]
)
TURNS = pa.list_(TURN)

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
PREFERENCE_KINDS = ("helpfulness", "safety")
# Llama 2's safety bins: chosen safe + rejected unsafe, both safe, both unsafe. Chosen-unsafe pairs are dropped.
SAFETY_BINS = ("safe_vs_unsafe", "both_safe", "both_unsafe")

PRETRAIN = pa.schema([pa.field("text", pa.string(), nullable=False)])

DIALOGS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("system", pa.string(), nullable=True),
        pa.field("turns", TURNS, nullable=False),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
    ]
)

PREFERENCES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", TURNS, nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("rating", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("safety_bin", pa.string(), nullable=True),
    ]
)

PROMPTS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("turns", TURNS, nullable=False),
        pa.field("is_safety", pa.bool_(), nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "pretrain": PRETRAIN,
    "dialogs": DIALOGS,
    "preferences": PREFERENCES,
    "prompts": PROMPTS,
}


def schema_for(kind: str) -> pa.Schema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(SCHEMAS)}") from None
