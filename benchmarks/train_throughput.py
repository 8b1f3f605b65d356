"""Pretraining throughput: paddock on Ray Train (1 and 2 workers, ZeRO 0 and 2) against a plain PyTorch loop.

Same model shape, same tokenizer, same packed windows, same micro-batch and optimiser, in one script. Each
configuration runs ``--steps`` optimiser steps; the first ``--warmup`` are dropped and the median step is
reported as tokens/s and MFU (6·N·tokens/s over a matmul probe taken in the same process). The plain loop
runs with as many threads as the paddock run has workers, so "equal worker count" means equal cores.

    python benchmarks/train_throughput.py [--shape tiny|small] [--steps 40] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from _world import bench_world, write_result

REPO = Path(__file__).resolve().parents[1]


def plain_loop(
    shape: str,
    windows: torch.Tensor,
    vocab: int,
    seq_len: int,
    mb: int,
    steps: int,
    warmup: int,
    threads: int,
) -> dict:
    """Single process, no Ray, no DeepSpeed: the baseline."""
    from paddock.config import OptimConfig
    from paddock.models import build_causal_lm
    from paddock.train.loop import matmul_flops
    from paddock.train.optim import adamw, scheduler

    torch.set_num_threads(threads)
    model = build_causal_lm(shape, vocab, seq_len, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = OptimConfig(lr=3e-3, warmup_steps=10)
    opt = adamw(model, cfg)
    sched = scheduler(opt, cfg, steps)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = windows[(step * mb) % (len(windows) - mb) :][:mb].long()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_time = statistics.median(times[warmup:])
    tokens_per_s = mb * seq_len / step_time
    peak = matmul_flops()
    return {"tokens_per_s": tokens_per_s, "mfu": 6 * n_params * tokens_per_s / peak, "step_time_s": step_time}


def paddock_run(
    config: Path,
    home: Path,
    tokenizer: Path,
    workers: int,
    zero: int,
    mb: int,
    seq_len: int,
    steps: int,
    warmup: int,
    shape: str,
) -> dict:
    from paddock.config import PretrainJob, load_config
    from paddock.train.stage import run_supervised

    job = load_config(
        PretrainJob,
        config,
        [
            f"tokenizer={tokenizer}",
            f"model.shape={shape}",
            f"data.seq_len={seq_len}",
            f"train.num_workers={workers}",
            f"train.zero_stage={zero}",
            f"train.micro_batch_size={mb}",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={steps * 10}",
            f"train.eval_every={steps * 10}",
            "train.eval_batches=1",
            f"registry_prefix=bench-w{workers}-z{zero}",
            "train.cpus_per_worker=1",
        ],
    )
    result = run_supervised(job, "pretrain")
    hist = [
        h for h in result.history if h["step"] > warmup and h["step"] < steps
    ]  # the last step also evaluates
    per_worker = statistics.median(h["train/tokens_per_s"] for h in hist) / workers
    return {
        "tokens_per_s": per_worker * workers,
        "tokens_per_s_per_worker": per_worker,
        "mfu": statistics.median(h["train/mfu"] for h in hist),
        "step_time_s": statistics.median(h["train/step_time_s"] for h in hist),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    home, _, tok_dir, texts = bench_world(
        "paddock-bench-", pretrain_mb=1.0, rl_prompts=20, vocab_size=4000, dialogs=100
    )
    from paddock.cluster import connect
    from paddock.data.tokenize import pack
    from paddock.models import PAD_ID
    from paddock.tokenizer import load_tokenizer
    from paddock.train.data import TokenizeAndPack

    tok = load_tokenizer(tok_dir)
    packer = TokenizeAndPack(str(tok_dir), "pretrain", args.seq_len)
    windows = torch.tensor(
        [
            w.input_ids
            for w in pack(packer.examples([{"text": t} for t in texts[:2000]]), args.seq_len, PAD_ID)
        ]
    )

    rows = []
    for threads in (1, 2):
        r = plain_loop(
            args.shape, windows, len(tok), args.seq_len, args.micro_batch, args.steps, args.warmup, threads
        )
        rows.append({"name": f"plain loop, {threads} thread(s)", "workers": threads, "zero": None, **r})
    connect()
    for workers in (1, 2):
        for zero in (0, 2):
            r = paddock_run(
                REPO / "jobs/configs/tiny/pretrain.yaml",
                home,
                tok_dir,
                workers,
                zero,
                args.micro_batch,
                args.seq_len,
                args.steps,
                args.warmup,
                args.shape,
            )
            rows.append(
                {
                    "name": f"paddock Ray Train, {workers} worker(s), ZeRO-{zero}",
                    "workers": workers,
                    "zero": zero,
                    **r,
                }
            )
    plain = {r["workers"]: r for r in rows if r["zero"] is None}
    for r in rows:
        r["ratio_to_plain"] = r["tokens_per_s"] / plain[r["workers"]]["tokens_per_s"]

    meta = {
        "shape": args.shape,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
    }
    write_result(args.out, "train_throughput", meta, rows)
    print(
        f"\ntrain throughput ({args.shape}, seq {args.seq_len}, micro-batch {args.micro_batch}, {os.cpu_count()} CPUs)"
    )
    print(f"{'configuration':<44} {'tokens/s':>10} {'MFU':>7} {'vs plain':>9}")
    for r in rows:
        print(f"{r['name']:<44} {r['tokens_per_s']:>10.0f} {r['mfu']:>7.1%} {r['ratio_to_plain']:>9.2f}")


if __name__ == "__main__":
    main()
