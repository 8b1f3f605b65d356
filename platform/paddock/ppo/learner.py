"""PPO learners: the Ray Train workers that hold the policy and the value model and take the optimiser steps.

Each iteration, rank 0 takes one batch of experience from the rollout buffer (refs only) and leaves the refs on
the hub; every rank reads the rows from the object store, shuffles them with the iteration's seed, and keeps its
slice of each mini-batch: one optimiser step per mini-batch for the policy (clipped surrogate) and for the value
model (clipped value loss). Then every rank joins the gather of the weights, one layer at a time under ZeRO-3,
and rank 0 puts them in buckets in the object store and publishes the buckets' refs as one version.
Checkpoints hold both DeepSpeed engines, the iteration and the driver's reward statistics; a restarted worker
group resumes from the newest one.

Ray touches this loop at named points only: ``get_context``, ``get_checkpoint``, ``report`` and the two actors
(hub and buffer) it finds by name.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from paddock.config import OptimConfig, PPOConfig, TrainConfig
from paddock.models import load_causal_lm, load_scalar_model, set_gradient_checkpointing
from paddock.ppo.experience import learner_batch
from paddock.rlhf.ppo import entropy_from_logprobs, ppo_policy_loss, value_loss
from paddock.rollout.core import TokenValues, pick_logprobs, response_logits
from paddock.train import engine as ds
from paddock.train.loop import all_sum, collective_device, quiet_worker


class LearnerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ppo: PPOConfig
    optim: OptimConfig
    value_optim: OptimConfig
    train: TrainConfig
    policy_dir: str
    value_dir: str
    tokenizer_dir: str
    hub: str
    buffer: str
    namespace: str
    seed: int


def _broadcast_flag(flag: bool) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], device=collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


class Learner:
    """One rank's policy and value engines, and the steps of an iteration."""

    def __init__(self, spec: LearnerSpec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        ppo, tc = spec.ppo, spec.train
        per_rank = ppo.mini_batch // world
        self.micro = tc.micro_batch_size
        self.grad_accum = per_rank // self.micro
        tc = tc.model_copy(update={"grad_accum": self.grad_accum})
        steps = ppo.iterations * ppo.epochs * (ppo.batch_prompts // ppo.mini_batch)
        attn = tc.attn_implementation
        with ds.partitioned(tc, spec.optim, world):
            policy = load_causal_lm(spec.policy_dir, attn=attn)
            scalar = load_scalar_model(spec.value_dir, attn=attn)
        set_gradient_checkpointing(policy, tc.gradient_checkpointing)
        set_gradient_checkpointing(scalar, tc.gradient_checkpointing)
        self.policy, _ = ds.initialize(policy, spec.optim, tc, world, steps)
        self.value, _ = ds.initialize(TokenValues(scalar), spec.value_optim, tc, world, steps)

    def publish_weights(self, put: Any, bucket_bytes: int) -> tuple[list[Any], list[Any], int]:
        """(policy buckets, value buckets, policy bytes) put with ``put`` at rank 0, gathered one layer at a
        time in the learners' dtype; every rank must call it."""
        policy, nbytes = ds.weight_buckets(self.policy.module, self.rank, put, bucket_bytes)
        value, _ = ds.weight_buckets(self.value.module, self.rank, put, bucket_bytes)
        return policy, value, nbytes

    def train_iteration(self, rows: list[dict[str, Any]], iteration: int) -> dict[str, float]:
        """One PPO update over the iteration's rows (every rank holds them all and keeps its slices)."""
        ppo = self.spec.ppo
        per_rank = ppo.mini_batch // self.world
        sums: dict[str, float] = {}
        steps, tokens = 0, 0
        start = time.perf_counter()
        for epoch in range(ppo.epochs):
            g = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + iteration * 101 + epoch)
            order = torch.randperm(len(rows), generator=g).tolist()
            for m in range(0, len(order) - ppo.mini_batch + 1, ppo.mini_batch):
                mine = order[m + self.rank * per_rank : m + (self.rank + 1) * per_rank]
                for k in range(0, per_rank, self.micro):
                    batch = learner_batch([rows[i] for i in mine[k : k + self.micro]]).to(self.policy.device)
                    stats = self._micro_step(batch)
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
                    steps += 1
                    tokens += batch.tokens
        elapsed = time.perf_counter() - start
        # Every rank's means in one all-reduce: per-token stats, tokens/s (summed over ranks below), seconds.
        keys = sorted(sums)
        local = [sums[k] / max(1, steps) for k in keys] + [tokens / elapsed, elapsed]
        mean = (all_sum(torch.tensor(local, dtype=torch.float64)) / self.world).tolist()
        out = dict(zip(keys, mean, strict=False))
        out["ppo/train_tokens_per_s"] = mean[-2] * self.world
        out["ppo/train_s"] = mean[-1]
        out["ppo/optimizer_steps"] = float(ppo.epochs * (len(rows) // ppo.mini_batch))
        return out

    def _micro_step(self, b: Any) -> dict[str, float]:
        ppo = self.spec.ppo
        mask = b.packed.response_mask
        # One log-softmax over the vocabulary serves the loss and the entropy.
        logp_all = torch.log_softmax(response_logits(self.policy, b.packed, ppo.temperature), dim=-1)
        logp = pick_logprobs(logp_all, b.packed)
        loss, stats = ppo_policy_loss(logp, b.old_logprobs, b.advantages, mask, ppo.clip)
        with torch.no_grad():
            ent = entropy_from_logprobs(logp_all.detach(), mask).item()
        self.policy.backward(loss)
        self.policy.step()
        values = self.value(b.packed)
        v_loss, v_stats = value_loss(values, b.old_values, b.returns, mask, ppo.value_clip)
        self.value.backward(v_loss)
        self.value.step()
        return {
            "ppo/policy_loss": loss.item(),
            "ppo/value_loss": v_loss.item(),
            "ppo/entropy": ent,
            "ppo/clipfrac": stats["clipfrac"],
            "ppo/approx_kl": stats["approx_kl"],
            "ppo/value_clipfrac": v_stats["value_clipfrac"],
        }

    def save(self, directory: Path, iteration: int, driver_state: dict[str, Any]) -> None:
        tag = f"iter{iteration}"
        state = {"iteration": iteration, "rng": torch.get_rng_state()}
        self.policy.save_checkpoint(str(directory / "policy"), tag=tag, client_state=state)
        self.value.save_checkpoint(str(directory / "value"), tag=tag, client_state=state)
        if self.rank == 0:
            (directory / "state.json").write_text(
                json.dumps({"iteration": iteration, "driver_state": driver_state})
            )

    def load(self, directory: Path) -> tuple[int, dict[str, Any]]:
        _, client = self.policy.load_checkpoint(str(directory / "policy"))
        self.value.load_checkpoint(str(directory / "value"))
        torch.set_rng_state(client["rng"])
        state = json.loads((directory / "state.json").read_text())
        return int(client["iteration"]), state.get("driver_state", {})


def learner_worker(config: dict[str, Any]) -> None:
    """Entry point of each PPO learner (``TorchTrainer(learner_worker, train_loop_config=...)``)."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    spec = LearnerSpec.model_validate(config["spec"])
    quiet_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc, ppo = spec.train, spec.ppo
    ds.setup_worker(tc)
    hub = ray.get_actor(spec.hub, namespace=spec.namespace)
    buffer = ray.get_actor(spec.buffer, namespace=spec.namespace)
    learner = Learner(spec, rank, world)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start, driver_state = learner.load(Path(d))
        if rank == 0:
            ray.get(hub.set_driver_state.remote(driver_state))
            print(f"[ppo] learners resumed from the checkpoint of iteration {start}", flush=True)

    def publish(iteration: int, stats: dict[str, float]) -> int:
        """Every rank joins the gather; rank 0 puts the weights in buckets and announces them. Returns the
        version."""
        t0 = time.perf_counter()
        policy_refs, value_refs, nbytes = learner.publish_weights(ray.put, ppo.publish_bucket_mb * 2**20)
        version = 0
        if rank == 0:
            publish_s = time.perf_counter() - t0
            published: Any = hub.publish.remote(iteration, policy_refs, value_refs, nbytes, publish_s, stats)
            version = int(ray.get(published))
            ray.get(buffer.publish_version.remote(version))
        if dist.is_initialized():
            dist.barrier()  # no rank looks for a batch before the hub forgot those of a lost attempt
        return version

    version = publish(start, {})
    batch_rows = ppo.batch_prompts
    done = start
    for iteration in range(start, ppo.iterations):
        stop = _broadcast_flag(rank == 0 and ray.get(hub.stop_requested.remote()) is not None)
        if stop:
            break
        if rank == 0:
            taken: list[Any] = ray.get(buffer.take.remote(batch_rows, ppo.take_timeout_s))
            got = sum(rows for _, rows, _ in taken)
            if got < batch_rows and ray.get(hub.stop_requested.remote()) is None:
                raise RuntimeError(
                    f"iteration {iteration}: only {got} of {batch_rows} experience rows arrived in "
                    f"{ppo.take_timeout_s:.0f} s; are the rollout workers and scorers alive?"
                )
            ray.get(hub.put_batch.remote(iteration, taken if got >= batch_rows else None))
        entries: list[Any] | None = ray.get(hub.get_batch.remote(iteration, ppo.take_timeout_s))
        if entries is None:
            break  # stopped early while waiting for experience
        staleness = [v for _, _, v in entries]
        tables = ray.get([ref[0] for ref, _, _ in entries])
        rows = pa.concat_tables(tables).to_pylist()
        stats = learner.train_iteration(rows, iteration)
        stats["ppo/batch_version_min"] = float(min(staleness))
        done = iteration + 1
        version = publish(done, stats)
        if rank == 0:
            ray.get(hub.drop_batch.remote(iteration))
        if done % ppo.checkpoint_every == 0 and done < ppo.iterations:
            driver_state = ray.get(hub.get_driver_state.remote())
            with tempfile.TemporaryDirectory() as tmp:
                learner.save(Path(tmp), done, driver_state)
                ray.train.report({"iteration": done}, checkpoint=Checkpoint.from_directory(tmp))

    if rank == 0:
        ray.get(buffer.close.remote())
        # The driver still reads the last publication (evaluation, best policy): its owner waits for it.
        ray.get(hub.wait_ack.remote(version, ppo.take_timeout_s))
    with tempfile.TemporaryDirectory() as tmp:
        ds.export_hf(learner.policy.module, Path(tmp) / "hf", spec.tokenizer_dir, rank)
        if rank == 0:
            (Path(tmp) / "state.json").write_text(json.dumps({"iteration": done, "final": True}))
        ray.train.report(
            {"iteration": done, "final": 1}, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None
        )
