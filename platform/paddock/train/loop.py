"""The supervised loop that every Ray Train worker runs: pretraining, SFT and reward models.

Plain PyTorch plus DeepSpeed. Ray touches it at four named points only: ``get_context`` (rank and world
size), ``get_dataset_shard``, ``get_checkpoint`` (resume) and ``report`` (metrics, checkpoints).

Data order is deterministic: every worker reads the same materialised stream of packed rows and keeps its
own slice of each global micro-batch (rank r takes rows ``[r*mb, (r+1)*mb)``). A resumed run skips the
micro-batches already consumed, so a run stopped and resumed ends on the same loss curve as one that was not.
Llama has no dropout, so nothing else is random once the weights are initialised from the seed.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from paddock import lora, tracking
from paddock.config import ModelConfig, OptimConfig, TrainConfig
from paddock.data.schemas import RATINGS, SAFETY_BINS
from paddock.data.tokenize import IGNORE, PACKED_COLUMNS
from paddock.metrics import record_train
from paddock.models import (
    build_causal_lm,
    inference_dtype,
    load_causal_lm,
    load_scalar_model,
    right_padded_mask,
    set_gradient_checkpointing,
)
from paddock.rlhf.reward import margin_ranking_loss
from paddock.train import engine as ds

Objective = Literal["lm", "reward"]
REWARD_KEYS = ("chosen_ids", "rejected_ids", "margin", "rating", "safety_bin")  # a preference batch's columns


class LoopSpec(BaseModel):
    """Everything a worker needs, validated again on the worker side (typed across the process boundary)."""

    model_config = ConfigDict(extra="forbid")

    objective: Objective
    model: ModelConfig
    init_from: str | None  # ``cluster.actor_model``: resolved on each worker's node (``build_model``)
    tokenizer_files: dict[str, str]  # ``tokenizer.tokenizer_files``: saved with the final model
    vocab_size: int
    bos_token_id: int | None  # the tokenizer's, written into a new model's config
    eos_token_id: int
    seq_len: int
    optim: OptimConfig
    train: TrainConfig
    total_steps: int
    n_params: int
    seed: int


# --------------------------------------------------------------------------------------------------
# Small pieces, each usable on its own


def build_model(spec: LoopSpec) -> torch.nn.Module:
    """The stage's model; call it inside ``engine.partitioned`` so that ZeRO-3 creates it partitioned."""
    attn = spec.train.attn_implementation
    model: torch.nn.Module
    if spec.objective == "reward":
        if spec.init_from is None:
            raise ValueError("a reward model needs model.init_from")
        # From a causal LM the scalar head is new, drawn from torch's RNG: seed it, or every run's RM differs.
        torch.manual_seed(spec.seed)
        model = load_scalar_model(tracking.resolve_model(spec.init_from), attn=attn)
    elif spec.init_from is not None:
        model = load_causal_lm(tracking.resolve_model(spec.init_from), attn=attn)
    else:
        return build_causal_lm(
            spec.model.shape,
            spec.vocab_size,
            spec.seq_len,
            seed=spec.seed,
            attn=attn,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
        )
    if spec.model.lora is not None:
        torch.manual_seed(spec.seed)  # the adapters' A matrices are drawn from torch's RNG
        model = lora.wrap(model, spec.model.lora, scalar=spec.objective == "reward")
    return model


