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


def train_storage() -> str:
    """Where Ray Train and Tune keep checkpoints: ``$PADDOCK_STORAGE`` (e.g. ``s3://bucket/ray_results``, shared
    by every node), else ``ray_results`` under ``paddock_home()``."""
    return os.environ.get("PADDOCK_STORAGE") or str(paddock_home() / "ray_results")


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """An absolute path as given; a relative one under ``paddock_home()``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else paddock_home() / p


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------------
# Sections shared by several stages


ShapeName = Literal["tiny", "small", "1b", "7b", "13b", "34b", "70b"]


class PlanConfig(Strict):
    """The capacity check a stage runs before starting any worker (paddock.plan, jobs/plan.py)."""

    check: bool = Field(True, description="Refuse to start when a role's memory does not fit the cluster.")
    shape: ShapeName | None = Field(
        None,
        description="Shape of the stage's upstream models, for planning before they exist (jobs/plan.py); "
        "null: read from their checkpoints.",
    )
    cluster: str | None = Field(
        None, description="Cluster file to plan against (clusters/*.yaml); null: the connected Ray cluster."
    )


AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
TOKEN_BUDGET = 32768  # paddock.rollout.core's default too


class VllmConfig(Strict):
    """The vLLM engine's settings (``inference.engine: vllm``; paddock.rollout.vllm_engine)."""

    memory_share: float | None = Field(
        None,
        gt=0,
        le=0.95,
        description="Share of the device's memory vLLM may take for weights and KV cache (its "
        "gpu_memory_utilization; on the CPU backend, of the host's memory); null: 0.85 on GPU, 0.1 on CPU.",
    )
    tensor_parallel: int = Field(
        1,
        ge=1,
        le=16,
        description="Devices one engine spans (tensor parallelism; 34B/70B need it): vLLM starts a process on each "
        "of them, all on the worker's node, and each joins the weight publications itself. Must divide the "
        "model's attention heads; a worker with GPUs takes this many whole ones.",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + answer an engine holds; null: the model's context length."
    )
    enforce_eager: bool = Field(False, description="Skip CUDA graph capture (faster start, slower decode).")


class InferenceConfig(Strict):
    """How every forward pass outside training runs: rollout workers, scorers, evaluation."""

    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What rollout workers generate with (PPO, rejection sampling, GAtt, context distillation, "
        "evaluation): transformers' generate, or vLLM (an optional extra). Scorers always run transformers.",
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="The vLLM engine's settings.")

    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Precision of inference copies; auto: bf16 on GPU, fp32 on CPU."
    )
    token_budget: int = Field(
        TOKEN_BUDGET,
        ge=64,
        description="Most tokens (rows x padded length) in one forward or generation micro-batch.",
    )
    logits_chunk: int = Field(
        1024, ge=1, description="Positions whose vocabulary logits exist at once when computing log-probs."
    )
    attn_implementation: AttnImplementation = Field(
        "auto", description="Attention kernel; auto: flash_attention_2 on GPU when installed, else sdpa."
    )

    @model_validator(mode="after")
    def _parallel_engine(self) -> InferenceConfig:
        if self.vllm.tensor_parallel > 1 and self.engine != "vllm":
            raise ValueError(
                f"inference.vllm.tensor_parallel: {self.vllm.tensor_parallel} devices per engine needs "
                f"inference.engine vllm, got {self.engine}"
            )
        return self

    @property
    def worker_ranks(self) -> int:
        """Ranks a rollout worker takes in a weight publication's group: one per process of its engine."""
        return self.vllm.tensor_parallel if self.engine == "vllm" else 1


class StageConfig(Strict):
    """Fields every job config carries at its top level."""

    experiment: str = Field("paddock", description="MLflow experiment that the stage's runs go to.")
    registry_prefix: str = Field(
        "paddock", description="Registered models are named '{registry_prefix}-{stage}', e.g. tiny-sft."
    )
    seed: int = Field(0, ge=0, description="Seed for every random choice the stage makes.")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="Capacity check before workers start.")
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig,
        description="Precision and micro-batching of inference (ignored by stages that run none).",
    )
    actor_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Longest wait for one call to a rollout worker or scorer (a batch's sampling or scoring); "
        "past it the stage fails naming the actors that did not answer and what they were doing.",
    )


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
    eval_prompts: int = Field(
        400,
        ge=10,
        description="Held-out prompts in each of the test split (final evaluation) and the valid split "
        "(choices made during training, such as PPO's early stopping).",
    )
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


ImportShape = Literal["auto", "messages", "sharegpt", "preference_messages", "hh_rlhf", "prompt", "text"]


class ImportSource(Strict):
    """One dataset in a public format, converted into one of paddock's four kinds (paddock.data.importers)."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Output name: <out_dir>/<name>/train.parquet.",
    )
    path: str = Field(
        ...,
        description="A local file or directory (absolute, or relative to the working directory): .jsonl, "
        ".json, .csv, .parquet, .arrow or .txt, .jsonl.gz and .json.gz too; anything else is taken as a "
        "Hugging Face hub dataset name (needs the hub to be reachable).",
    )
    kind: Literal["dialogs", "preferences", "prompts", "pretrain"] = Field(
        ..., description="The paddock dataset kind the rows become (ARCHITECTURE.md, 'Datasets')."
    )
    shape: ImportShape = Field(
        "auto",
        description="The public shape: messages (OpenAI chat), sharegpt (conversations from/value), "
        "preference_messages (chosen/rejected message lists or strings with a prompt, as UltraFeedback "
        "binarized), hh_rlhf (Anthropic HH transcripts), prompt (a prompt string), text; auto: from the columns.",
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "arrow", "text"] = Field(
        "auto", description="File format; auto: from the file name."
    )
    split: str = Field("train", description="The split to read of a hub dataset.")
    id_column: str = Field(
        "id", description="Column with row ids; rows without one get '<name>-<row>'. Ids must be unique."
    )
    tags: list[str] = Field(default_factory=list, description="Tags every imported dialog carries.")
    preference_kind: Literal["helpfulness", "safety"] = Field(
        "helpfulness", description="The preference kind of every pair, unless preference_kind_column is set."
    )
    preference_kind_column: str | None = Field(
        None, description="Column holding each pair's kind (helpfulness or safety)."
    )
    score_columns: tuple[str, str] = Field(
        ("score_chosen", "score_rejected"),
        description="Columns with the chosen and rejected answers' scores (UltraFeedback binarized).",
    )
    rating_gaps: tuple[float, float, float] = Field(
        (3.0, 2.0, 1.0),
        description="Score gaps at or above which a pair is significantly_better, better, slightly_better; "
        "below the last, negligibly_better. A 'rating' column, when present, wins.",
    )
    rating: Literal["significantly_better", "better", "slightly_better", "negligibly_better"] = Field(
        "negligibly_better",
        description="The rating of pairs without scores or a rating column (negligibly_better: no margin in "
        "the ranking loss).",
    )
    is_safety: bool = Field(
        False,
        description="Whether the prompts are adversarial, for rows without an is_safety column (or the column "
        "named by is_safety_column).",
    )
    is_safety_column: str | None = Field(
        None,
        description="Column holding each prompt's is_safety (bool); default 'is_safety' where rows have it.",
    )
    text_column: str = Field("text", description="Column of pretraining text.")
    sample_by: Literal["document", "paragraph", "line"] = Field(
        "document", description="How plain .txt files split into pretraining rows."
    )
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="Seeded share of the good rows written to test.parquet instead."
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many rows.")
    max_bad_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Refuse the dataset (nothing written but the quarantine) above this share of bad rows.",
    )

    @model_validator(mode="after")
    def _gaps_descend(self) -> ImportSource:
        a, b, c = self.rating_gaps
        if not a > b > c >= 0:
            raise ValueError(f"rating_gaps: {list(self.rating_gaps)} must descend and end at or above 0")
        return self


class ImportJob(StageConfig):
    """jobs/import_data.py: datasets in public formats converted into paddock's Parquet, with quarantine."""

    out_dir: str = Field(
        "imported", description="Where the converted datasets go (relative to PADDOCK_HOME)."
    )
    sources: list[ImportSource] = Field(..., min_length=1, description="The datasets to convert.")
    max_chars: int = Field(20_000, ge=1, description="Rows with a text longer than this are quarantined.")

    @model_validator(mode="after")
    def _unique_names(self) -> ImportJob:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: names must be unique, repeated: {dup}")
        return self


