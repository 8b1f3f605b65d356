"""PPO learners: the Ray Train workers that hold the policy and the value model (none with ``ppo.advantage: rloo``)
and take the optimiser steps.

Each iteration, rank 0 takes one batch of experience from the rollout buffer (refs only) and leaves the refs on
the hub; every rank reads the rows from the object store, shuffles them with the iteration's seed, and keeps its
slice of each mini-batch: one optimiser step per mini-batch for the policy (clipped surrogate) and for the value
model (clipped value loss). Then rank 0 announces the new version on the hub and every rank joins the gather of
the weights, one layer at a time under ZeRO-3, while rank 0 streams them in buckets over the version's process
groups to the rollout workers and the value scorer (``paddock.ppo.sync``).
Checkpoints hold both DeepSpeed engines, the iteration and the driver's reward statistics; a restarted worker
group resumes from the newest one.

Ray touches this loop at named points only: ``get_context``, ``get_checkpoint``, ``report`` and the two actors
(hub and buffer) it finds by name.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from paddock import lora
from paddock.cluster import ask
from paddock.config import LoraSettings, OptimConfig, PPOConfig, TrainConfig
from paddock.models import load_causal_lm, load_scalar_model, set_gradient_checkpointing
from paddock.ppo import sync
from paddock.ppo.experience import learner_batch
from paddock.ppo.hub import RESEND, group
from paddock.rlhf.ppo import entropy_from_logprobs, ppo_policy_loss, value_loss
from paddock.rollout.actors import local_checkpoint
from paddock.rollout.core import TokenValues, chunked_logprobs, pick_logprobs, response_logits, unalign
from paddock.tokenizer import tokenizer_files
from paddock.train import engine as ds
from paddock.train.loop import all_sum, collective_device, quiet_worker


class LearnerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ppo: PPOConfig
    optim: OptimConfig
    value_optim: OptimConfig
    train: TrainConfig
    policy: str  # ``tracking.model_ref``s, resolved on each learner's node (its tokenizer is the policy's)
    value: str | None  # None: no value model (ppo.advantage rloo)
    hub: str
    buffer: str
    namespace: str
    seed: int
    channel: sync.Channel  # the run's rendezvous; each publication's groups are named after its version
    # The rollout engine's log-probs are not the policy's own (vLLM's kernels, a bf16 copy): the learners recompute
    # the behaviour log-probs before the update, so that PPO's first ratio is 1, and log the difference.
    recompute_logprobs: bool = False
    lora: LoraSettings | None = None  # adapters on the policy
    # What a LoRA policy publishes: its adapters alone (rollout workers that hold the same base with adapters, the
    # transformers engine) or the merged weights (plain rollout models: vLLM)
    lora_publish: Literal["adapters", "merged"] = "adapters"
    actor_timeout_s: float = 3600.0  # the job's: the longest wait for the hub or the buffer to answer
    # Between updates the engines' states wait in host memory (``PPOJob.learners_offload``): the rollout engines
    # sample on the same GPUs meanwhile
    offload: bool = False
    # Ranks each rollout worker takes in a publication's group: its engine's vLLM workers under tensor parallelism
    worker_ranks: int = 1


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
        steps = ppo.iterations * ppo.epochs * (ppo.answers // ppo.mini_batch)
        attn = tc.attn_implementation
        self.policy_dir = local_checkpoint(spec.policy)
        value_dir = local_checkpoint(spec.value) if spec.value is not None else None
        scalar = None
        with ds.partitioned(tc, spec.optim, world):
            policy = load_causal_lm(self.policy_dir, attn=attn)
            if value_dir is not None:
                scalar = load_scalar_model(value_dir, attn=attn)
        set_gradient_checkpointing(policy, tc.gradient_checkpointing)
        if scalar is not None:
            set_gradient_checkpointing(scalar, tc.gradient_checkpointing)
        if spec.lora is not None:
            torch.manual_seed(spec.seed)  # the adapters' A matrices are drawn from torch's RNG
            policy = lora.wrap(policy, spec.lora, scalar=False)  # type: ignore[assignment]
        self.policy, _ = ds.initialize(policy, spec.optim, tc, world, steps)
        self.value: Any = None
        if scalar is not None:
            self.value, _ = ds.initialize(TokenValues(scalar), spec.value_optim, tc, world, steps)
        wire, bucket = spec.channel.torch_dtype, ppo.publish_bucket_mb * 2**20
        module = self.policy.module
        if spec.lora is None:
            shapes = list(ds.state_shapes(module))
        elif spec.lora_publish == "adapters":
            shapes = lora.adapter_shapes(module)
        else:
            shapes = lora.merged_shapes(module)
        self.resting = False  # the engines' states in host memory (``rest``)
        self.layouts = (
            sync.layout(shapes, bucket, wire),
            sync.module_layout(self.value.module, bucket, wire) if self.value is not None else None,
        )

    @property
    def engines(self) -> list[Any]:
        return [self.policy, *([self.value] if self.value is not None else [])]

    def rest(self) -> float:
        """Move both engines' states (optimiser moments, fp32 master weights, gradients, weights) to host memory
        until ``wake`` (``spec.offload``: the rollout engines sample on these GPUs meanwhile). Returns seconds."""
        if not self.spec.offload or self.resting:
            return 0.0
        start = time.perf_counter()
        for engine in self.engines:
            engine.offload_states()
        self.resting = True
        return time.perf_counter() - start

    def wake(self) -> float:
        """Bring the states back to the device (before an update, a stream of the weights, a checkpoint, the
        final export). Returns seconds."""
        if not self.resting:
            return 0.0
        start = time.perf_counter()
        for engine in self.engines:
            engine.reload_states()
        self.resting = False
        return time.perf_counter() - start

    def policy_state(self) -> Iterator[tuple[str, torch.Tensor]] | None:
        """What this rank streams of the policy (every rank iterates it): a LoRA policy's adapters or merged
        weights, gathered layer by layer under ZeRO-3; None for the whole model (``sync.send_module``'s default)."""
        module = self.policy.module
        if self.spec.lora is None:
            return None
        if self.spec.lora_publish == "adapters":
            return ds.gathered_state(module, self.rank, to_host=False, keep=lora.is_adapter)
        return lora.merged_state(module, ds.gathered_state(module, self.rank, to_host=False))

    @property
    def receivers(self) -> int:
        """The ranks that receive the policy: every rollout worker's (``LearnerSpec.worker_ranks`` each)."""
        return self.spec.ppo.rollout_workers * self.spec.worker_ranks

    def stream_weights(self, version: int, attempt: int = 0, receivers: int | None = None) -> list[str]:
        """Send the policy to the rollout workers and the value model (if any) to the value scorer over the groups
        of ``version``'s ``attempt``; every rank must call it (they gather in lockstep under ZeRO-3), rank 0 sends.
        ``receivers``: the policy group's receiving ranks as the hub announced them (None: every configured
        worker's). Returns what failed (a receiver gone, none joined in time), at rank 0."""
        ch, failed = self.spec.channel, []
        policy_ranks = self.receivers if receivers is None else receivers
        streams = [("policy", self.policy.module, self.layouts[0], policy_ranks + 1)]
        if self.value is not None and self.layouts[1] is not None:
            streams.append(("value", self.value.module, self.layouts[1], 2))
        for name, module, lay, size in streams:
            state = self.policy_state() if name == "policy" else None
            try:
                sync.send_module(
                    ch.sub(group(version, attempt, name), size),
                    module,
                    lay,
                    self.rank,
                    self.policy.device,
                    state,
                )
            except Exception as exc:  # the group's failure: gloo/NCCL errors, a store timeout
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
        return failed

    def train_iteration(self, rows: list[dict[str, Any]], iteration: int) -> dict[str, float]:
        """One PPO update over the iteration's rows (every rank holds them all and keeps its slices)."""
        ppo = self.spec.ppo
        per_rank = ppo.mini_batch // self.world
        sums: dict[str, float] = {}
        steps, tokens = 0, 0
        start = time.perf_counter()
        drift = self.recompute_logprobs(rows) if self.spec.recompute_logprobs else None
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
        if drift is not None:
            out["rollout/logprob_drift"] = drift
        return out

    @torch.no_grad()
    def recompute_logprobs(self, rows: list[dict[str, Any]]) -> float:
        """Replace each row's behaviour log-probs (the rollout engine's) with the policy's own, from a forward
        pass in the learners' precision before any step; returns the mean absolute difference per token (the
        engine's drift). Each rank computes every ``world``-th row, in lockstep (ZeRO-3 gathers per forward),
        and all ranks end with all rows."""
        ppo, device = self.spec.ppo, self.policy.device
        mine = list(range(self.rank, len(rows), self.world))
        computed: dict[int, list[float]] = {}
        for k in range(0, len(mine), self.micro):
            idx = mine[k : k + self.micro]
            packed = learner_batch([rows[i] for i in idx]).packed.to(device)
            logp = chunked_logprobs(self.policy.module, packed, ppo.temperature)
            computed |= dict(zip(idx, unalign(logp.float().cpu(), packed.response_mask.cpu()), strict=True))
        if dist.is_initialized() and self.world > 1:
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, computed)
            computed = {i: lp for part in parts for i, lp in part.items()}
        diff, count = 0.0, 0
        for i, row in enumerate(rows):
            own = computed[i]
            diff += sum(abs(a - b) for a, b in zip(row["behaviour_logprobs"], own, strict=True))
            count += len(own)
            row["behaviour_logprobs"] = own
        return diff / max(1, count)

    def _micro_step(self, b: Any) -> dict[str, float]:
        ppo = self.spec.ppo
        mask = b.packed.response_mask
        # One log-softmax over the vocabulary serves the loss and the entropy.
        logp_all = torch.log_softmax(response_logits(self.policy, b.packed, ppo.temperature), dim=-1)
        logp = pick_logprobs(logp_all, b.packed)
        loss, stats = ppo_policy_loss(
            logp, b.old_logprobs, b.advantages, mask, ppo.clip, ppo.loss_aggregation
        )
        with torch.no_grad():
            ent = entropy_from_logprobs(logp_all.detach(), mask).item()
        self.policy.backward(loss)
        self.policy.step()
        out = {
            "ppo/policy_loss": loss.item(),
            "ppo/entropy": ent,
            "ppo/clipfrac": stats["clipfrac"],
            "ppo/approx_kl": stats["approx_kl"],
        }
        if self.value is not None:
            values = self.value(b.packed)
            v_loss, v_stats = value_loss(values, b.old_values, b.returns, mask, ppo.value_clip)
            self.value.backward(v_loss)
            self.value.step()
            out |= {"ppo/value_loss": v_loss.item(), "ppo/value_clipfrac": v_stats["value_clipfrac"]}
        return out

    def save(self, directory: Path, iteration: int, driver_state: dict[str, Any]) -> None:
        tag = f"iter{iteration}"
        state = {"iteration": iteration, "rng": torch.get_rng_state()}
        self.policy.save_checkpoint(str(directory / "policy"), tag=tag, client_state=state)
        if self.value is not None:
            self.value.save_checkpoint(str(directory / "value"), tag=tag, client_state=state)
        if self.rank == 0:
            (directory / "state.json").write_text(
                json.dumps({"iteration": iteration, "driver_state": driver_state})
            )

    def load(self, directory: Path) -> tuple[int, dict[str, Any]]:
        _, client = self.policy.load_checkpoint(str(directory / "policy"))
        if self.value is not None:
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

    def call(name: str, ref: Any, doing: str, waits_s: float = 0.0) -> Any:
        """A call on the hub or the buffer: at most ``actor_timeout_s`` (beyond its own wait, ``waits_s``)."""
        return ask(name, ref, spec.actor_timeout_s + waits_s, f"PPO learner {rank} {doing}")

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start, driver_state = learner.load(Path(d))
        if rank == 0:
            call("the policy hub", hub.set_driver_state.remote(driver_state), "restoring the driver's state")
            print(f"[ppo] learners resumed from the checkpoint of iteration {start}", flush=True)

    latest, latest_attempt = 0, 0  # rank 0's last publication
    offload_s = 0.0  # moving the states to host memory and back since the last update

    def rest() -> None:
        """Every rank moves its states to host memory; rank 0 then tells the driver, whose rollout engines may
        take the device. Without ``spec.offload`` nothing moves and nobody waits for the word."""
        nonlocal offload_s
        if not spec.offload:
            return
        offload_s += learner.rest()
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            call("the policy hub", hub.rested.remote(latest, latest_attempt), "giving up the device")

    def wake() -> None:
        nonlocal offload_s
        offload_s += learner.wake()

    def publish(iteration: int, stats: dict[str, float], again: bool = False) -> None:
        """Rank 0 announces the version; every rank joins the gather while rank 0 streams it. ``again``: the
        latest version once more, as its next attempt (the driver could not load it).

        A stream that fails (a receiver gone, none joined in time) is reported and training goes on: the driver
        repairs a restarted rollout worker from a peer, asks again for a version nobody it needs received, and the
        next version reaches everyone alive."""
        nonlocal latest, latest_attempt
        version, attempt = 0, 0  # known at rank 0, the only one that joins the groups
        receivers: int | None = None  # the policy group's receiving ranks, as the hub announced them
        wake()
        if again and dist.is_initialized():
            dist.barrier()  # every rank has read the request before the hub forgets it
        if rank == 0:
            if again:
                version = latest
                attempt, receivers = call(
                    "the policy hub", hub.republish.remote(version), f"sending {version} again"
                )
                print(f"[ppo] the driver asked for version {version} again: attempt {attempt}", flush=True)
            else:
                wire = spec.channel.torch_dtype
                nbytes = sum(sync.nbytes(lay, wire) for lay in learner.layouts if lay is not None)
                published: Any = hub.publish.remote(iteration, *learner.layouts, nbytes, stats)
                version, receivers = call("the policy hub", published, f"publishing iteration {iteration}")
            latest, latest_attempt = version, attempt
            call(
                "the rollout buffer", buffer.publish_version.remote(version), f"publishing version {version}"
            )
        for failure in learner.stream_weights(version, attempt, receivers):
            print(f"[ppo] streaming version {version} (attempt {attempt}) failed, {failure}", flush=True)
        if dist.is_initialized():
            dist.barrier()  # no rank looks for a batch before the hub forgot those of a lost attempt

    publish(start, {})
    if start < ppo.iterations:
        rest()
    batch_rows = ppo.answers
    done = iteration = start
    while iteration < ppo.iterations:
        stop = _broadcast_flag(
            rank == 0 and call("the policy hub", hub.stop_requested.remote(), "asking for a stop") is not None
        )
        if stop:
            break
        if rank == 0:
            taking = f"taking iteration {iteration}'s experience"
            taken: list[Any] = call(
                "the rollout buffer",
                buffer.take.remote(batch_rows, ppo.take_timeout_s),
                taking,
                ppo.take_timeout_s,
            )
            got = sum(rows for _, rows, _ in taken)
            entries: list[Any] | str | None = taken if got >= batch_rows else None
            if not taken and call("the rollout buffer", buffer.resend_requested.remote(), taking) == latest:
                entries = RESEND
            elif got < batch_rows and call("the policy hub", hub.stop_requested.remote(), taking) is None:
                raise RuntimeError(
                    f"iteration {iteration}: only {got} of {batch_rows} experience rows arrived in "
                    f"{ppo.take_timeout_s:.0f} s; are the rollout workers and scorers alive?"
                )
            call("the policy hub", hub.put_batch.remote(iteration, entries), taking)
        entries = call(
            "the policy hub",
            hub.get_batch.remote(iteration, ppo.take_timeout_s),
            f"waiting for iteration {iteration}'s batch",
            ppo.take_timeout_s,
        )
        if entries == RESEND:
            publish(iteration, {}, again=True)
            rest()
            continue
        if entries is None:
            break  # stopped early while waiting for experience
        assert not isinstance(entries, str)
        staleness = [v for _, _, v in entries]
        tables = ray.get([ref[0] for ref, _, _ in entries], timeout=spec.actor_timeout_s)
        rows = pa.concat_tables(tables).to_pylist()
        wake()
        stats = learner.train_iteration(rows, iteration)
        stats["ppo/batch_version_min"] = float(min(staleness))
        if spec.offload:
            stats["ppo/learner_offload_s"], offload_s = offload_s, 0.0
        done = iteration = iteration + 1
        publish(done, stats)
        if rank == 0:
            call("the policy hub", hub.drop_batch.remote(iteration - 1), f"ending iteration {iteration - 1}")
        if done % ppo.checkpoint_every == 0 and done < ppo.iterations:
            driver_state = call(
                "the policy hub", hub.get_driver_state.remote(), f"checkpointing iteration {done}"
            )
            with tempfile.TemporaryDirectory() as tmp:
                learner.save(Path(tmp), done, driver_state)
                ray.train.report({"iteration": done}, checkpoint=Checkpoint.from_directory(tmp))
        if done < ppo.iterations:
            rest()

    if rank == 0:
        call("the rollout buffer", buffer.close.remote(), "closing the buffer")
    wake()
    with tempfile.TemporaryDirectory() as tmp:
        ds.export_hf(learner.policy.module, Path(tmp) / "hf", tokenizer_files(learner.policy_dir), rank)
        rest()  # done with the device: the driver's last evaluation may have it
        if rank == 0:
            (Path(tmp) / "state.json").write_text(json.dumps({"iteration": done, "final": True}))
        ray.train.report(
            {"iteration": done, "final": 1}, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None
        )
