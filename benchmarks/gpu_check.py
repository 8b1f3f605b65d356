"""The device check: paddock's GPU memory plan against what one GPU measures, in one short run (< 8 minutes).

Two parts, in one process on one device, with paddock's own code (``paddock.train.engine``, the PPO learner,
``paddock.rollout.core``):

1. SFT steps of a ~1.1B shape (``1b``): bf16, ZeRO-2, gradient checkpointing on, packed windows whose examples
   are kept apart. Peak device memory, tokens/s and MFU (6·N·tokens/s over the device's dense bf16 peak).
2. One colocated PPO iteration, every role on the same device at once: a rollout copy samples, a reference
   copy scores log-probs, reward and value copies score, the learners (policy and value engines) take the
   PPO steps, and the new weights are published in buckets into the rollout copy.

For each role: the device memory ``paddock.plan`` plans (the same functions ``jobs/plan.py`` uses) against the
measured one: the role's weights (memory allocated by loading it) plus the peak above that while it works
(``torch.cuda.max_memory_allocated``). Without CUDA it writes a skipped result and exits 0; ``--smoke`` runs the
same path on the CPU with the tiny shape (a check of the script, not a measurement: CPU memory is not counted).

    python benchmarks/gpu_check.py [--shape 1b] [--steps 12] [--smoke] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _world import bench_world, write_result
from gpu_mfu import peak_flops  # the dense bf16 peaks by device name

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


class Meter:
    """Device memory of one role: what loading it left allocated, and the peak above that while it works."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.rows: dict[str, dict[str, float]] = {}

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def load(self, role: str, fn: Any) -> Any:
        before = self.now()
        out = fn()
        self.rows.setdefault(role, {})["weights_gib"] = (self.now() - before) / GIB
        return out

    def work(self, role: str, fn: Any) -> Any:
        base = self.now()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        row = self.rows.setdefault(role, {"weights_gib": 0.0})
        peak = torch.cuda.max_memory_allocated() if self.cuda else 0
        row["work_gib"] = max(row.get("work_gib", 0.0), (peak - base) / GIB)
        row["seconds"] = row.get("seconds", 0.0) + time.perf_counter() - start
        return out


def sft_part(
    args: argparse.Namespace, device: torch.device, tok_dir: Path, texts: list[str]
) -> dict[str, Any]:
    from paddock import plan
    from paddock.config import OptimConfig, TrainConfig
    from paddock.data.tokenize import PACKED_COLUMNS
    from paddock.models import build_causal_lm, count_parameters, set_gradient_checkpointing
    from paddock.tokenizer import load_tokenizer
    from paddock.train import engine
    from paddock.train.data import TokenizeAndPack
    from paddock.train.loop import lm_loss

    gpu = device.type == "cuda"
    vocab = len(load_tokenizer(tok_dir))
    tc = TrainConfig(
        num_workers=1,
        use_gpu=gpu,
        precision="bf16" if gpu else "fp32",
        zero_stage=2,
        micro_batch_size=args.micro_batch,
        gradient_checkpointing=True,
    )
    optim = OptimConfig(lr=1e-5, warmup_steps=1)
    packer = TokenizeAndPack(str(tok_dir), "pretrain", args.seq_len)
    import pyarrow as pa

    windows = packer(pa.table({"text": texts[:4000]}))
    n = windows["input_ids"].shape[0]
    meter = Meter(device)
    eng = meter.load(
        "SFT learner",
        lambda: engine.initialize(
            _gc(build_causal_lm(args.shape, vocab, args.seq_len, seed=0)), optim, tc, 1, args.steps
        )[0],
    )
    set_gradient_checkpointing(eng.module, True)
    times = []

    def steps() -> None:
        for step in range(args.steps):
            rows = [(step * args.micro_batch + i) % n for i in range(args.micro_batch)]
            batch = {k: torch.as_tensor(windows[k][rows]).to(eng.device) for k in PACKED_COLUMNS}
            t0 = time.perf_counter()
            loss = lm_loss(eng, batch)
            eng.backward(loss)
            eng.step()
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)

    meter.work("SFT learner", steps)
    params = count_parameters(args.shape, vocab)
    tokens = args.micro_batch * args.seq_len
    step_s = statistics.median(times[2:] or times)
    m = plan.ModelShape.of(eng.module.config)
    planned = plan.learner_role("SFT learner", [m], tc, args.seq_len)
    row = meter.rows["SFT learner"]
    peak = args.peak_flops or peak_flops(_device_name(device))
    return {
        "role": "SFT learner",
        "plan_gib": planned.device_gib if gpu else planned.host_gib,
        "measured_gib": row["weights_gib"] + row["work_gib"],
        **row,
        "tokens_per_s": tokens / step_s,
        "mfu": 6 * params * tokens / step_s / peak if peak and gpu else None,
        "parameters": params,
    }