class TokenizerConfig(Strict):
    """SentencePiece BPE as in Llama 2 (digits split, byte fallback, unk 0 / BOS 1 / EOS 2, no pad), or a
    byte-level BPE in the shape of Llama 3's (its split, special tokens and chat template)."""

    style: Literal["llama2", "llama3"] = Field(
        "llama2",
        description="llama2: SentencePiece, dialogs in the Llama 2 chat format; llama3: byte-level BPE with "
        "Llama 3's special tokens and chat template, dialogs rendered by the template.",
    )

    out_dir: str = Field(
        "tokenizer", description="Where the tokenizer directory goes (relative to PADDOCK_HOME)."
    )
    corpus: str = Field(
        "world/pretrain/train.parquet", description="Pretraining Parquet file (column 'text') to train on."
    )
    dialogs: list[str] = Field(
        default_factory=list,
        description="Dialog Parquet files (the 'dialogs' shape) whose turns join the corpus: where the pretraining "
        "text holds no conversation (the tiny world's is facts), a tokenizer trained on it alone splits the chat "
        "data's common words into letters and short pieces.",
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
        description="A local checkpoint directory whose tokenizer.model (or tokenizer.json) to import instead of "
        "training one; relative paths are under PADDOCK_HOME.",
    )


class LoraSettings(Strict):
    """Low-rank adapters instead of full fine-tuning (paddock.lora; peft, the lora extra)."""

    r: int = Field(16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Projections that get adapters; every linear layer of the blocks by default, as QLoRA "
        "(Dettmers et al. 2023) found adapters on all of them needed to match full fine-tuning.",
    )


class ModelConfig(Strict):
    """Which Llama 2 shape to build, or which checkpoint to start from."""

    shape: ShapeName = Field(
        "tiny", description="Architecture from paddock.models.SHAPES; ignored when init_from is set."
    )
    init_from: str | None = Field(
        None, description="Start from this checkpoint: a local Hugging Face directory or a models:/ URI."
    )
    max_seq_len: int | None = Field(
        None, ge=16, description="Context length; defaults to the shape's (4096 for the released sizes)."
    )
    lora: LoraSettings | None = Field(
        None,
        description="Train LoRA adapters on model.init_from instead of every weight; the export folds them in, "
        "so the registered model is a plain checkpoint. null: full fine-tuning.",
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


class OptimConfig(Strict):
    """AdamW with a warmup + cosine schedule; defaults are Llama 2 pretraining's (LLAMA2_SPEC.md)."""

    lr: float = Field(3e-4, gt=0, le=1, description="Peak learning rate (3e-4 for 7B/13B pretraining).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW beta1, beta2.")
    eps: float = Field(1e-5, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(2000, ge=0, description="Linear warmup steps (2000 in pretraining).")
    warmup_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Warmup as a share of all steps; overrides warmup_steps (3% for reward models).",
    )
    min_warmup_steps: int = Field(
        0, ge=0, description="Lower bound on warmup steps when warmup_ratio is used."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to this share of the peak (10%).")

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {list(self.betas)}")
        return self


class TrainConfig(Strict):
    """How a supervised stage runs on Ray Train workers."""

    num_workers: int = Field(
        2,
        ge=0,
        description="Ray Train workers (data-parallel ranks); 0 runs the loop in the driver process (Ray Train's "
        "local mode: one rank, no worker start-up, no restarts), for fine-tunes of a few steps.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL and bf16; else CPU, gloo and fp32.")
    gpus_per_worker: float = Field(
        1.0,
        gt=0,
        le=1,
        description="With use_gpu: the share of a GPU each worker requests from Ray; below 1 it shares the GPU "
        "with other actors, as PPO's learners do with the rollout engines under ppo.placement colocated.",
    )
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="Logical CPUs each worker requests (fractional on a laptop leaves room for Ray Data).",
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences (or pairs) per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    zero_stage: int = Field(
        2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 (DDP-like) to 3 (params sharded)."
    )
    offload: bool = Field(False, description="ZeRO-Offload: keep optimiser states in CPU memory.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute each layer's activations in the backward pass; null: on for models of 1B "
        "parameters and up.",
    )
    attn_implementation: AttnImplementation = Field(
        "auto",
        description="Attention kernel; auto: flash_attention_2 on GPU when installed, else sdpa. Packed examples "
        "never attend to each other with either.",
    )
    checkpoint_every: int = Field(
        100, ge=1, description="Report a resumable checkpoint every N optimiser steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray keeps (the newest ones).")
    eval_every: int = Field(100, ge=1, description="Evaluate on the test split every N optimiser steps.")
    eval_batches: int | None = Field(
        8, ge=1, description="Micro-batches per rank in each evaluation; null: the whole test split."
    )
    log_every: int = Field(
        10,
        ge=1,
        description="Send metrics to the driver every N steps (every step is still recorded and logged).",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Per-device peak FLOP/s for MFU (312e12 for A100 bf16); CPU measures a matmul probe.",
    )
    max_failures: int = Field(
        2, ge=0, description="Times Ray Train restarts failed workers from the last checkpoint."
    )
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch threads per CPU worker; defaults to max(1, cpus_per_worker)."
    )
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="Ray Train's placement of the workers: PACK fills a node first; SPREAD puts them on as many "
        "nodes as it can (a node lost takes fewer of them).",
    )

    @property
    def ranks(self) -> int:
        """Data-parallel ranks: the workers, or the driver alone in local mode (``num_workers: 0``)."""
        return max(1, self.num_workers)


class RewardConfig(Strict):
    """Reward-model specifics (LLAMA2_SPEC.md, 'Reward models')."""

    kind: Literal["helpfulness", "safety"] = Field("helpfulness", description="Which reward model to train.")
    margin: Literal["none", "small", "large"] = Field(
        "small",
        description="Margin m(rating) in -log sigmoid(r_chosen - r_rejected - m): the paper's two tables.",
    )
    mix_ratio: float | None = Field(
        None,
        ge=0,
        description="Other-kind pairs per own-kind pair: default 1.0 for helpfulness (equal amount), 1/9 for safety (90/10).",
    )
    ensemble: int = Field(
        1,
        ge=1,
        le=16,
        description="Members of a reward-model ensemble: the stage trains this many models one after another, "
        "member i with seed seed+i (its score head and data mix), and registers them as one model that scores "
        "with the mean of their logits. Costs this many trainings and this many scoring passes wherever the "
        "model scores; the value model starts from member 0.",
    )


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
        # An absolute path is checked now; one under PADDOCK_HOME when the stage runs (the home may be elsewhere).
        existing = self.tokenizer.existing
        if (
            existing is not None
            and Path(existing).expanduser().is_absolute()
            and not Path(existing).expanduser().is_dir()
        ):
            raise ValueError(
                f"tokenizer.existing: no such directory, got {self.tokenizer.existing!r}; "
                "give a local directory that holds tokenizer.model"
            )
        return self


