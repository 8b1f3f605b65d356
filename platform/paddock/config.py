"""Typed configs for every paddock stage, loaded from YAML with ``--set dotted.key=value`` overrides.

Each job has a root model (``WorldJob``, ``TokenizerJob``, ...). Unknown keys are refused everywhere
(``extra="forbid"``), and a bad file raises one ``ConfigError`` that lists every bad field by its dotted
path, the value given and what would be valid, before any worker starts.

Relative paths in configs resolve against ``PADDOCK_HOME`` (default ``./.paddock``), so the same config
works on a laptop and on a cluster whose home points at shared storage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "JOBS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "StageConfig",
    "TokenizerConfig",
    "TokenizerJob",
    "WorldConfig",
    "WorldJob",
    "load_config",
    "paddock_home",
    "resolve_path",
]

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every bad field."""


def paddock_home() -> Path:
    """Root for everything paddock writes: ``$PADDOCK_HOME``, else ``./.paddock``."""
    return Path(os.environ.get("PADDOCK_HOME", ".paddock")).expanduser().resolve()


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """An absolute path as given; a relative one under ``paddock_home()``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else paddock_home() / p


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------------
# Sections shared by several stages


class StageConfig(Strict):
    """Fields every job config carries at its top level."""

    experiment: str = Field("paddock", description="MLflow experiment that the stage's runs go to.")
    registry_prefix: str = Field(
        "paddock", description="Registered models are named '{registry_prefix}-{stage}', e.g. tiny-sft."
    )
    seed: int = Field(0, ge=0, description="Seed for every random choice the stage makes.")


class WorldConfig(Strict):
    """Size and splits of the built-in assistant world (paddock.world)."""

    out_dir: str = Field("world", description="Where the Parquet datasets go (relative to PADDOCK_HOME).")
    seed: int = Field(0, ge=0, description="Seed of the generator; the same seed writes identical files.")
    pretrain_mb: float = Field(
        4.0, gt=0, le=10_000, description="Size of the pretraining corpus (train split) in megabytes of text."
    )
    sft_dialogs: int = Field(4000, ge=10, description="Number of SFT dialogs (train + test).")
    helpfulness_pairs: int = Field(4000, ge=10, description="Helpfulness preference pairs (train + test).")
    safety_pairs: int = Field(2000, ge=10, description="Safety preference pairs (train + test).")
    rl_prompts: int = Field(1200, ge=10, description="Prompts for rejection sampling and PPO (train split).")
    eval_prompts: int = Field(400, ge=10, description="Held-out evaluation prompts (test split).")
    gatt_dialogs: int = Field(
        600, ge=10, description="Multi-turn dialogs with a checkable instruction for GAtt."
    )
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of rows held out as the test split.")
    heldout_fraction: float = Field(
        0.25,
        gt=0,
        lt=0.9,
        description="Share of facts and task operands seen only in pretraining and asked in eval prompts.",
    )


class TokenizerConfig(Strict):
    """SentencePiece BPE as in Llama 2: digits split, byte fallback, unk 0 / BOS 1 / EOS 2, no pad."""

    out_dir: str = Field(
        "tokenizer", description="Where the tokenizer directory goes (relative to PADDOCK_HOME)."
    )
    corpus: str = Field(
        "world/pretrain/train.parquet", description="Pretraining Parquet file (column 'text') to train on."
    )
    vocab_size: int = Field(
        32000,
        ge=300,
        le=256_000,
        description="Vocabulary size: 32000 in Llama 2, a few thousand for tiny runs.",
    )
    max_sentences: int = Field(
        2_000_000, ge=100, description="At most this many lines of the corpus are sampled for training."
    )
    existing: str | None = Field(
        None,
        description="Path to a local directory with a Llama 2 tokenizer.model to use instead of training one.",
    )


class ModelConfig(Strict):
    """Which Llama 2 shape to build, or which checkpoint to start from."""

    shape: Literal["tiny", "small", "7b", "13b", "34b", "70b"] = Field(
        "tiny", description="Architecture from paddock.models.SHAPES; ignored when init_from is set."
    )
    init_from: str | None = Field(
        None, description="Start from this checkpoint: a local Hugging Face directory or a models:/ URI."
    )
    max_seq_len: int | None = Field(
        None, ge=16, description="Context length; defaults to the shape's (4096 for the released sizes)."
    )


class DataConfig(Strict):
    """How a stage reads and checks its dataset."""

    train: str = Field(..., description="Train split Parquet file (relative to PADDOCK_HOME).")
    test: str | None = Field(None, description="Test split Parquet file, for evaluation.")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Refuse to run when more than this share of rows fails validation."
    )
    max_chars: int = Field(20_000, ge=1, description="Rows with a text longer than this are quarantined.")
    seq_len: int = Field(256, ge=8, description="Packed sequence length in tokens.")


# --------------------------------------------------------------------------------------------------
# Job roots


class WorldJob(StageConfig):
    """jobs/world.py: write the tiny assistant world's datasets."""

    world: WorldConfig = Field(default_factory=WorldConfig, description="World size and splits.")


class TokenizerJob(StageConfig):
    """jobs/tokenizer.py: train (or import) the tokenizer."""

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer settings.")

    @model_validator(mode="after")
    def _existing_is_a_directory(self) -> TokenizerJob:
        if self.tokenizer.existing is not None and not Path(self.tokenizer.existing).expanduser().is_dir():
            raise ValueError(
                f"tokenizer.existing: no such directory, got {self.tokenizer.existing!r}; "
                "give a local directory that holds tokenizer.model"
            )
        return self


# Job name (the stem of a YAML under jobs/configs/<size>/) -> root model. Every shipped config is
# validated against its entry by tests/unit/test_config.py.
JOBS: dict[str, type[StageConfig]] = {"world": WorldJob, "tokenizer": TokenizerJob}


# --------------------------------------------------------------------------------------------------
# Loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=x"]`` -> ``[("a.b", 3), ("c", "x")]``; values are parsed as YAML scalars."""
    parsed = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def _describe(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """What would be valid at ``loc``: the field's description, or the list of known fields."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return ""
        current = field.annotation
    fields = getattr(current, "model_fields", None)
    if not fields:
        return ""
    field = fields.get(loc[-1])
    if field is None:
        return "known fields: " + ", ".join(sorted(fields))
    return field.description or ""


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = e["msg"][0].lower() + e["msg"][1:]
            msg = msg.removeprefix("value error, ")
        given = "" if e["type"] == "missing" else f", got {e['input']!r}"
        hint = _describe(model, loc) if loc else ""
        lines.append(f"  {path}: {msg}{given}" + (f" ({hint})" if hint else ""))
    return "\n".join(lines)


def load_config(
    model: type[T], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> T:
    """Load a YAML config into ``model``, apply ``--set`` overrides, validate everything at once."""
    tree: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None
