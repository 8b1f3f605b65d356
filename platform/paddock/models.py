"""Llama 2 shapes, building models from a shape, and loading local checkpoints (safetensors only).

Architecture (LLAMA2_SPEC.md): pre-norm RMSNorm (eps 1e-5), SwiGLU, rotary embeddings (theta 10000), no
biases, untied embedding and head. FFN width follows Meta's reference code:
``multiple_of * ceil(int(ffn_mult * int(2 * 4 * dim / 3)) / multiple_of)``.

Reward and value models are the same backbone with a scalar head (``LlamaForSequenceClassification``,
one label), initialised from a causal LM checkpoint: the head is new, the LM head is dropped.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

# The value paddock pads batches with. Llama has no pad token; with paddock's tokenizers id 0 is unk, which a
# byte-fallback tokenizer never emits, and with others (Llama 3's id 0 is "!") it can be a real token: attention
# masks therefore come from lengths (``right_padded_mask``), never from comparing ids with it, and every scored
# sequence ends with EOS, so the reward head's "last token that is not padding" is the EOS.
PAD_ID = 0


def right_padded_mask(ids: torch.Tensor, pad: int = PAD_ID) -> torch.Tensor:
    """The attention mask of right-padded rows that each end with a non-pad token (EOS): every position up to
    the row's last non-pad token, whatever ids sit before it. Shape (batch, seq), long."""
    positions = torch.arange(ids.shape[-1], device=ids.device)
    last = (positions * (ids != pad)).argmax(-1, keepdim=True)
    return (positions <= last).long()


@dataclass(frozen=True)
class Shape:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    multiple_of: int
    ffn_mult: float = 1.0
    vocab_size: int = 32000
    max_seq_len: int = 4096

    @property
    def ffn_dim(self) -> int:
        hidden = int(self.ffn_mult * int(2 * 4 * self.dim / 3))
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


SHAPES: dict[str, Shape] = {
    # Released sizes (Touvron et al. 2023, Table 1; Meta's params.json). 34B follows Code Llama 34B.
    "7b": Shape(layers=32, dim=4096, heads=32, kv_heads=32, multiple_of=256),
    "13b": Shape(layers=40, dim=5120, heads=40, kv_heads=40, multiple_of=256),
    "34b": Shape(layers=48, dim=8192, heads=64, kv_heads=8, multiple_of=256),
    "70b": Shape(layers=80, dim=8192, heads=64, kv_heads=8, multiple_of=4096, ffn_mult=1.3),
    # One GPU: ~1.1B parameters with a 32k vocabulary (TinyLlama's depth and width, full attention heads),
    # for benchmarks/gpu_mfu.py and single-GPU trials of the pipeline.
    "1b": Shape(layers=22, dim=2048, heads=16, kv_heads=16, multiple_of=256),
    # CPU shapes: tiny trains in minutes on 2 cores, small is for benchmarks (~25M with a 4k vocabulary).
    "tiny": Shape(layers=4, dim=128, heads=4, kv_heads=4, multiple_of=32, vocab_size=4000, max_seq_len=512),
    "small": Shape(layers=6, dim=512, heads=8, kv_heads=8, multiple_of=64, vocab_size=4000, max_seq_len=1024),
}


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded: missing, not safetensors, or not a Llama model."""


def llama_config(
    shape: str | Shape,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    bos_token_id: int | None = 1,
    eos_token_id: int = 2,
) -> LlamaConfig:
    """A Llama config of ``shape``; the special ids are the tokenizer's (Llama 2's 1 and 2 by default)."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    return LlamaConfig(
        vocab_size=vocab_size or s.vocab_size,
        hidden_size=s.dim,
        intermediate_size=s.ffn_dim,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=max_seq_len or s.max_seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )


def count_parameters(
    shape: str | Shape | LlamaConfig, vocab_size: int | None = None, scalar: bool = False
) -> int:
    """Parameters of a causal LM (or, with ``scalar``, a reward/value model), built on the meta device."""
    config = shape if isinstance(shape, LlamaConfig) else llama_config(shape, vocab_size)
    cls = LlamaForSequenceClassification if scalar else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(config) if not scalar else cls(LlamaConfig(**{**config.to_dict(), "num_labels": 1}))
    return sum(p.numel() for p in model.parameters())


AttnImpl = str  # "auto", "sdpa", "eager" or "flash_attention_2"