class SupervisedJob(StageConfig):
    """Fields shared by pretrain, sft and reward_model."""

    tokenizer: str = Field("tokenizer", description="Tokenizer directory (relative to PADDOCK_HOME).")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Architecture or starting checkpoint."
    )
    data: DataConfig = Field(..., description="Datasets and their checks.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Workers, batch, ZeRO, checkpoints.")
    output_dir: str | None = Field(
        None,
        description="Where the final Hugging Face checkpoint is copied; default runs/{registry_prefix}-{stage}.",
    )
    registry_suffix: str | None = Field(
        None,
        description="Register as {registry_prefix}-{registry_suffix}; default base, sft, rm-<kind> by stage.",
    )

    @model_validator(mode="after")
    def _lora_fits(self) -> SupervisedJob:
        if self.model.lora is None:
            return self
        if self.model.init_from is None:
            raise ValueError("model.lora: adapters train on a starting checkpoint; set model.init_from")
        return self


class PretrainJob(SupervisedJob):
    """jobs/pretrain.py: packed causal LM on the pretraining corpus."""


class SFTJob(SupervisedJob):
    """jobs/sft.py: Llama 2 chat format, loss on answer tokens only, packed; 2 epochs by default."""

    train_on: Literal["answers", "last_answer"] = Field(
        "answers", description="Loss mask: every answer (SFT) or the last answer only (GAtt)."
    )

    @model_validator(mode="after")
    def _needs_a_start(self) -> SFTJob:
        if self.model.init_from is None:
            raise ValueError(
                "model.init_from: SFT starts from a pretrained model; name a checkpoint or models:/ URI"
            )
        return self


class RewardJob(SupervisedJob):
    """jobs/reward_model.py: a helpfulness or safety reward model from the SFT checkpoint."""

    reward: RewardConfig = Field(default_factory=RewardConfig, description="Which RM, margin and data mix.")

    @model_validator(mode="after")
    def _needs_a_start(self) -> RewardJob:
        if self.model.init_from is None:
            raise ValueError("model.init_from: a reward model starts from the chat (SFT) model; name it")
        return self


class SweepConfig(Strict):
    """An ASHA search over a stage's learning rate and one more knob (Ray Tune)."""

    stage: Literal["pretrain", "sft", "reward_model"] = Field(
        "sft", description="Which supervised stage to tune."
    )
    base_config: str = Field(..., description="The stage's YAML (path relative to the working directory).")
    overrides: list[str] = Field(
        default_factory=list, description="--set style overrides applied to base_config."
    )
    lr_min: float = Field(1e-4, gt=0, description="Lower end of the log-uniform learning-rate range.")
    lr_max: float = Field(3e-3, gt=0, description="Upper end of the log-uniform learning-rate range.")
    knob: str = Field("optim.warmup_steps", description="Dotted path of the second knob in the stage config.")
    knob_values: list[float | int | str] = Field(
        default_factory=lambda: [0, 20],  # type: ignore[arg-type]
        description="Choices for the knob.",
    )
    num_samples: int = Field(4, ge=1, description="Trials to sample.")
    max_steps: int = Field(40, ge=1, description="Optimiser steps of a trial that is never stopped early.")
    report_every: int = Field(10, ge=1, description="Steps between evaluations, which are ASHA's rungs.")
    metric: str = Field("eval/loss", description="Metric ASHA compares (eval/accuracy for reward models).")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher metric is better.")
    grace_period: int = Field(1, ge=1, description="Reports before ASHA may stop a trial.")
    reduction_factor: float = Field(
        2, gt=1, description="ASHA keeps 1/reduction_factor of trials at each rung."
    )
    max_concurrent: int = Field(
        1, ge=1, description="Trials at once (1 on a laptop: each trial runs its own workers)."
    )

    @model_validator(mode="after")
    def _range(self) -> SweepConfig:
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min must be below lr_max, got {self.lr_min} >= {self.lr_max}")
        return self


class SweepJob(StageConfig):
    """jobs/sweep.py: hyperparameter search for a supervised stage."""

    sweep: SweepConfig = Field(..., description="Search space and scheduler.")


class SamplingConfig(Strict):
    """How a stage samples answers on rollout workers (GAtt, context distillation, evaluation)."""

    temperature: float = Field(0.7, ge=0, le=3, description="Sampling temperature (0: greedy).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer generated.")
    rollout_workers: int = Field(2, ge=1, description="Rollout worker actors.")
    cpus_per_actor: float = Field(0.5, gt=0, description="Logical CPUs per rollout worker or scorer.")
    gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per rollout worker or scorer (fractions share)."
    )


class FinetuneJob(StageConfig):
    """Fields of the stages that sample data with a policy and fine-tune it with the SFT stage."""

    tokenizer: str = Field("tokenizer", description="Tokenizer directory (relative to PADDOCK_HOME).")
    policy: str = Field(..., description="The model that samples the data and is fine-tuned on it.")
    sft_config: str = Field(..., description="SFT stage YAML used for the fine-tune.")
    sft_overrides: list[str] = Field(default_factory=list, description="--set overrides for that SFT stage.")
    replay: str | list[str] | None = Field(
        None,
        description="Dialogs (kind dialogs, e.g. the SFT set; one path or a list) mixed into the fine-tune data, "
        "so a fine-tune on narrow synthetic data keeps what earlier stages taught (refusals, a GAtt set's "
        "instruction following). Relative to PADDOCK_HOME.",
    )
    replay_ratio: float = Field(
        1.0,
        ge=0,
        description="Replay dialogs added per dialog of the stage's own data (seeded draw, split evenly over "
        "the replay sets).",
    )

    @property
    def replay_sets(self) -> list[str]:
        return [self.replay] if isinstance(self.replay, str) else list(self.replay or [])


class RejectionConfig(Strict):
    """Rejection sampling (Llama 2, section 3.2.3): K samples per prompt, keep the best by the combined reward."""

    prompts: str = Field("world/prompts/train.parquet", description="Prompts dataset (kind prompts).")
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many prompts (the first ones).")
    k: int = Field(
        8, ge=1, le=1000, description="Samples per prompt (the paper's plots go to 100; 20 is typical)."
    )
    temperature: float = Field(
        1.2, gt=0, le=3, description="Sampling temperature; the paper finds 1.2-1.3 best for 10-100 samples."
    )
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer sampled.")
    rollout_workers: int = Field(2, ge=1, description="Rollout worker actors sampling in parallel.")
    cpus_per_worker: float = Field(0.5, gt=0, description="Logical CPUs per rollout worker and scorer.")
    gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per rollout worker and scorer (fractions share a GPU)."
    )
    batch_prompts: int = Field(16, ge=1, description="Prompts per generation call.")
    round: int = Field(
        1, ge=1, description="Round number (RLHF-V1, V2, ...); later rounds pool earlier ones."
    )
    pool: Literal["all_rounds", "last_round"] = Field(
        "all_rounds",
        description="Keep the best answer across all rounds (paper) or this round only (the regression).",
    )
    seq_len: int = Field(256, ge=16, description="Reward models read at most this many tokens of a dialog.")


