"""LoRA against full fine-tuning: trainable parameters, peak host memory and step time, on this machine.

Each run is a fresh process (so that one run's allocations do not hide the other's): DeepSpeed ZeRO-2 on one gloo
rank, fp32, a few AdamW steps on random sequences, from the same checkpoint of the ``small`` shape (~25M
parameters). The memory figure is the process's peak resident memory (``ru_maxrss``) less its resident memory
after imports, before any model exists: weights, gradients, AdamW's two moments and activations. Rows: full and
LoRA (``LoraSettings`` defaults: r 16 on every projection) at one and at eight sequences a step, LoRA's with
its ratio to full at the same batch.

    python benchmarks/lora_memory.py [--shape small] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30
SEQ, STEPS = 256, 6
MICROS = (1, 8)  # one sequence a step: weights and optimiser state dominate; eight: activations do


def train(checkpoint: str, use_lora: bool, micro: int, out: Any) -> None:
    import deepspeed
    import torch
    from _world import peak_rss, single_rank
    from paddock import lora
    from paddock.config import LoraSettings, OptimConfig, TrainConfig
    from paddock.models import load_causal_lm
    from paddock.train.optim import adamw, deepspeed_config

    base = single_rank(29541)
    tc = TrainConfig(num_workers=1, micro_batch_size=micro, zero_stage=2)
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    torch.manual_seed(0)
    model = load_causal_lm(checkpoint)
    if use_lora:
        model = lora.wrap(model, LoraSettings(), scalar=False)
    trainable, total = lora.parameter_counts(model)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=adamw(model, optim), config=deepspeed_config(tc, optim, 1)
    )
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(STEPS):
        ids = torch.randint(3, 4000, (micro, SEQ), generator=g)
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    out.put({"trainable": trainable, "total": total, "peak": peak_rss() - base, "step_s": min(times[1:])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from _world import write_result
    from paddock.models import build_causal_lm

    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        build_causal_lm(args.shape, seed=0).save_pretrained(tmp, safe_serialization=True)
        for micro, name, use_lora in [
            (m, n, u) for m in MICROS for n, u in (("full", False), ("lora", True))
        ]:
            q = ctx.Queue()
            p = ctx.Process(target=train, args=(tmp, use_lora, micro, q))
            p.start()
            r = q.get(timeout=1800)
            p.join()
            full = rows[-1] if use_lora else None
            rows.append(
                {
                    "run": name,
                    "shape": args.shape,
                    "micro_batch": micro,
                    "trainable_params": r["trainable"],
                    "trainable_share": round(r["trainable"] / r["total"], 4),
                    "peak_gib": round(r["peak"] / GIB, 3),
                    "peak_vs_full": round(r["peak"] / full["_peak"], 3) if full else 1.0,
                    "step_s": round(r["step_s"], 3),
                    "step_vs_full": round(r["step_s"] / full["_step"], 3) if full else 1.0,
                    "_peak": r["peak"],
                    "_step": r["step_s"],
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_")}), flush=True)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    meta = {
        "seq_len": SEQ,
        "steps": STEPS,
        "zero_stage": 2,
        "lora": "r 16, every projection",
    }
    print(write_result(args.out, "lora_memory", meta, rows))


if __name__ == "__main__":
    main()
