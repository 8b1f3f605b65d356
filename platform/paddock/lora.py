"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through peft, an
optional extra (``pip install -e '.[lora]'``).

With ``model.lora`` set, a supervised stage (SFT, a reward model) trains low-rank adapters on the configured
projections instead of every weight (a reward model's new scalar head trains whole). What is exported and
registered is always a plain checkpoint: at the end of training each adapter is folded into its base weight,
``W + (alpha / r) B A``, so evaluation, serving and the next stages never see peft. With ``lora`` on a PPO job the
learners train the policy's adapters and publish ``merged_state``: the plain model's tensors, each adapted weight
folded on the fly without touching the training copy, so the rollout workers load them like any publication.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with every adapter folded into its base weight (in place: call it when training is over).
    A model without adapters is returned as it is."""
    if not is_lora(model):
        return model
    return model.merge_and_unload()  # type: ignore[operator,no-any-return]


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


def plain_name(name: str) -> str | None:
    """A peft model's state name as the plain model's, or None for the adapters' own tensors."""
    if ".lora_" in name:
        return None
    name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
    return name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


@torch.no_grad()
def merged_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain model's state, in its order, from a peft model: each adapted weight as ``W + scale B A`` (a new
    tensor; the model is not changed), everything else as it is. A model without adapters yields its own state."""
    if not is_lora(model):
        yield from model.state_dict().items()
        return
    adapted = _adapted(model)
    seen = set()
    for name, tensor in model.state_dict().items():
        plain = plain_name(name)
        if plain is None or plain in seen:
            continue
        seen.add(plain)
        layer = adapted.get(plain)
        if layer is not None and ".base_layer." in name:
            delta = layer.get_delta_weight("default")  # type: ignore[operator]
            yield plain, tensor + delta.to(tensor.dtype)
        else:
            yield plain, tensor


def merged_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of ``merged_state`` without computing it."""
    if not is_lora(model):
        return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    out, seen = [], set()
    for name, tensor in model.state_dict().items():
        plain = plain_name(name)
        if plain is not None and plain not in seen:
            seen.add(plain)
            out.append((plain, tuple(tensor.shape)))
    return out