class RejectionJob(FinetuneJob):
    """jobs/rejection_sampling.py: sample, score, keep the best, then fine-tune with the SFT stage."""

    policy: str = Field("models:/tiny-sft@latest", description="Model to sample from (and to fine-tune).")
    reward_helpfulness: str = Field(
        "models:/tiny-rm-helpfulness@latest", description="Helpfulness reward model."
    )
    reward_safety: str = Field("models:/tiny-rm-safety@latest", description="Safety reward model.")
    rejection: RejectionConfig = Field(default_factory=RejectionConfig, description="Sampling and selection.")


class CollectConfig(SamplingConfig):
    """Which prompts the current policy answers twice, and how (Llama 2, section 3.2.1)."""

    prompts: str = Field("world/prompts/train.parquet", description="Prompts (kind prompts) to answer.")
    max_prompts: int = Field(
        200, ge=1, description="Prompts a round asks (a seeded draw, different in every round)."
    )
    temperatures: tuple[float, float] = Field(
        (0.7, 1.0),
        description="Sampling temperature of answer a and answer b (the paper varied the temperature).",
    )
    safety_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of the round's prompts drawn from the safety (adversarial) prompts, as the paper "
        "collected safety preferences on adversarial prompts of their own; null: as they come in the dataset.",
    )
    samples: int = Field(
        2,
        ge=2,
        description="Answers drawn per prompt, half at each temperature. With more than 2 and the reward models "
        "in use (`reward_helpfulness`, `reward_safety`), `pairing` says which pairs go for labelling: by default "
        "the reward models' favourite and one of the others at random (the annotator sees the answers that "
        "rejection sampling and PPO would chase, so what the reward models over-score comes back labelled), or "
        "every pair. Without reward models (a pipeline's round 1) two answers are drawn.",
    )
    pairs_per_prompt: int = Field(
        1,
        ge=1,
        description="Pairs labelled per prompt when answers are picked by reward: the favourite against this many "
        "of the other answers (at most samples - 1), as InstructGPT's labellers ranked K answers and trained on "
        "the pairs among them (Ouyang et al., 2022, section 3.5). More pairs on the favourite teach the reward "
        "models faster what they over-score; a prompt's pairs stay together when the round holds pairs out.",
    )
    pairing: Literal["favourite", "all"] = Field(
        "favourite",
        description="Which pairs of a prompt's answers go for labelling when more than two are drawn. favourite: "
        "the reward models' favourite against `pairs_per_prompt` others (what they over-score comes back "
        "labelled). all: every pair of the prompt's different answers, as InstructGPT's labellers ranked K "
        "answers and every pair of the ranking trained the reward model (Ouyang et al., 2022, section 3.5): "
        "K(K-1)/2 pairs from one sample, each answer against all the others, none chosen by the models being "
        "judged.",
    )
    fresh_weight: int = Field(
        1,
        ge=1,
        description="Times each collected training pair appears in the reward models' training mix. A round "
        "adds tens of pairs to thousands of static ones; the paper's new batches were a sizeable share of the "
        "data each time (section 3.2.2), which this restores.",
    )
    monitor_prompts: int = Field(
        0,
        ge=0,
        description="Prompts answered beside the round's for the reward-hacking monitor alone: a seeded draw of "
        "other prompts (none whose words the round asks or an earlier round trained on, each once), answered as "
        "the round's are, never labelled for training. Every pair of their answers joins the held-out prompts' in "
        "the monitor's answer pairs, labelled by the world's verifiers (the simulated annotator only). The "
        "round's own prompts, answers and pairs are the same with or without them.",
    )
    round: int = Field(1, ge=1, description="Preference round: names the batch and seeds the draw.")
    batch_prompts: int = Field(25, ge=1, description="Prompts per generation call.")
    test_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of a round's labelled pairs held out to measure the reward models on the policy's "
        "answers (the reward-hacking monitor); the rest joins the training data.",
    )
    seq_len: int = Field(256, ge=16, description="Tokens the reward models read (the monitor).")


class AnnotatorConfig(Strict):
    """Who labels a batch: the tiny world's verifiers (simulated), or people with any labelling tool."""

    kind: Literal["simulated", "external"] = Field(
        "simulated",
        description="simulated: the world's verifiers label every pair; external: the batch is written for a "
        "labelling tool and the stage stops until `labels` names the labelled file.",
    )
    noise: float = Field(
        0.0, ge=0, le=0.5, description="Share of simulated labels whose preference is flipped (label noise)."
    )
    labels: str | None = Field(
        None,
        description="The labelled batch (Parquet or JSONL in the annotation shape) to import; relative to "
        "PADDOCK_HOME. Required when kind is external.",
    )


class CollectJob(StageConfig):
    """jobs/collect_preferences.py: two answers per prompt from the current model(s), labelled, turned into
    preference pairs and mixed with every earlier round's for the reward models."""

    models: list[str] = Field(
        default_factory=lambda: ["models:/tiny-sft@latest"],
        min_length=1,
        max_length=2,
        description="The model that answers (both answers), or two models (answer a from the first, b from "
        "the second), as the paper sampled two model variants.",
    )
    static_preferences: str | None = Field(
        "world/preferences/train.parquet",
        description="Preference pairs every round's training set starts from (the paper mixed its batches "
        "with earlier and open-source data); null: the collected pairs alone.",
    )
    static_test: str | None = Field(
        "world/preferences/test.parquet",
        description="The static test pairs the monitor compares the fresh pairs against.",
    )
    reward_helpfulness: str | None = Field(
        None,
        description="The helpfulness reward model in use before this round: picks the answer to label when "
        "collect.samples > 2.",
    )
    reward_safety: str | None = Field(
        None, description="The safety reward model in use before this round (with reward_helpfulness)."
    )
    collect: CollectConfig = Field(default_factory=CollectConfig, description="Prompts and sampling.")
    annotator: AnnotatorConfig = Field(default_factory=AnnotatorConfig, description="Who labels the pairs.")

    @model_validator(mode="after")
    def _reward_models_together(self) -> CollectJob:
        if (self.reward_helpfulness is None) != (self.reward_safety is None):
            raise ValueError(
                "reward_helpfulness and reward_safety: give both (to pick answers by reward) or neither"
            )
        return self

    @model_validator(mode="after")
    def _pairs_within_samples(self) -> CollectJob:
        if self.collect.pairing == "all" and self.collect.pairs_per_prompt != 1:
            raise ValueError(
                f"collect.pairs_per_prompt={self.collect.pairs_per_prompt} pairs the reward models' favourite with "
                "others; collect.pairing=all labels every pair of the answers: set one or the other"
            )
        if self.collect.pairs_per_prompt > max(1, self.collect.samples - 1):
            raise ValueError(
                f"collect.pairs_per_prompt={self.collect.pairs_per_prompt}: the favourite can be paired with at "
                f"most collect.samples - 1 = {self.collect.samples - 1} other answers"
            )
        return self

    @property
    def draws(self) -> int:
        """Answers drawn per prompt: ``collect.samples`` once reward models are in use (a pipeline's round 2 on),
        two before (round 1 asks the paper's two answers at two temperatures)."""
        return self.collect.samples if self.collect.samples > 2 and self.reward_helpfulness is not None else 2

    @property
    def picks_by_reward(self) -> bool:
        """Whether the pair to label is the reward models' favourite and another answer."""
        return self.draws > 2 and self.collect.pairing == "favourite"


