"""Pretraining MFU on one GPU: a ~1.1B-parameter Llama 2 shape, bf16, ZeRO-2, through paddock's pretraining stage.

Tokens/s is the median optimiser step after ``--warmup``; MFU is 6·N·tokens/s over the GPU's dense bf16 peak
(H100 and H200 SXM 989 TFLOP/s, A100 312; ``--peak-flops`` for anything else). The Llama 2 paper's own runs
sat near 40% on A100s. Without a CUDA device it writes a skipped result and exits 0, so ``make bench`` runs
anywhere; ``--smoke`` runs the same path on the CPU with the tiny shape for a few steps (a check of the
script, not a measurement).

    python benchmarks/gpu_mfu.py [--steps 200] [--micro-batch 8] [--seq-len 2048] [--smoke]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from _world import bench_world, write_result

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts).
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: check the script runs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        write_result(args.out, "gpu_mfu", {"skipped": "no CUDA device"}, [])
        print(
            "gpu_mfu: skipped, no CUDA device (run it on a GPU machine; --smoke checks the script on a CPU)"
        )
        return
    name = torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu"
    peak = args.peak_flops or (peak_flops(name) if gpu else None)
    if gpu and peak is None:
        raise SystemExit(f"gpu_mfu: no known bf16 peak for {name!r}; pass --peak-flops")
    shape, seq_len, steps, mb = ("1b", args.seq_len, args.steps, args.micro_batch)
    if args.smoke:
        shape, seq_len, steps, mb = "tiny", 128, 6, 4

    _, _, tok_dir, _ = bench_world(
        "paddock-bench-gpu-",
        pretrain_mb=args.corpus_mb if gpu else 0.3,
        rl_prompts=20,
        vocab_size=8000 if gpu else 2000,
    )
    from paddock.cluster import connect
    from paddock.config import PretrainJob, load_config
    from paddock.train.stage import run_supervised

    connect()
    sets = [
        f"tokenizer={tok_dir}",
        f"model.shape={shape}",
        f"data.seq_len={seq_len}",
        "train.num_workers=1",
        "train.zero_stage=2",
        f"train.micro_batch_size={mb}",
        f"train.max_steps={steps}",
        "train.epochs=1000",  # the corpus repeats; max_steps ends the run
        f"train.checkpoint_every={steps * 10}",
        f"train.eval_every={steps * 10}",
        "train.eval_batches=1",
        "registry_prefix=bench-gpu",
    ]
    if gpu:
        sets += [
            "train.use_gpu=true",
            "train.precision=bf16",
            "train.cpus_per_worker=4",
            f"train.peak_flops={peak}",
        ]
    job = load_config(PretrainJob, REPO / "jobs/configs/tiny/pretrain.yaml", sets)
    start = time.monotonic()
    result = run_supervised(job, "pretrain")
    wall = time.monotonic() - start
    warmup = min(args.warmup, steps // 2)
    hist = [h for h in result.history if warmup < h["step"] < steps]  # the last step also evaluates
    from paddock.models import count_parameters
    from paddock.tokenizer import load_tokenizer

    n_params = count_parameters(shape, len(load_tokenizer(tok_dir)))
    row = {
        "name": f"paddock pretrain, {shape}, ZeRO-2, {'bf16' if gpu else 'fp32'}, 1 {'GPU' if gpu else 'CPU worker'}",
        "tokens_per_s": statistics.median(h["train/tokens_per_s"] for h in hist),
        "mfu": statistics.median(h["train/mfu"] for h in hist),
        "step_time_s": statistics.median(h["train/step_time_s"] for h in hist),
        "stage_wall_s": wall,
    }
    meta = {
        "device": name,
        "peak_flops": peak,
        "shape": shape,
        "parameters": n_params,
        "seq_len": seq_len,
        "micro_batch": mb,
        "steps": steps,
        "warmup": warmup,
        "smoke": args.smoke,
    }
    write_result(args.out, "gpu_mfu", meta, [row])
    print(
        f"\ngpu_mfu on {name}: {row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.1%} ({shape}, seq {seq_len})"
    )


if __name__ == "__main__":
    main()
