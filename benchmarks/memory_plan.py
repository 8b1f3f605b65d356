"""The capacity planner's host-memory estimates against measured peak RSS, on this machine.

Each role runs in a fresh process (so that one role's allocations do not hide another's): a learner rank
(DeepSpeed ZeRO-2 on one gloo rank, fp32, a few optimiser steps on packed sequences) and a scorer (an inference
copy computing log-probs of a full token budget). The measured figure is the process's peak resident memory
(``ru_maxrss``) less its resident memory after imports, before any model exists; the planned one is what
``paddock.plan`` says for the same shape and settings. Rows: planned GiB, measured GiB, measured / plan.

    python benchmarks/memory_plan.py [--shape small] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

GIB = 1 << 30
SEQ, MICRO, STEPS, BUDGET = 256, 8, 4, 8192


def learner(shape: str, out: Any) -> None:
    import deepspeed
    import torch
    from _world import peak_rss, single_rank
    from paddock.config import OptimConfig, TrainConfig
    from paddock.models import build_causal_lm
    from paddock.train.optim import adamw, deepspeed_config

    base = single_rank(29533)
    tc = TrainConfig(num_workers=1, micro_batch_size=MICRO, zero_stage=2)
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    model = build_causal_lm(shape, seed=0)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=adamw(model, optim), config=deepspeed_config(tc, optim, 1)
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        ids = torch.randint(3, model.config.vocab_size, (MICRO, SEQ), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    out.put(peak_rss() - base)


def scorer(shape: str, out: Any) -> None:
    import torch
    from _world import peak_rss, rss
    from paddock.models import build_causal_lm
    from paddock.rollout.core import sequence_logprobs

    torch.set_num_threads(2)
    base = rss()
    model = build_causal_lm(shape, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    rows = BUDGET // SEQ
    prompts = [torch.randint(3, 4000, (SEQ // 2,), generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(3, 4000, (SEQ // 2,), generator=g).tolist() for _ in range(rows)]
    sequence_logprobs(model, prompts, responses, token_budget=BUDGET)
    out.put(peak_rss() - base)


def planned(shape: str) -> dict[str, float]:
    from paddock import plan
    from paddock.config import TrainConfig

    m = plan.ModelShape.named(shape)
    tc = TrainConfig(num_workers=1, micro_batch_size=MICRO, zero_stage=2)
    return {
        "learner": plan.learner_role("learner", [m], tc, SEQ).host_gib,
        "scorer": plan.inference_role(
            "scorer", 1, 0.0, m, "fp32", BUDGET, generates=False, keys=[], seq_len=SEQ
        ).host_gib,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from _world import write_result

    plans = planned(args.shape)
    ctx = mp.get_context("spawn")
    rows = []
    for role, fn in (("learner", learner), ("scorer", scorer)):
        q = ctx.Queue()
        p = ctx.Process(target=fn, args=(args.shape, q))
        p.start()
        measured = q.get(timeout=1800) / GIB
        p.join()
        rows.append(
            {
                "role": role,
                "shape": args.shape,
                "plan_gib": round(plans[role], 3),
                "measured_gib": round(measured, 3),
                "measured_vs_plan": round(measured / plans[role], 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    meta = {
        "seq_len": SEQ,
        "micro_batch": MICRO,
        "steps": STEPS,
        "token_budget": BUDGET,
        "goal": "within 25%",
    }
    print(write_result(args.out, "memory_plan", meta, rows))


if __name__ == "__main__":
    main()