class PPOConfig(Strict):
    """PPO as Llama 2 ran it (section 3.2.3, LLAMA2_SPEC.md), with Stiennon et al. (2020) for the unstated parts."""

    prompts: str = Field("world/prompts/train.parquet", description="Training prompts (kind prompts).")
    eval_prompts: str = Field(
        "world/prompts/valid.parquet",
        description="Held-out prompts for early stopping (kind prompts); not the test prompts evaluation reads.",
    )
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: on-policy, generate then train (the paper); async: generation of iteration k+1 "
        "overlaps training on k, bounded by max_staleness.",
    )
    placement: Literal["split", "colocated"] = Field(
        "split",
        description="split: the reference, both reward models and the value model in a scorer actor each "
        "(their own devices on a cluster); colocated: the four in one scorer actor with the four's CPUs and GPU "
        "shares together, at most one GPU (one process instead of four on a small machine). On GPUs, give the "
        "learners more than half a GPU and less than one (train.gpus_per_worker) and the rollout workers at most "
        "the rest (gpus_per_actor, as many as learners): each learner and a rollout worker take turns on one GPU, "
        "with engine_sleep and learner_offload on by default and the weights streamed over gloo.",
    )
    engine_sleep: bool | None = Field(
        None,
        description="Rollout workers free their device memory once an iteration's answers are sampled (vLLM's "
        "sleep: weights and KV cache; the transformers engine moves its model to the host) and take it back "
        "when the next weights arrive, so that the learners have the GPU while they train; sync mode only. "
        "null: on when learners and rollout workers share GPUs (placement) in sync mode. On a CPU there is "
        "no device memory to free: the turns are taken and timed, nothing moves.",
    )
    learner_offload: bool | None = Field(
        None,
        description="Learners move their optimiser states, fp32 master weights, gradients and weights to host "
        "memory (DeepSpeed's offload_states) once they have published a version and take them back for the "
        "next update, so that the rollout engines have the GPU while they sample; ZeRO 1 or 2 "
        "(train.zero_stage; DeepSpeed offloads ZeRO-3's states only for its FusedAdam). null: on when learners and "
        "rollout workers share GPUs (placement) under ZeRO 1 or 2. On a CPU the states make the round trip within "
        "host memory.",
    )
    spread: bool = Field(
        False,
        description="Place the rollout workers and scorers with Ray's SPREAD strategy, over as many nodes as "
        "there are (the learners follow train.placement_strategy).",
    )
    iterations: int = Field(200, ge=1, description="PPO iterations (200-400 in the paper, early-stopped).")
    batch_prompts: int = Field(512, ge=1, description="Prompts sampled per iteration (512).")
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="Answers sampled to each prompt of an iteration (the batch holds batch_prompts x this many "
        "answers); advantage rloo needs at least 2.",
    )
    advantage: Literal["gae", "rloo"] = Field(
        "gae",
        description="gae: a value model (started from value_from) and generalised advantage estimation, as the "
        "paper ran PPO; rloo: no value model, each answer's return (score minus beta x its KL) less the mean "
        "return of the other answers to its prompt (REINFORCE leave-one-out, Ahmadian et al. 2024), which saves "
        "the value model's scoring, training and weight sync; needs samples_per_prompt >= 2.",
    )
    mini_batch: int = Field(64, ge=1, description="Samples per optimiser step; one step per mini-batch (64).")
    epochs: int = Field(
        1, ge=1, description="Passes over each iteration's batch (1: one step per mini-batch)."
    )
    beta: float = Field(0.01, ge=0, description="KL penalty (0.01 for 7B/13B, 0.005 for 34B/70B).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator in the reward.")
    clip: float = Field(0.2, gt=0, description="PPO clip range of the probability ratio (0.2).")
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = Field(
        "token-mean",
        description="How the clipped surrogate's per-token terms make one loss (veRL's loss_agg_mode names): "
        "token-mean: the mean over every answer token of the mini-batch (a long answer weighs as many tokens "
        "as it has); seq-mean-token-mean: each answer's mean over its tokens, then the mean over answers (every "
        "answer weighs the same, whatever its length); seq-mean-token-sum: each answer's sum over its tokens, "
        "then the mean over answers (each answer's log-probability, as TRL's RLOOTrainer takes it: token-mean's "
        "weights scaled by the mean answer length, which Adam mostly cancels but gradient clipping does not).",
    )
    value_clip: float = Field(0.2, gt=0, description="Clip range of the value update.")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount (1.0: no discount within an answer).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten: Literal["batch", "running"] = Field(
        "batch", description="Whiten logit(R_c) with this batch's statistics or running ones."
    )
    safety_gate: float = Field(0.15, gt=0, lt=1, description="Use the safety score below this (0.15).")
    value_lr: float | None = Field(None, gt=0, description="Value model LR; default optim.lr x 10.")
    unfinished_penalty: float = Field(
        1.0,
        ge=0,
        description="Subtracted from the whitened score of an answer cut off at max_new_tokens (no EOS): "
        "without it a small policy learns to ramble into the length limit.",
    )
    temperature: float = Field(1.0, gt=0, le=3, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold of the rollouts.")
    max_new_tokens: int = Field(128, ge=1, description="Longest answer sampled.")
    rollout_workers: int = Field(2, ge=1, description="Rollout worker actors (each holds the policy).")
    cpus_per_actor: float = Field(0.25, gt=0, description="Logical CPUs per rollout worker and scorer.")
    scorer_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of each scorer process on CPU; default its logical CPUs, at least 1 "
        "(cpus_per_actor, times its models when colocated). In sync mode the scorers run while the rollout workers "
        "and the learners wait, so the colocated scorer may take every core.",
    )
    gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per rollout worker and scorer (fractions share)."
    )
    max_staleness: int | None = Field(
        None, ge=0, description="Oldest policy version kept, behind the newest; default 0 sync, 1 async."
    )
    eval_every: int = Field(10, ge=1, description="Score the held-out prompts every N iterations.")
    eval_max_prompts: int = Field(128, ge=1, description="Held-out prompts scored per evaluation.")
    eval_safety_samples: int = Field(
        0,
        ge=0,
        description="Sampled answers (at the rollout temperature) per distinct unsafe and borderline held-out "
        "prompt that the world's verifiers can check, read into eval/safety_violation_rate and "
        "eval/false_refusal_rate at each evaluation; 0: read them from the greedy answers to the "
        "eval_max_prompts sample (a few unsafe prompts: coarse).",
    )
    eval_safety_prompts: int = Field(
        64,
        ge=1,
        description="With eval_safety_samples: at most this many distinct unsafe and borderline held-out prompts "
        "(the first in file order), each sampled eval_safety_samples times at every evaluation.",
    )
    select_by: Literal["reward", "verifiers"] = Field(
        "reward",
        description="Which evaluation is best (registered, and what patience counts from): reward: the "
        "highest mean combined reward of the sampled answers; verifiers: the highest helpfulness accuracy "
        "minus safety violation rate by the world's verifiers (ground truth; the reward breaks ties), which "
        "needs held-out prompts the world can check.",
    )
    patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better one (select_by)."
    )
    kl_limit: float | None = Field(
        None, gt=0, description="Stop when an iteration's mean KL (nats per answer) exceeds this."
    )
    checkpoint_every: int = Field(10, ge=1, description="Learners checkpoint every N iterations.")
    publish_bucket_mb: int = Field(
        256,
        ge=1,
        description="Weight publication streams the learners' weights in buckets of about this many MiB.",
    )
    weight_sync_timeout_s: float = Field(
        900.0,
        gt=0,
        description="A publication's stream fails when its receivers have not all joined (or a bucket has not "
        "arrived) in this time; the learners go on and the next version reaches everyone alive.",
    )
    weight_sync_attempts: int = Field(
        4,
        ge=1,
        description="A version the rollout workers or the value scorer could not load is sent again by the "
        "learners; the run fails once this many loads in a row lost the weights.",
    )
    spill: bool = Field(
        False, description="Write every experience batch to Parquet under the run's directory."
    )
    seq_len: int = Field(256, ge=16, description="Reward models read at most this many tokens of a dialog.")
    take_timeout_s: float = Field(
        900.0, gt=0, description="Learners fail when an iteration's experience does not arrive in this time."
    )

    @model_validator(mode="after")
    def _groups_for_rloo(self) -> PPOConfig:
        if self.advantage == "rloo" and self.samples_per_prompt < 2:
            raise ValueError(
                "ppo.samples_per_prompt: advantage rloo compares each answer with the other answers to its prompt; "
                f"give at least 2, got {self.samples_per_prompt}"
            )
        return self

    @property
    def staleness(self) -> int:
        if self.max_staleness is not None:
            return self.max_staleness
        return 0 if self.mode == "sync" else 1

    @property
    def answers(self) -> int:
        """Answers (experience rows) per iteration."""
        return self.batch_prompts * self.samples_per_prompt

    @property
    def value_model(self) -> bool:
        """Whether the run trains a value model (GAE) and scores with it."""
        return self.advantage == "gae"