def lm_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """The model over packed windows: position ids restart at each example, which keeps examples apart in
    attention (no cache, so transformers reads them as packed sequences). Shapes: (batch, seq)."""
    positions = batch.get("position_ids")  # absent for unpacked rows: 0 .. seq-1
    return model(
        input_ids=batch["input_ids"].long(),
        position_ids=None if positions is None else positions.long(),
        use_cache=False,
        **kwargs,
    )


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE. Shapes: (batch, seq)."""
    return lm_forward(model, batch, labels=batch["labels"].long()).loss


def pair_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of chosen and rejected answers in one forward pass. Returns two (batch,) tensors."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]]).long()
    scores = model(input_ids=ids, attention_mask=right_padded_mask(ids)).logits.squeeze(-1).float()
    n = batch["chosen_ids"].shape[0]
    return scores[:n], scores[n:]


def reward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    r_chosen, r_rejected = pair_scores(model, batch)
    return margin_ranking_loss(r_chosen, r_rejected, batch["margin"].float())


def loss_fn(objective: Objective, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return lm_loss(model, batch) if objective == "lm" else reward_loss(model, batch)


def matmul_flops(n: int = 512, reps: int = 8) -> float:
    """Measured fp32 matmul FLOP/s of this process: the CPU 'peak' that MFU is taken against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def micro_batches(
    shard: Any,
    keys: tuple[str, ...],
    mb: int,
    rank: int,
    world: int,
    skip: int,
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's slice of every global micro-batch on ``device``, epoch after epoch, skipping the first
    ``skip``."""
    seen = 0
    while True:
        empty = True
        for batch in shard.iter_torch_batches(batch_size=mb * world, drop_last=True):
            empty = False
            seen += 1
            if seen <= skip:
                continue
            yield {k: batch[k][rank * mb : (rank + 1) * mb].to(device) for k in keys}
        if empty:
            raise ValueError(f"the training data has fewer than {mb * world} rows: one global micro-batch")


def collective_device() -> torch.device:
    """Where a collective's tensors must be: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_mean(value: float, world: int) -> float:
    if world == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.item() / world


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a small CPU tensor over the ranks, returned on the CPU."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(collective_device())
        dist.all_reduce(t)
    return t.cpu()


@torch.no_grad()
def evaluate(
    objective: Objective,
    model: torch.nn.Module,
    shard: Any,
    keys: tuple[str, ...],
    mb: int,
    rank: int,
    world: int,
    max_batches: int | None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Eval metrics over the test split, each rank scoring its slice, sums all-reduced (works under ZeRO-3)."""
    model.eval()
    n_stats = 2 if objective == "lm" else PAIR_STATS
    stats = torch.zeros(n_stats, dtype=torch.float64)
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=mb * world, drop_last=False)):
        if max_batches is not None and i >= max_batches:
            break
        part = {k: batch[k][rank * mb : (rank + 1) * mb].to(device) for k in keys}
        if part[keys[0]].shape[0] == 0:
            part = {k: batch[k][:1].to(device) for k in keys}  # in lockstep with the other ranks; not counted
            _forward_stats(objective, model, part)
            continue
        stats += _forward_stats(objective, model, part)
    model.train()
    stats = all_sum(stats)
    if objective == "lm":
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    return pair_metrics(stats)


def pair_metrics(stats: torch.Tensor) -> dict[str, float]:
    """``eval/accuracy`` overall and by rating and safety bin, and ``eval/margin`` (the chosen answer's logit less
    the rejected one's, on average), from ``pair_stats`` summed over the test pairs."""
    pairs = stats[1].clamp(min=1)
    out = {
        "eval/accuracy": (stats[0] / pairs).item(),
        "eval/pairs": stats[1].item(),
        "eval/margin": (stats[-1] / pairs).item(),
    }
    for j, name in enumerate([*RATINGS, *SAFETY_BINS]):
        correct, n = stats[2 + 2 * j], stats[3 + 2 * j]
        if n > 0:
            out[f"eval/accuracy/{name}"] = (correct / n).item()
    return out


# ``pair_stats``' length: pairs right and seen, overall, by rating and by safety bin; then the margins' sum
PAIR_STATS = 2 * (1 + len(RATINGS) + len(SAFETY_BINS)) + 1


def pair_stats(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Pairs ranked right and pairs seen: over the batch, then by rating and by safety bin; last, the logit
    margins' sum (``pair_metrics``)."""
    correct = (r_chosen > r_rejected).double().cpu()
    stats = [correct.sum().item(), float(correct.numel())]
    for column, names in (("rating", RATINGS), ("safety_bin", SAFETY_BINS)):
        for j in range(len(names)):
            m = batch[column].cpu() == j
            stats += [correct[m].sum().item(), float(m.sum().item())]
    stats.append((r_chosen.double() - r_rejected.double()).sum().item())
    return torch.tensor(stats, dtype=torch.float64)


@torch.no_grad()
def ensemble_eval(
    members: list[Any], batches: list[dict[str, torch.Tensor]], use_gpu: bool
) -> dict[str, float]:
    """``eval/*`` metrics of a reward ensemble, the mean of its members' logits, on the test pairs ``batches``.

    One member is loaded at a time (a checkpoint directory, or a Ray Train ``Checkpoint`` holding ``hf/``), in
    its inference dtype on the GPU when ``use_gpu`` (bf16) and fp32 on the CPU, scores every pair and is freed
    before the next: the memory of one model, not of k. Each pair's logits are summed in fp64 meanwhile.
    """
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    dtype = inference_dtype("auto", device.type == "cuda")
    sums = [torch.zeros(2, len(b["chosen_ids"]), dtype=torch.float64) for b in batches]
    for member in members:
        local = isinstance(member, (str, Path))  # else a Ray Train checkpoint, its model under hf/
        with nullcontext(member) if local else member.as_directory() as d:
            model: torch.nn.Module = load_scalar_model(Path(d) if local else Path(d) / "hf", dtype)
        model.to(device).eval()
        for total, b in zip(sums, batches, strict=True):
            ids = {k: b[k].to(device) for k in ("chosen_ids", "rejected_ids")}
            total += torch.stack(pair_scores(model, ids)).double().cpu()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    k = len(members)
    stats = [pair_stats(t[0] / k, t[1] / k, b) for t, b in zip(sums, batches, strict=True)]
    return pair_metrics(torch.stack(stats).sum(0))


def _forward_stats(
    objective: Objective, model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    if objective == "lm":
        labels = batch["labels"].long()
        logits = lm_forward(model, batch).logits.float()
        target = labels[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        return torch.tensor([loss.item(), (target != IGNORE).sum().item()], dtype=torch.float64)
    return pair_stats(*pair_scores(model, batch), batch)


# --------------------------------------------------------------------------------------------------
# The loop


def quiet_worker() -> None:
    """paddock reports progress itself: turn off Ray Data's bars and Ray Train's per-report INFO line here, and
    the FutureWarning DeepSpeed's ZeRO-2 triggers on every step (its call of a renamed torch collective)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if "train/v2/_internal/execution/context" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    # local mode (the loop in the driver) logs every report, with its records, at INFO
    logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)


def resume(engine: Any, checkpoint: Any, world: int, rank: int) -> int:
    """Load the newest whole DeepSpeed checkpoint of the run and return its step: the one Ray Train hands over,
    else (cut off while saving, a file missing or short, DeepSpeed's ``latest`` gone) the newest older one kept
    beside it, with a warning naming what was wrong; 0 when none is whole. Every rank judges the same files, so
    the ranks agree without talking."""
    for n, candidate in enumerate(ds.resume_candidates(checkpoint)):
        with candidate.as_directory() as d:
            problem = ds.checkpoint_problem(Path(d) / "ds", world)
            if problem is None:
                _, client = engine.load_checkpoint(str(Path(d) / "ds"))
                if n and rank == 0:
                    print(f"[paddock] resumed from an older checkpoint, {candidate.path}", flush=True)
                return int(client["step"])
            if rank == 0:
                print(f"[paddock] warning: cannot resume from {candidate.path}: {problem}", flush=True)
    if rank == 0:
        print(
            "[paddock] warning: no whole checkpoint to resume from; training starts again at step 0",
            flush=True,
        )
    return 0


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (``TorchTrainer(train_worker, train_loop_config=...)``)."""
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    spec = LoopSpec.model_validate(config["spec"])
    quiet_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = spec.train
    local = tc.num_workers == 0  # in the driver's fit thread: its torch threads are the machine's
    ds.setup_worker(tc, local)

    driver = config.get("reports")  # the driver's queue (a stage run); a sweep's trials report to Tune only

    def report(metrics: dict[str, Any], checkpoint: Checkpoint | None = None) -> None:
        if driver is not None and rank == 0:
            driver.put(metrics)
        ray.train.report(metrics, checkpoint=checkpoint)

    with ds.partitioned(tc, spec.optim, world):
        model = build_model(spec)
    set_gradient_checkpointing(model, tc.gradient_checkpointing)
    engine, lr_sched = ds.initialize(model, spec.optim, tc, world, spec.total_steps)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # a final export handed over (an attempt that finished training but died before registering) has no
        # DeepSpeed state: resume passes over it like any unusable checkpoint, to the last one before it
        start = resume(engine, checkpoint, world, rank)

    keys = PACKED_COLUMNS if spec.objective == "lm" else REWARD_KEYS
    batches = micro_batches(
        ray.train.get_dataset_shard("train"),
        keys,
        tc.micro_batch_size,
        rank,
        world,
        skip=start * tc.grad_accum,
        device=engine.device,
    )
    eval_shard = ray.train.get_dataset_shard("eval")
    peak = tc.peak_flops if tc.peak_flops else matmul_flops()
    seqs_per_step = tc.micro_batch_size * tc.grad_accum * world * (1 if spec.objective == "lm" else 2)
    tokens_per_step = seqs_per_step * spec.seq_len

    # Every step is recorded; records travel to the driver in batches, because a Ray Train report blocks
    # until the controller polls (every 2 s by default) once one is pending.
    pending: list[dict[str, float]] = []
    for step in range(start, spec.total_steps):
        t0 = time.perf_counter()
        lr = lr_sched.get_last_lr()[0]
        losses = []
        for _ in range(tc.grad_accum):
            loss = loss_fn(spec.objective, engine, next(batches))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        step_time = time.perf_counter() - t0
        done = step + 1
        grad_norm = engine.get_global_grad_norm()
        tokens_per_s = tokens_per_step / step_time
        record: dict[str, float] = {
            "step": done,
            "train/loss": all_mean(sum(losses) / len(losses), world),
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/tokens_per_s": tokens_per_s,
            "train/mfu": 6 * spec.n_params * tokens_per_s / (peak * world),
            "train/step_time_s": step_time,
        }
        last = done == spec.total_steps
        if done % tc.eval_every == 0 or last:
            record |= evaluate(
                spec.objective,
                engine,
                eval_shard,
                keys,
                tc.micro_batch_size,
                rank,
                world,
                tc.eval_batches,
                engine.device,
            )
        pending.append(record)
        if rank == 0:
            record_train(record, spec.objective, ctx.get_experiment_name())
        metrics: dict[str, Any] = {**record, "records": pending}
        if last:
            # Ray Train persists the reported directory; in local mode the driver copies the model out of it
            # and removes it, so it must outlive this function.
            tmp = Path(tempfile.mkdtemp(prefix="paddock-final-"))
            try:
                ds.export_hf(engine.module, tmp / "hf", spec.tokenizer_files, rank)
                if rank == 0:
                    (tmp / "state.json").write_text(json.dumps({"step": done, "final": True}))
                report(metrics, Checkpoint.from_directory(str(tmp)) if rank == 0 else None)
            finally:
                if not local:
                    shutil.rmtree(tmp, ignore_errors=True)
        elif done % tc.checkpoint_every == 0 and not local:  # nothing restarts a local run: no resume points
            with tempfile.TemporaryDirectory() as ckpt:
                engine.save_checkpoint(str(Path(ckpt) / "ds"), tag=f"step{done}", client_state={"step": done})
                ds.write_manifest(Path(ckpt) / "ds", rank)
                report(metrics, Checkpoint.from_directory(ckpt))
        elif done % tc.log_every == 0:
            report(metrics)
        else:
            continue
        pending = []
    if local:  # the driver lives on: leave no process group, and none of DeepSpeed's handles on it, behind
        deepspeed.comm.destroy_process_group()
