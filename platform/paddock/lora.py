"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through peft, an
optional extra (``pip install -e '.[lora]'``).

With ``model.lora`` set, a supervised stage (SFT, a reward model) trains low-rank adapters on the configured
projections instead of every weight (a reward model's new scalar head trains whole). What is exported and
registered is always a plain checkpoint: at the end of training each adapter is folded into its base weight,
``W + (alpha / r) B A``, so evaluation, serving and the next stages never see peft.
"""

from __future__ import annotations

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