class PPOJob(StageConfig):
    """jobs/ppo.py: distributed PPO from the rejection-sampled (or SFT) policy."""

    tokenizer: str = Field("tokenizer", description="Tokenizer directory (relative to PADDOCK_HOME).")
    policy: str = Field("models:/tiny-rs@latest", description="Start policy, also the frozen reference.")
    reward_helpfulness: str = Field(
        "models:/tiny-rm-helpfulness@latest", description="Helpfulness reward model."
    )
    reward_safety: str = Field("models:/tiny-rm-safety@latest", description="Safety reward model.")
    value_from: str | None = Field(
        None, description="Value model start; default the helpfulness reward model."
    )
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="Rollouts, rewards, losses, stopping.")
    lora: LoraSettings | None = Field(
        None,
        description="Train low-rank adapters on the policy instead of every weight (peft, the lora extra); the "
        "rollout workers hold the start policy under the adapters, receive the adapters alone and give the "
        "reference log-probs with them off (no reference scorer; behind vLLM they receive the merged weights and a "
        "reference scorer is kept). The registered policy is a plain checkpoint; the value model trains whole; "
        "any ZeRO stage.",
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0),
        description="Policy optimiser (constant LR 1e-6 in the paper).",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Learner workers: count, ZeRO stage, micro-batch, GPU."
    )
    output_dir: str | None = Field(
        None, description="Where the final policy is copied; default runs/{registry_prefix}-ppo/final."
    )

    @model_validator(mode="after")
    def _batches_divide(self) -> PPOJob:
        p, t = self.ppo, self.train
        if t.num_workers == 0:
            raise ValueError(
                "train.num_workers: PPO's learners are Ray Train workers; give at least 1, got 0"
            )
        if p.answers % p.mini_batch:
            raise ValueError(
                f"ppo.mini_batch: must divide the answers of an iteration, ppo.batch_prompts x "
                f"ppo.samples_per_prompt ({p.batch_prompts} x {p.samples_per_prompt} = {p.answers}), got {p.mini_batch}"
            )
        per_pass = t.num_workers * t.micro_batch_size
        if p.mini_batch % per_pass:
            raise ValueError(
                f"ppo.mini_batch: must be a multiple of train.num_workers x train.micro_batch_size "
                f"({t.num_workers} x {t.micro_batch_size} = {per_pass}), got {p.mini_batch}"
            )
        if self.value_from is not None and not p.value_model:
            raise ValueError(
                f"value_from: ppo.advantage={p.advantage} trains no value model; drop value_from or use gae"
            )
        if p.answers % p.rollout_workers:
            raise ValueError(
                f"ppo.rollout_workers: must divide the answers of an iteration ({p.answers}), got {p.rollout_workers}"
            )
        if p.engine_sleep and p.staleness > 0:
            raise ValueError(
                "ppo.engine_sleep: sleeping rollout engines take turns with the learners, which needs sync mode "
                f"(ppo.mode sync, ppo.max_staleness 0); got mode {p.mode}, staleness {p.staleness}"
            )
        if self.colocated_gpus:
            if t.gpus_per_worker <= 0.5:
                raise ValueError(
                    "train.gpus_per_worker: learners sharing GPUs with rollout workers take more than half a GPU "
                    "each, so that Ray never places two on one GPU (NCCL refuses two ranks on one device); got "
                    f"{t.gpus_per_worker:g}"
                )
            if t.gpus_per_worker + p.gpus_per_actor > 1 + 1e-9:
                raise ValueError(
                    f"ppo.gpus_per_actor: a learner (train.gpus_per_worker {t.gpus_per_worker:g}) and a rollout "
                    f"worker ({p.gpus_per_actor:g}) share one GPU; their shares add up to "
                    f"{t.gpus_per_worker + p.gpus_per_actor:g}, more than 1"
                )
            if p.rollout_workers != t.num_workers:
                raise ValueError(
                    "ppo.rollout_workers: learners sharing GPUs with rollout workers pair them one to a GPU; give "
                    f"as many as train.num_workers ({t.num_workers}), got {p.rollout_workers}"
                )
        if self.colocated_gpus and self.inference.vllm.tensor_parallel > 1:
            raise ValueError(
                "inference.vllm.tensor_parallel: learners and rollout workers sharing GPUs pair one learner with one "
                "engine on one GPU; an engine over several GPUs runs in the split placement (ppo.placement split)"
            )
        if p.learner_offload and t.zero_stage not in (1, 2):
            raise ValueError(
                f"ppo.learner_offload: DeepSpeed offloads the learners' states under ZeRO 1 or 2 (ZeRO-3 only with "
                f"its FusedAdam, which paddock's AdamW is not); got train.zero_stage {t.zero_stage}"
            )
        return self

    @property
    def colocated_gpus(self) -> bool:
        """Learners and rollout engines sharing GPUs (ppo.placement colocated, learners on a share of a GPU below
        one and rollout workers on GPUs): they take turns on the devices."""
        t, p = self.train, self.ppo
        return p.placement == "colocated" and t.use_gpu and t.gpus_per_worker < 1 and p.gpus_per_actor > 0

    @property
    def engines_sleep(self) -> bool:
        """Whether rollout workers free their device memory between sampling and the next weights."""
        p = self.ppo
        return p.engine_sleep if p.engine_sleep is not None else self.colocated_gpus and p.staleness == 0

    @property
    def learners_offload(self) -> bool:
        """Whether learners move their states to host memory between updates."""
        p = self.ppo
        if p.learner_offload is not None:
            return p.learner_offload
        return self.colocated_gpus and self.train.zero_stage in (1, 2)

    @property
    def reference_on_workers(self) -> bool:
        """A LoRA policy on the transformers engine: its rollout workers hold the start checkpoint under the
        adapters, take publications of the adapters alone and give the reference log-probs with the adapters off,
        so no reference scorer runs. vLLM holds plain weights: it gets merged ones, and a reference scorer."""
        return self.lora is not None and self.inference.engine == "transformers"