def attn_implementation(name: AttnImpl = "auto", on_gpu: bool | None = None) -> str:
    """The attention kernel a model is built with: ``auto`` is FlashAttention-2 on a GPU where the
    ``flash_attn`` package is installed, else PyTorch's SDPA. Both keep packed examples apart when the position
    ids restart at each example (varlen kernels on GPU, a block-diagonal mask with SDPA)."""
    if name != "auto":
        if name == "flash_attention_2" and not _has_flash_attn():
            raise ValueError("attn_implementation flash_attention_2 needs the flash_attn package (GPU only)")
        return name
    gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    return "flash_attention_2" if gpu and _has_flash_attn() else "sdpa"


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def build_causal_lm(
    shape: str,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    seed: int = 0,
    attn: AttnImpl = "auto",
    bos_token_id: int | None = 1,
    eos_token_id: int = 2,
) -> LlamaForCausalLM:
    """A freshly initialised Llama causal LM; the seed makes the weights reproducible. The special ids are the
    tokenizer's (Llama 2's by default): they go into the config, which later stages check the tokenizer against.

    Built through ``_from_config``, so under an active ZeRO-3 configuration (``paddock.train.engine``) the
    parameters are created partitioned across the ranks, never whole on one."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; valid: {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    config = llama_config(shape, vocab_size, max_seq_len, bos_token_id, eos_token_id)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation(attn))


def check_checkpoint(path: str | Path) -> Path:
    """A local Hugging Face directory with config.json and safetensors weights, or ModelLoadError."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"checkpoint directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} has no config.json; is it a Hugging Face checkpoint directory?")
    if not any(p.glob("*.safetensors")):
        found = sorted(x.name for x in p.glob("*.bin")) or sorted(x.name for x in p.iterdir())[:5]
        raise ModelLoadError(
            f"{p} has no *.safetensors weights (found {found}); paddock loads safetensors only, "
            "convert pickled weights with transformers' save_pretrained(safe_serialization=True)"
        )
    index = p / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ModelLoadError(f"{p} is missing weight shards listed in its index: {', '.join(missing)}")
    return p


def set_gradient_checkpointing(model: torch.nn.Module, flag: bool | None) -> bool:
    """Recompute each decoder layer's activations in the backward pass (``flag``; None: for models of 1B
    parameters and up). Non-reentrant checkpointing, so it composes with DeepSpeed and frozen inputs. Returns
    whether it is on."""
    size = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: the full count
    on = size >= 1e9 if flag is None else flag
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
        model.config.use_cache = False  # type: ignore[union-attr]
    return on


def inference_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """The torch dtype of an inference copy: ``auto`` is bf16 on a GPU and fp32 on the CPU."""
    if name == "auto":
        name = "bf16" if on_gpu else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def load_causal_lm(
    path: str | Path, dtype: torch.dtype = torch.float32, attn: AttnImpl = "auto"
) -> LlamaForCausalLM:
    """A causal LM from a local safetensors checkpoint (created partitioned under an active ZeRO-3 config)."""
    p = check_checkpoint(path)
    return LlamaForCausalLM.from_pretrained(
        str(p),
        dtype=dtype,
        attn_implementation=attn_implementation(attn),
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )


