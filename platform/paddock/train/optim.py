"""AdamW, the warmup + cosine schedule, and the one function that turns a paddock config into DeepSpeed's.

Schedule (Llama 2, section 2.2): linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of the
peak (10%) at the last step. Reward models warm up for 3% of their steps, at least 5 (LLAMA2_SPEC.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from paddock.config import OptimConfig, TrainConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_ratio is not None:
        return min(total_steps, max(cfg.min_warmup_steps, math.ceil(cfg.warmup_ratio * total_steps)))
    return min(cfg.warmup_steps, total_steps)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR for optimiser step ``step`` (0-based) of ``total_steps``."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warm - 1)
    progress = min(1.0, (step - warm) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only: norms' gains are not decayed (as in Meta's and most Llama trainers)."""

    def matrix(p: torch.nn.Parameter) -> bool:  # a ZeRO-3 partition is flat: its full shape is ds_shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # LoRA trains matrices only: an empty group would be dropped by DeepSpeed and leave the schedule one short
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))


def use_bf16(train: TrainConfig) -> bool:
    return train.precision == "bf16" or (train.precision == "auto" and train.use_gpu)


def deepspeed_config(train: TrainConfig, optim: OptimConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed settings for a stage: ZeRO stage and offload, batch sizes, clipping, precision.

    The optimiser and schedule are paddock's own (passed to ``deepspeed.initialize``), so they behave the
    same at every ZeRO stage and on CPU, where DeepSpeed's fused optimisers are not built.
    """
    zero: dict[str, Any] = {
        "stage": train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": train.use_gpu,
    }
    if train.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(train)},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def skip_cpu_shm_comm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op the first time a process group starts
    (2-3 minutes on a 2-core machine, once per fresh install). Only its inference all-reduce uses that op;
    training collectives go through torch.distributed (gloo), so paddock marks the op unavailable and skips
    the build. Call before ``deepspeed.initialize`` in CPU workers."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