def ppo_part(
    args: argparse.Namespace, device: torch.device, home: Path, tok_dir: Path, world: Path
) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    from paddock import plan
    from paddock.config import OptimConfig, PPOConfig, TrainConfig
    from paddock.models import build_causal_lm, inference_dtype, load_causal_lm, load_scalar_model
    from paddock.ppo import sync
    from paddock.ppo.experience import build_experience
    from paddock.ppo.learner import Learner, LearnerSpec
    from paddock.rollout.core import (
        TokenValues,
        micro_batches,
        pack,
        reward_scores,
        sample,
        sequence_logprobs,
        unalign,
    )
    from paddock.tokenizer import load_tokenizer
    from paddock.train import engine

    gpu = device.type == "cuda"
    tok = load_tokenizer(tok_dir)
    dtype = inference_dtype("auto", gpu)
    policy_dir = home / "policy"
    model = build_causal_lm(args.shape, len(tok), args.seq_len, seed=0).to(dtype)
    model.save_pretrained(str(policy_dir), safe_serialization=True)
    tok.save_pretrained(str(policy_dir))
    del model
    prompts = pq.read_table(world / "prompts" / "train.parquet").to_pylist()[: args.prompts]
    budget = args.token_budget
    meter = Meter(device)

    def copy(loader: Any) -> torch.nn.Module:
        return loader().eval().to(device)

    rollout = meter.load("rollout worker", lambda: copy(lambda: load_causal_lm(policy_dir, dtype)))
    reference = meter.load("reference scorer", lambda: copy(lambda: load_causal_lm(policy_dir, dtype)))
    reward = meter.load("reward scorer", lambda: copy(lambda: load_scalar_model(policy_dir, dtype)))
    value = meter.load(
        "value scorer", lambda: copy(lambda: TokenValues(load_scalar_model(policy_dir, dtype)))
    )
    tc = TrainConfig(
        num_workers=1,
        use_gpu=gpu,
        precision="bf16" if gpu else "fp32",
        zero_stage=2,
        micro_batch_size=4,
        gradient_checkpointing=True,
    )
    p = PPOConfig(
        batch_prompts=len(prompts),
        mini_batch=min(16, len(prompts)),
        iterations=1,
        max_new_tokens=args.new_tokens,
        seq_len=args.seq_len,
    )
    spec = LearnerSpec(
        ppo=p,
        optim=OptimConfig(lr=1e-6, warmup_steps=0),
        value_optim=OptimConfig(lr=1e-5, warmup_steps=0),
        train=tc,
        policy=str(policy_dir),
        value=str(policy_dir),
        hub="none",
        buffer="none",
        namespace="none",
        seed=0,
        # no group here: the publication below hands its buckets over in-process
        channel=sync.Channel("127.0.0.1", 0, "nccl" if gpu else "gloo", sync.dtype_name(dtype), 60.0),
        offload=True,  # measured below: what the learners give up while the engines sample (ppo.learner_offload)
    )
    learner = meter.load("learner (policy + value)", lambda: Learner(spec, 0, 1))

    def generate() -> list[Any]:
        return sample(
            rollout,
            tok,
            [r["turns"] for r in prompts],
            max_new_tokens=p.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            seed=0,
            token_budget=budget,
        )

    samples = meter.work("rollout worker", generate)
    rows = [
        {
            "prompt_id": r["id"],
            "prompt_ids": s.prompt_ids,
            "response_ids": s.response_ids,
            "behaviour_logprobs": s.behaviour_logprobs,
            "policy_version": 0,
            "is_safety": bool(r["is_safety"]),
            "finished": s.finished,
        }
        for r, s in zip(prompts, samples, strict=True)
    ]
    prompt_ids, response_ids = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
    ref = meter.work(
        "reference scorer",
        lambda: sequence_logprobs(reference, prompt_ids, response_ids, token_budget=budget),
    )
    answers = [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    turns = [r["turns"] for r in prompts]
    r_h = meter.work("reward scorer", lambda: reward_scores(reward, tok, turns, answers, p.seq_len, budget))

    @torch.no_grad()
    def values() -> list[list[float]]:
        out: list[list[float]] = [[] for _ in rows]
        widths = [len(a) + len(b) for a, b in zip(prompt_ids, response_ids, strict=True)]
        for group in micro_batches(widths, budget):
            packed = pack([prompt_ids[i] for i in group], [response_ids[i] for i in group]).to(device)
            for i, v in zip(group, unalign(value(packed).float(), packed.response_mask), strict=True):
                out[i] = v
        return out

    vals = meter.work("value scorer", values)
    experience = build_experience(rows, ref, vals, r_h.tolist(), r_h.tolist(), p)
    stats = meter.work("learner (policy + value)", lambda: learner.train_iteration(experience.rows, 0))
    t0 = time.perf_counter()
    # The publication's buckets (paddock.ppo.sync), handed over in-process: no group, the copies only.
    lay = sync.module_layout(learner.policy.module, 256 * 2**20, dtype)
    tensors = engine.gathered_state(learner.policy.module, 0, to_host=False)
    nbytes = sync.load_into(rollout, sync.unflatten(lay, sync.flat_buckets(lay, tensors, dtype, device)))
    publish_s = time.perf_counter() - t0
    # Taking turns on a shared GPU (ppo.learner_offload, ppo.engine_sleep): the device memory each side gives up
    # for the other's turn, and the seconds of the round trip.
    held = meter.now()
    t0 = time.perf_counter()
    learner.rest()
    rest_s, learner_freed = time.perf_counter() - t0, (held - meter.now()) / GIB
    t0 = time.perf_counter()
    learner.wake()
    wake_s = time.perf_counter() - t0
    held = meter.now()
    t0 = time.perf_counter()
    rollout.to("cpu")  # the transformers engine's sleep (RolloutWorker.sleep)
    if gpu:
        torch.cuda.empty_cache()
    sleep_s, engine_freed = time.perf_counter() - t0, (held - meter.now()) / GIB
    rollout.to(device)

    lm, scalar = plan.ModelShape.of(rollout.config), plan.ModelShape.of(reward.config, scalar=True)

    def copy_plan(role: str, shape: Any, generates: bool) -> Any:
        gpus = 1.0 if gpu else 0.0
        return plan.inference_role(
            role, 1, gpus, shape, _name(dtype), budget, generates=generates, keys=[], seq_len=p.seq_len
        )

    planned = {
        "rollout worker": copy_plan("rollout worker", lm, True),
        "reference scorer": copy_plan("reference scorer", lm, False),
        "reward scorer": copy_plan("reward scorer", scalar, False),
        "value scorer": copy_plan("value scorer", scalar, False),
        "learner (policy + value)": plan.learner_role(
            "learner (policy + value)",
            [lm, scalar],
            tc,
            p.seq_len,
            logits_tokens=p.max_new_tokens,
        ),
    }
    out = []
    for role, r in meter.rows.items():
        pl = planned[role]
        out.append(
            {
                "role": role,
                "plan_gib": pl.device_gib if gpu else pl.host_gib,
                "measured_gib": r["weights_gib"] + r.get("work_gib", 0.0),
                **r,
            }
        )
    total = torch.cuda.max_memory_allocated() / GIB if gpu else None
    out.append(
        {
            "role": "whole PPO iteration, colocated",
            "measured_gib": sum(r["weights_gib"] for r in meter.rows.values()) if gpu else None,
            "device_peak_gib": total,  # during the learners' step, with every copy resident: the iteration's peak
            "answers": len(samples),
            "response_tokens": sum(len(s.response_ids) for s in samples),
            "publish_s": publish_s,
            "published_gib": nbytes / GIB,
            "policy_loss": stats.get("ppo/policy_loss"),
        }
    )
    out.append(
        {
            "role": "taking turns",
            "learner_rest_freed_gib": learner_freed if gpu else None,  # of "learner (policy + value)"'s
            "learner_rest_s": rest_s,
            "learner_wake_s": wake_s,
            "engine_sleep_freed_gib": engine_freed if gpu else None,  # the rollout copy's weights
            "engine_sleep_s": sleep_s,
        }
    )
    return out


def _name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _gc(x: Any) -> Any:
    gc.collect()
    return x


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--token-budget", type=int, default=32768)
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: check the script runs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        write_result(args.out, "gpu_check", {"skipped": "no CUDA device"}, [])
        print(
            "gpu_check: skipped, no CUDA device (run it on a GPU machine; --smoke checks the script on a CPU)"
        )
        return
    if args.smoke:
        args.shape, args.steps, args.micro_batch, args.seq_len = "tiny", 3, 2, 128
        args.prompts, args.new_tokens, args.token_budget = 8, 16, 1024
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29547"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from paddock.train.optim import skip_cpu_shm_comm_op

    skip_cpu_shm_comm_op()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    start = time.perf_counter()
    home, world, tok_dir, texts = bench_world(
        "paddock-gpu-check-",
        pretrain_mb=1.0 if gpu else 0.2,
        rl_prompts=max(20, args.prompts),
        vocab_size=8000 if gpu else 1000,
    )
    rows = [sft_part(args, device, tok_dir, texts)]
    _free()  # the SFT engine is gone with its function
    print(json.dumps(rows[-1]), flush=True)
    for row in ppo_part(args, device, home, tok_dir, world):
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        if row.get("plan_gib"):
            row["measured_vs_plan"] = row["measured_gib"] / row["plan_gib"]
    meta = {
        "device": _device_name(device),
        "shape": args.shape,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "token_budget": args.token_budget,
        "smoke": args.smoke,
        "wall_s": time.perf_counter() - start,
    }
    print(write_result(args.out, "gpu_check_smoke" if args.smoke else "gpu_check", meta, rows))


if __name__ == "__main__":
    main()