def load_scalar_model(
    path: str | Path, dtype: torch.dtype = torch.float32, attn: AttnImpl = "auto"
) -> LlamaForSequenceClassification:
    """A reward or value model: from a reward checkpoint, or from a causal LM with a new scalar head."""
    p = check_checkpoint(path)
    model = LlamaForSequenceClassification.from_pretrained(
        str(p),
        num_labels=1,
        pad_token_id=PAD_ID,
        dtype=dtype,
        attn_implementation=attn_implementation(attn),
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    model.config.pad_token_id = PAD_ID
    return model


# --------------------------------------------------------------------------------------------------
# Reward-model ensembles: one checkpoint directory, several members

# A reward stage with ``reward.ensemble: k`` writes member 0 as a plain checkpoint at the top of the directory
# (what a value model starts from, and what anything that reads one model reads) and members 1 .. k-1 under
# ``members/<i>``; this file lists them. Scorers load them all and score with the mean (``load_reward_model``).
ENSEMBLE_FILE = "ensemble.json"


def ensemble_members(path: str | Path) -> list[Path]:
    """The member checkpoints of a reward model directory: ``[path]`` for a single model."""
    import json

    p = Path(path)
    manifest = p / ENSEMBLE_FILE
    if not manifest.is_file():
        return [p]
    members = json.loads(manifest.read_text())["members"]
    return [p / m for m in members]


def write_ensemble(path: str | Path, members: int) -> None:
    """Write the manifest of a directory holding ``members`` checkpoints (member 0 at the top)."""
    import json

    listed = [".", *(f"members/{i}" for i in range(1, members))]
    (Path(path) / ENSEMBLE_FILE).write_text(json.dumps({"members": listed, "combine": "mean_logit"}) + "\n")


class RewardEnsemble(torch.nn.Module):
    """Reward models trained alike from different seeds, scoring as one: the mean of their logits (the score
    before the sigmoid), so that a pair is ordered by the members' average margin. An ensemble's mean is steadier
    than any one member, whose training seed alone moves its ranking of a policy's answers by several points on
    the tiny world (README, issue 22), and harder for a policy to exploit (Coste et al. 2023, "Reward Model
    Ensembles Help Mitigate Overoptimization"). Called as a ``LlamaForSequenceClassification`` is."""

    def __init__(self, members: list[LlamaForSequenceClassification]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        from types import SimpleNamespace

        logits = torch.stack(
            [m(input_ids=input_ids, attention_mask=attention_mask).logits.float() for m in self.members]
        )
        return SimpleNamespace(logits=logits.mean(0))


def load_reward_model(
    path: str | Path, dtype: torch.dtype = torch.float32, attn: AttnImpl = "auto"
) -> torch.nn.Module:
    """A reward model for scoring: the scalar model, or a ``RewardEnsemble`` of every member of an ensemble
    directory. (A value model starts from member 0 alone: ``load_scalar_model``.)"""
    members = ensemble_members(path)
    if len(members) == 1:
        return load_scalar_model(path, dtype, attn)
    return RewardEnsemble([load_scalar_model(m, dtype, attn) for m in members])


# --------------------------------------------------------------------------------------------------
# Weight digests: what is registered is what was measured


def _digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of the weights a checkpoint of ``model`` would hold: its parameters, a tied one
    once under the name transformers saves it by, and its persistent buffers; by name, dtype, shape and bytes.

    Equals ``checkpoint_digest`` of the directory ``save_pretrained`` writes, so a digest taken where weights are
    evaluated can be checked where they are registered. One tensor at a time is copied to the host."""
    params = {n for n, _ in model.named_parameters()}  # shared tensors once, under their first name
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return state_digest(model.state_dict(), params, every)


def state_digest(state: Mapping[str, torch.Tensor], params: set[Any], every: set[Any]) -> str:
    """``model_digest`` of a state dict: ``params`` names each parameter once (shared ones by their first name),
    ``every`` every name a parameter goes by; entries that are no parameter (buffers) count too."""
    keep = sorted(k for k in state if k in params or k not in every)
    return _digest((k, state[k]) for k in keep)


def checkpoint_digest(path: str | Path) -> str:
    """The digest of a safetensors checkpoint directory (all shards), read one tensor at a time; of a reward
    ensemble's, every member's tensors, those of member i > 0 named ``members/<i>/<name>``."""
    from safetensors import safe_open

    root = Path(path)
    where: dict[str, tuple[Path, str]] = {}
    for member in ensemble_members(root):
        p = check_checkpoint(member)
        prefix = "" if p == root else f"{p.relative_to(root).as_posix()}/"
        for file in sorted(p.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()  # a safetensors file is not iterable
                where |= {f"{prefix}{k}": (file, k) for k in names}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(where):
            file, key = where[name]
            with safe_open(str(file), framework="pt") as f:
                yield name, f.get_tensor(key)

    return _digest(tensors())


def save_checkpoint(
    model: torch.nn.Module, tok: Any, out: str | Path, files: Mapping[str, str] | None = None
) -> str:
    """Write ``model`` (safetensors), its tokenizer and small text ``files`` to ``out`` through a temporary
    sibling renamed into place, so ``out`` holds either the old checkpoint or the whole new one. Returns the
    written checkpoint's digest, checked against the model's: a mismatch raises and leaves ``out`` untouched."""
    from paddock import lora

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if lora.is_lora(model):  # a base with adapters (a LoRA policy's rollout worker): saved merged, plain
            # one merged tensor on the device at a time; the host holds the state save_pretrained writes. A weight
            # the model holds under two names (tied) stays one tensor, as save_pretrained and the digest expect.
            view = lora.MergedView(model)
            state: dict[str, torch.Tensor] = {}
            moved: dict[int, torch.Tensor] = {}
            for k, t in view.items():
                if k in view.adapted:  # a new tensor each, freed once copied: its address may come back
                    state[k] = t.to("cpu")
                else:
                    if t.data_ptr() not in moved:  # copied once, however many names it has
                        moved[t.data_ptr()] = t.to("cpu")
                    state[k] = moved[t.data_ptr()]
            model.get_base_model().save_pretrained(str(tmp), state_dict=state, safe_serialization=True)  # type: ignore[operator]
            expected = lora.merged_digest(model)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[operator]
            expected = model_digest(model)
        tok.save_pretrained(str(tmp))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        digest = checkpoint_digest(tmp)
        if digest != expected:
            raise RuntimeError(
                f"{out}: the written weights' digest {digest} differs from the model's {expected}"
            )
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return digest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