class ServeConfig(Strict):
    """The Ray Serve application (paddock.serving): where it listens, batching, replicas, auth."""

    host: str = Field("127.0.0.1", description="Bind address of Serve's HTTP proxy (loopback by default).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_key: str | None = Field(
        None,
        description="Require 'Authorization: Bearer <key>' on /v1 routes; PADDOCK_API_KEY also sets it. Required "
        "when host is not a loopback address.",
    )
    docs: bool = Field(
        False, description="Serve /docs and /openapi.json (behind the API key when one is set)."
    )
    reward_route: bool = Field(
        False,
        description="Serve /v1/reward (raw safety scores and the gate's decision: an oracle for tuning jailbreaks, "
        "so off unless asked for).",
    )
    reward_api_key: str | None = Field(
        None,
        description="A separate key for /v1/reward; PADDOCK_REWARD_API_KEY also sets it; default the API key.",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body; a larger one gets 413 before it is parsed."
    )
    max_messages: int = Field(64, ge=1, description="Most messages in a chat request.")
    max_prompt_chars: int = Field(
        32_000,
        ge=1,
        description="Most characters over a request's messages or prompt, checked before tokenising.",
    )
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting for a replica beyond max_ongoing_requests; more get 503."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="A request that has not finished in this time is ended by Serve's proxy."
    )
    app_name: str = Field("paddock", description="Serve application name.")
    max_batch_size: int = Field(8, ge=1, description="Most rows in a replica's running decode batch.")
    batch_wait_timeout_s: float = Field(
        0.02,
        ge=0,
        description="How long an idle replica waits after a request for others to prefill with it.",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound of chat model replicas.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound of chat model replicas.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling target per replica.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a chat replica takes at once.")
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs per chat model replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per chat model replica (0: CPU).")
    threads: int = Field(1, ge=1, description="torch threads per replica on CPU.")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Precision of the replicas' models; auto: bf16 on GPU, fp32 on CPU."
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What the chat replicas decode with: paddock's own continuous batching on transformers, or "
        "vLLM's (an optional extra; the same routes, streams and errors).",
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="The vLLM engine's settings.")
    reward_seq_len: int = Field(512, ge=16, description="Reward models read at most this many tokens.")

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.min_replicas ({self.min_replicas}) is above serve.max_replicas ({self.max_replicas})"
            )
        return self


class Gate(Strict):
    """One evaluation gate on a model version's MLflow metric."""

    min: float | None = Field(None, description="The metric must be at least this.")
    max: float | None = Field(None, description="The metric must be at most this.")


class RelativeGate(Strict):
    """One gate on a model version's MLflow metric against the baseline version's value of the same metric."""

    max_drop: float | None = Field(
        None, ge=0, description="The metric may be at most this much below the baseline's (0: not below it)."
    )
    max_rise: float | None = Field(
        None, ge=0, description="The metric may be at most this much above the baseline's (0: not above it)."
    )


class PromoteJob(StageConfig):
    """jobs/promote.py and jobs/serve.py: evaluation gates, the reward models /v1/reward uses, Serve settings."""

    gates: dict[str, Gate] = Field(
        default_factory=dict,
        description="MLflow metric name -> bounds a version must meet to become champion.",
    )
    baseline: str | None = Field(
        None,
        description="models:/NAME@ALIAS or models:/NAME/VERSION whose metrics relative_gates compare against (the "
        "SFT model: whatever the reward models say, RLHF may not make the ground truth worse).",
    )
    relative_gates: dict[str, RelativeGate] = Field(
        default_factory=dict,
        description="MLflow metric name -> how far a version may fall below (max_drop) or rise above (max_rise) "
        "the baseline's value.",
    )
    reward_helpfulness: str | None = Field(
        "models:/tiny-rm-helpfulness@latest", description="Helpfulness RM behind /v1/reward (null: none)."
    )
    reward_safety: str | None = Field(
        "models:/tiny-rm-safety@latest", description="Safety RM behind /v1/reward (null: none)."
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The Serve application.")
    serve_config_out: str = Field(
        "serve/paddock-serve.yaml", description="Where promotion writes the config for 'serve deploy'."
    )

    @model_validator(mode="after")
    def _baseline_for_relative_gates(self) -> PromoteJob:
        if self.relative_gates and not self.baseline:
            raise ValueError(
                f"relative_gates ({', '.join(sorted(self.relative_gates))}) need a baseline: "
                "set baseline to the model they compare against, e.g. models:/tiny-sft@latest"
            )
        return self


# The refusal classifier of the judges (paddock.evaluate.judge_metrics): an answer matching any of these
# (case-insensitive regular expressions) declines the request.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI (?:can't|cannot|can not|won't|will not|am unable to|'m unable to|am not able to|'m not able to) "
    r"(?:help|assist|provide|do|share|give|support)",
    r"\bNo, I won't\b",
    r"\bI(?:'m| am) sorry,? but\b",
    r"\bI apologi[sz]e,? but\b",
    r"\bAs an AI\b",
)


class EvaluateConfig(SamplingConfig):
    """What jobs/evaluate.py measures and on which held-out data."""

    prompts: str = Field("world/prompts/test.parquet", description="Held-out prompts (kind prompts).")
    gatt: str | None = Field("world/gatt/test.parquet", description="Held-out GAtt dialogs (null: skip).")
    dialogs: str | None = Field(
        "world/sft/test.parquet", description="Held-out dialogs for perplexity on answers (null: skip)."
    )
    max_prompts: int = Field(200, ge=1, description="Held-out prompts answered.")
    max_gatt_dialogs: int = Field(40, ge=1, description="GAtt dialogs played out turn by turn.")
    max_dialogs: int = Field(200, ge=1, description="Dialogs scored for perplexity.")
    temperature: float = Field(
        0.6,
        ge=0,
        le=3,
        description="Temperature of the sampled pass (the greedy pass uses 0); Llama 2's 0.6.",
    )
    seq_len: int = Field(256, ge=16, description="Tokens the reward models and perplexity read.")
    safety_samples: int = Field(
        4,
        ge=0,
        description="Sampled answers per held-out unsafe and borderline prompt (every distinct one in "
        "`prompts`, up to max_safety_prompts), read by the world's verifiers into the safety violation and "
        "false refusal rates; 0: read them from the greedy answers to the max_prompts sample instead.",
    )
    max_safety_prompts: int = Field(64, ge=1, description="Distinct unsafe and borderline prompts at most.")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(REFUSAL_PATTERNS),
        min_length=1,
        description="The judges' refusal classifier: an answer matching any of these regular expressions "
        "(case-insensitive) is a refusal (eval/judge/refusal_rate*).",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> EvaluateConfig:
        import re

        for p in self.refusal_patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"refusal_patterns: {p!r} is not a regular expression ({exc})") from None
        return self


class EvaluateJob(StageConfig):
    """jobs/evaluate.py: held-out evaluation of a registered model, logged on that version's MLflow run."""

    model: str = Field("models:/tiny-ppo@latest", description="The registered model version to evaluate.")
    compare_to: list[str] = Field(
        default_factory=list, description="Other models for eval/win_rate_vs_<name> (by the combined reward)."
    )
    reward_helpfulness: str = Field(
        "models:/tiny-rm-helpfulness@latest", description="Helpfulness reward model."
    )
    reward_safety: str = Field("models:/tiny-rm-safety@latest", description="Safety reward model.")
    eval: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Data and generation.")


