"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through peft, an
optional extra (``pip install -e '.[lora]'``).

With ``model.lora`` set, a supervised stage (SFT, a reward model) trains low-rank adapters on the configured
projections instead of every weight (a reward model's new scalar head trains whole). What is exported and
registered is always a plain checkpoint: each adapter is folded into its base weight, ``W + (alpha / r) B A``,
as the weights are gathered (``merged_state``; under ZeRO-3 one layer at a time), so evaluation, serving and the
next stages never see peft.

With ``lora`` on a PPO job the learners train the policy's adapters and publish only them (``adapter_shapes``):
the rollout workers hold the same base with the same adapters, sample with the adapters on and compute the
reference log-probs (the KL anchor, the start policy) with them off, so no reference copy of the policy is held
anywhere, and a publication moves the adapters' bytes rather than the model's. (Behind vLLM the workers hold a
plain model: the learners publish the merged weights and a reference scorer holds the start policy.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


class LoraError(ValueError):
    """LoRA asked for where it cannot run: peft missing, or a setting paddock does not support with it."""


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise LoraError(
            "model.lora needs peft, an optional extra: pip install -e '.[lora]' (make test installs it)"
        ) from None


def wrap(model: torch.nn.Module, cfg: Any, scalar: bool) -> torch.nn.Module:
    """``model`` with adapters on ``cfg.target_modules``; only they (and a reward model's head) train."""
    require_peft()
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type=TaskType.SEQ_CLS if scalar else TaskType.CAUSAL_LM,
        modules_to_save=["score"] if scalar else None,
    )
    return get_peft_model(model, config)  # type: ignore[arg-type]


def is_lora(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


PEFT_PREFIX = "base_model.model."


def _adapted(model: torch.nn.Module) -> dict[str, Any]:
    """Plain weight name -> the peft layer that adapts it (one active adapter, the default)."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[f"{name.removeprefix(PEFT_PREFIX)}.weight"] = module
    return out


def is_adapter(name: str) -> bool:
    """Whether a peft model's state entry is an adapter's own tensor (LoRA's A or B)."""
    return ".lora_" in name


def plain_name(name: str) -> str | None:
    """A peft model's state name as the plain model's, or None for entries the plain model does not hold: the
    adapters' own tensors, and a reward head's untrained original (peft keeps it beside the trained copy)."""
    if is_adapter(name) or ".original_module." in name:
        return None
    name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
    return name.replace(".modules_to_save.default.", ".")


def _layer_of(name: str) -> str:
    """The plain weight name of the layer an adapter tensor belongs to: ``...q_proj.lora_B.default.weight`` ->
    ``...q_proj.weight``."""
    return f"{name.removeprefix(PEFT_PREFIX).split('.lora_')[0]}.weight"


@torch.no_grad()
def merged_state(
    model: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain model's state, in its order, from a peft model: each adapted weight as ``W + scale B A`` (a new
    tensor; the model is not changed), everything else as it is. ``tensors``: the model's state as a stream (under
    ZeRO-3, ``engine.gathered_state``, every rank iterating; a base weight is copied while its adapters arrive);
    by default ``model.state_dict()``. A model without adapters yields the stream itself."""
    stream = iter(model.state_dict().items()) if tensors is None else tensors
    if not is_lora(model):
        yield from stream
        return
    adapted = _adapted(model)
    held: dict[str, dict[str, torch.Tensor]] = {}  # a layer's plain weight name -> its base, A and B so far
    for name, tensor in stream:
        plain = plain_name(name)
        if plain is not None and plain not in adapted:
            yield plain, tensor
            continue
        if plain is None and not is_adapter(name):
            continue  # a reward head's untrained original
        key = plain or _layer_of(name)
        part = "base" if plain is not None else ("A" if ".lora_A." in name else "B")
        got = held.setdefault(key, {})
        got[part] = tensor.clone()  # under ZeRO-3 a gathered tensor is released when the gather moves on
        if len(got) == 3:
            del held[key]
            yield key, _fold(got["base"], got["A"], got["B"], adapted[key])
    if held:
        raise ValueError(f"adapted weights without their base or adapters: {sorted(held)[:3]}")


def _fold(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer: Any) -> torch.Tensor:
    """``W + scale B A`` in fp32, in ``W``'s dtype (a new tensor)."""
    delta = (b.float() @ a.float()) * layer.scaling["default"]
    if layer.fan_in_fan_out:
        delta = delta.T
    return (base.float() + delta).to(base.dtype)


class MergedView(Mapping[str, torch.Tensor]):
    """The plain model's state of a peft model that is not partitioned, each adapted weight folded only when read:
    one merged tensor exists at a time while a caller walks it (a digest, a save to the host)."""

    def __init__(self, model: torch.nn.Module):
        self.state = model.state_dict()
        self.adapted = _adapted(model)
        self.names: dict[str, str] = {}  # plain name -> the peft model's, in state order
        for name in self.state:
            plain = plain_name(name)
            if plain is not None:
                self.names.setdefault(plain, name)

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self.state[self.names[key]]
        layer = self.adapted.get(key)
        if layer is None:
            return tensor
        return _fold(tensor, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def merged_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of ``merged_state`` without computing it (also under ZeRO-3)."""
    from paddock.train.engine import state_shapes

    out = []
    for name, shape in state_shapes(model):
        plain = name if not is_lora(model) else plain_name(name)
        if plain is not None:
            out.append((plain, shape))
    return out


def adapter_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of the adapters' own tensors, in state order: what a LoRA policy publishes to rollout
    workers that hold the same base."""
    from paddock.train.engine import state_shapes

    return [(n, shape) for n, shape in state_shapes(model) if is_adapter(n)]


def merged_digest(model: torch.nn.Module) -> str:
    """``models.model_digest`` of the plain model a peft model stands for: the digest of the checkpoint
    ``models.save_checkpoint`` writes of it (one merged tensor at a time)."""
    from paddock.models import model_digest, state_digest

    if not is_lora(model):
        return model_digest(model)
    params = {plain_name(n) for n, _ in model.named_parameters()} - {None}
    every = {plain_name(n) for n, _ in model.named_parameters(remove_duplicate=False)} - {None}
    return state_digest(MergedView(model), params, every)
