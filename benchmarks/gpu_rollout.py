"""The rollout device check: vLLM against transformers rollouts on one GPU, and loading published weights into vLLM
against a raw device copy of the same bytes (one short run, < 8 minutes on one GPU).

1. Rollouts of a ~1.1B shape (``1b``, seeded random weights, bf16): ``--prompts`` prompts of 64 random tokens,
   ``--new-tokens`` sampled tokens each at temperature 1, on transformers' ``generate`` (paddock's
   ``transformers`` engine, in micro-batches under the token budget) and on paddock's vLLM engine
   (``paddock.rollout.vllm_engine``); new tokens per second of each, after one warm-up call, and their ratio.
2. Weight loading: the policy's whole state, in bf16 on the device, loaded into the vLLM engine in place
   (``VllmEngine.reload``, what a publication's buckets go through once they have landed), against a raw copy of
   the same number of bytes from one device buffer to another. On one GPU the learner and the engine share the
   device, so no NCCL group is measured here (NCCL refuses two ranks on one device); ``benchmarks/weight_sync.py``
   measures the group's stream against a raw broadcast.

Without CUDA it writes a skipped result and exits 0. vLLM is not in paddock's main environment: without it the
vLLM rows say so and the transformers rows are still measured. ``--smoke`` runs the same path on the CPU with the
tiny shape (in ``.venv-vllm`` for the vLLM half) and writes ``gpu_rollout_smoke.json``: a check of the script, not a
measurement.

    python benchmarks/gpu_rollout.py [--shape 1b] [--prompts 256] [--new-tokens 128] [--smoke] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _world import write_result

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN = 64
EOS = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_rollouts(
    model: Any, prompts: list[list[int]], new_tokens: int, device: torch.device
) -> tuple[int, float]:
    """(new tokens, seconds) of transformers' sampling over micro-batches under paddock's token budget."""
    from paddock.rollout.core import TOKEN_BUDGET, left_pad, micro_batches, sampling_kwargs

    torch.manual_seed(0)
    made = 0
    _sync(device)
    start = time.perf_counter()
    for group in micro_batches([len(p) + new_tokens for p in prompts], TOKEN_BUDGET):
        ids, mask = left_pad([prompts[i] for i in group])
        out = model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **sampling_kwargs(1.0, 1.0),
        )
        made += (out.shape[1] - ids.shape[1]) * len(group)
    _sync(device)
    return made, time.perf_counter() - start


def vllm_rollouts(engine: Any, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    out = engine.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seed=0)
    return sum(len(g.response_ids) for g in out), time.perf_counter() - start


def raw_copy_s(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--smoke", action="store_true", help="the tiny shape on the CPU: checks the script's path"
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.smoke:
        args.shape, args.prompts, args.new_tokens = "tiny", 16, 16
    cuda = torch.cuda.is_available()
    meta: dict[str, Any] = {"shape": args.shape, "prompts": args.prompts, "new_tokens": args.new_tokens}
    if not cuda and not args.smoke:
        write_result(args.out, "gpu_rollout", {**meta, "skipped": "no CUDA device"}, [])
        print("gpu_rollout: skipped (no CUDA device; --smoke checks the path on the CPU)")
        return
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    meta["device"] = torch.cuda.get_device_name() if cuda else "cpu (smoke)"

    from paddock.models import SHAPES, build_causal_lm

    vocab = SHAPES[args.shape].vocab_size
    model = build_causal_lm(args.shape, seed=0).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [
        [1, *torch.randint(3, vocab, (PROMPT_LEN - 1,), generator=g).tolist()] for _ in range(args.prompts)
    ]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the checkpoint vLLM starts from
        model = model.to(device)
        with torch.no_grad():
            hf_rollouts(model, prompts[:4], 4, device)  # warm-up
            tokens, seconds = hf_rollouts(model, prompts, args.new_tokens, device)
        hf_tps = tokens / seconds
        rows.append(
            {
                "part": "rollouts",
                "engine": "transformers",
                "tokens": tokens,
                "s": seconds,
                "tokens_per_s": hf_tps,
            }
        )
        print(f"transformers: {tokens} tokens in {seconds:.1f} s ({hf_tps:.0f}/s)", flush=True)

        if importlib.util.find_spec("vllm") is None:
            rows.append({"part": "rollouts", "engine": "vllm", "skipped": "vLLM is not installed here"})
        else:
            from paddock.rollout.vllm_engine import VllmEngine

            start = time.perf_counter()
            engine = VllmEngine(tmp, dtype=dtype, eos_id=EOS, on_gpu=cuda, memory_share=0.5 if cuda else 0.1)
            started = time.perf_counter() - start
            vllm_rollouts(engine, prompts[:4], 4)  # warm-up
            tokens, seconds = vllm_rollouts(engine, prompts, args.new_tokens)
            rows.append(
                {
                    "part": "rollouts",
                    "engine": "vllm",
                    "tokens": tokens,
                    "s": seconds,
                    "tokens_per_s": tokens / seconds,
                    "vs_transformers": tokens / seconds / hf_tps,
                    "start_s": started,
                }
            )
            print(
                f"vllm: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f}/s), started in {started:.0f} s"
            )
            state = model.state_dict()
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            loads = []
            for _ in range(3):
                _sync(device)
                start = time.perf_counter()
                engine.reload(iter(state.items()))
                _sync(device)
                loads.append(time.perf_counter() - start)
            load_s, raw_s = sorted(loads)[1], raw_copy_s(nbytes, device)
            rows.append(
                {
                    "part": "weight load",
                    "engine": "vllm",
                    "gb": nbytes / 1e9,
                    "s": load_s,
                    "raw_s": raw_s,
                    "vs_raw": load_s / raw_s,
                }
            )
            print(
                f"weight load: {nbytes / 1e9:.2f} GB in {load_s:.3f} s, raw copy {raw_s:.4f} s ({load_s / raw_s:.1f}x)"
            )
    path = write_result(args.out, "gpu_rollout_smoke" if args.smoke else "gpu_rollout", meta, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