class GAttConfig(SamplingConfig):
    """Ghost Attention data (Llama 2, section 3.3): instruction on every turn for sampling, first turn only for training."""

    dialogs: str = Field(
        "world/gatt/train.parquet", description="Multi-turn dialogs tagged instruction:<id>."
    )
    max_dialogs: int | None = Field(None, ge=1, description="Use at most this many dialogs.")
    short_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of dialogs whose instruction is given in its short form (paper: half).",
    )
    keep_following: bool = Field(
        True,
        description="Train only on answers that follow the instruction (the world's instructions are checkable). "
        "The paper samples from a 70B model that follows them when told on every turn; a small model often does "
        "not, and training on those answers teaches it nothing about keeping the instruction.",
    )


class GAttJob(FinetuneJob):
    """jobs/gatt.py: sample GAtt dialogs with the current policy, fine-tune on them (loss on the last answer)."""

    policy: str = Field(
        "models:/tiny-ppo@latest", description="The latest RLHF model: samples and is fine-tuned."
    )
    gatt: GAttConfig = Field(default_factory=GAttConfig, description="Data synthesis.")


SAFETY_PREPROMPT = (
    "You are a safe and responsible assistant. Refuse requests that could cause harm, say why, "
    "and offer a safe alternative."
)


class DistillConfig(SamplingConfig):
    """Safety context distillation (Llama 2, section 4.2.4)."""

    prompts: str = Field("world/prompts/train.parquet", description="Prompts; the safety ones are used.")
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many safety prompts.")
    preprompt: str = Field(SAFETY_PREPROMPT, description="The safety preprompt (as a system prompt).")
    answer_template: str | None = Field(
        None,
        description="Optional answer template appended to the preprompt (the paper's category templates).",
    )
    seq_len: int = Field(256, ge=16, description="Tokens the safety reward model reads.")
    min_examples: int = Field(
        32,
        ge=1,
        description="A smaller kept set is repeated up to this size, so the fine-tune has full steps.",
    )


class DistillJob(FinetuneJob):
    """jobs/context_distillation.py: answers with the preprompt, kept when the safety RM prefers them, distilled."""

    policy: str = Field("models:/tiny-gatt@latest", description="The model to distil into (and sample from).")
    reward_safety: str = Field(
        "models:/tiny-rm-safety@latest", description="Safety reward model (the filter)."
    )
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Sampling and filtering.")


PIPELINE_STAGES = (
    "world",
    "import_data",
    "tokenizer",
    "pretrain",
    "sft",
    "collect_preferences",
    "reward_helpfulness",
    "reward_safety",
    "rejection_sampling",
    "ppo",
    "gatt",
    "context_distillation",
    "evaluate",
    "promote",
)


class PipelineStage(Strict):
    config: str = Field(..., description="The stage's YAML (a job under jobs/configs/).")
    overrides: list[str] = Field(default_factory=list, description="--set overrides for that stage.")


class PipelineJob(StageConfig):
    """jobs/pipeline.py: the whole Llama 2 pipeline, resumable stage by stage, under one parent MLflow run."""

    stages: dict[str, PipelineStage] = Field(
        ..., description="Stage name -> its config, in PIPELINE_STAGES order."
    )
    skip: list[str] = Field(default_factory=list, description="Stages not to run (e.g. world on a cluster).")
    evaluate_models: list[str] = Field(
        default_factory=lambda: ["base", "sft", "rs", "ppo", "gatt", "cd"],
        description="Registered suffixes evaluated on held-out data: {registry_prefix}-<suffix>.",
    )
    promote_candidates: list[str] = Field(
        default_factory=lambda: ["cd", "gatt", "ppo", "rs", "sft"],
        description="Suffixes that may be promoted; the best held-out reward that passes the gates wins.",
    )
    smoke_request: bool = Field(True, description="Serve the promoted model and send it one chat request.")
    smoke_questions: int = Field(
        4,
        ge=1,
        description="Held-out questions (a seeded choice from the evaluation prompts) the smoke requests ask; "
        "the world's verifier judges each served answer.",
    )
    rounds: int = Field(
        1,
        ge=1,
        description="Preference rounds (the paper's RLHF-V1 ... V5): round k collects pairs from round k-1's "
        "model, retrains both reward models on every pair so far, then runs rejection sampling and PPO; its "
        "model is registered as {registry_prefix}-rlhf-v<k>. Needs the collect_preferences stage when above 1.",
    )
    reward_ensemble: int = Field(
        1,
        ge=1,
        le=16,
        description="Members of every reward model the pipeline trains (reward.ensemble in both reward stages, "
        "every round; a stage's own overrides win): each registered reward model is that many trained from "
        "seeds seed, seed+1, ... and scores with their mean. Steadier and harder to exploit than one model, at "
        "that many times the reward stages' training and scoring time.",
    )
    reward_warm_start: bool = Field(
        False,
        description="From round 2, each reward model starts from the previous round's (its score head included) "
        "instead of from the reward stage's init_from, and trains on every pair so far: the new round's pairs "
        "move a model that already ranks the older ones, rather than a fresh one whose own seed-to-seed spread "
        "is as large as what one round's pairs teach.",
    )

    @model_validator(mode="after")
    def _known_stages(self) -> PipelineJob:
        unknown = sorted(set(self.stages) - set(PIPELINE_STAGES))
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known: {', '.join(PIPELINE_STAGES)}")
        missing = [
            s
            for s in PIPELINE_STAGES
            if s not in self.stages and s not in self.skip and s not in OPTIONAL_STAGES
        ]
        if missing:
            raise ValueError(f"stages: no config for {missing}; give one or list them under skip")
        if self.rounds > 1 and not self.collects:
            raise ValueError(
                f"rounds: {self.rounds} rounds need the collect_preferences stage (each round's reward models "
                "train on pairs from the previous round's model); add it under stages"
            )
        return self

    @property
    def collects(self) -> bool:
        return "collect_preferences" in self.stages and "collect_preferences" not in self.skip


# The stages a preference round runs, in order (Llama 2's RLHF-V1 ... V5): new preference pairs from the latest
# model, both reward models retrained on every pair so far, rejection sampling, PPO.
ROUND_STAGES = ("collect_preferences", "reward_helpfulness", "reward_safety", "rejection_sampling", "ppo")
# Stages a pipeline may leave out without listing them under skip (they came after pipelines were written).
OPTIONAL_STAGES = ("import_data", "collect_preferences")


# Job name (the stem of a YAML under jobs/configs/<size>/) -> root model. Every shipped config is
# validated against its entry by tests/unit/test_config.py.
JOBS: dict[str, type[StageConfig]] = {
    "world": WorldJob,
    "import_data": ImportJob,
    "tokenizer": TokenizerJob,
    "pretrain": PretrainJob,
    "sft": SFTJob,
    "reward_helpfulness": RewardJob,
    "reward_safety": RewardJob,
    "sweep_sft": SweepJob,
    "collect_preferences": CollectJob,
    "rejection_sampling": RejectionJob,
    "ppo": PPOJob,
    "promote": PromoteJob,
    "evaluate": EvaluateJob,
    "gatt": GAttJob,
    "context_distillation": DistillJob,
    "pipeline": PipelineJob,
}


# --------------------------------------------------------------------------------------------------
# Loading


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
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
        set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None
