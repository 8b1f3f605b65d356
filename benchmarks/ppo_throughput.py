"""PPO throughput: the same tiny PPO run in synchronous and asynchronous mode, side by side in one script.

Both runs use the same freshly built tiny policy, value and reward models (random weights: answers run to the
length limit, so every iteration generates the same number of tokens), the same prompts, 2 rollout workers and
2 learners. Reported per mode: samples/s over the whole loop, the share of wall time spent generating, scoring,
training and syncing weights (generation and training overlap in async mode, so its shares add up to more than
1), the median iteration time, and the async/sync ratio.

    python benchmarks/ppo_throughput.py [--iterations 8] [--batch 32] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from _world import bench_world, write_result

REPO = Path(__file__).resolve().parents[1]


def build_models(home: Path, vocab: int, tok_dir: Path) -> Path:
    from paddock.models import build_causal_lm, load_scalar_model
    from paddock.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    policy = home / "models" / "policy"
    build_causal_lm("tiny", vocab_size=vocab, max_seq_len=256, seed=0).save_pretrained(policy)
    tok.save_pretrained(policy)
    rm = home / "models" / "rm"
    load_scalar_model(policy).save_pretrained(rm)
    tok.save_pretrained(rm)
    return home / "models"


def run_mode(mode: str, models: Path, tok_dir: Path, world: Path, args: argparse.Namespace) -> dict:
    from paddock.config import PPOJob, load_config
    from paddock.ppo.loop import run

    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        [
            f"tokenizer={tok_dir}",
            f"policy={models / 'policy'}",
            f"reward_helpfulness={models / 'rm'}",
            f"reward_safety={models / 'rm'}",
            f"ppo.prompts={world}/prompts/train.parquet",
            f"ppo.eval_prompts={world}/prompts/valid.parquet",
            f"ppo.mode={mode}",
            f"ppo.iterations={args.iterations}",
            f"ppo.batch_prompts={args.batch}",
            "ppo.mini_batch=16",
            f"ppo.max_new_tokens={args.max_new_tokens}",
            f"ppo.eval_every={args.iterations * 10}",  # evaluation only at the start and the end
            "ppo.eval_max_prompts=8",
            "ppo.patience=null",
            "ppo.kl_limit=null",
            f"ppo.checkpoint_every={args.iterations * 10}",
            f"registry_prefix=bench-{mode}",
        ],
    )
    result = run(job)
    hist = [h for h in result.history if "ppo/generate_s" in h]
    learner = [h for h in result.history if "ppo/train_s" in h]
    wall = result.wall_s
    samples = args.batch * result.iterations
    return {
        "mode": mode,
        "iterations": result.iterations,
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "share_generate": sum(h["ppo/generate_s"] for h in hist) / wall,
        "share_score": sum(h["ppo/score_s"] for h in hist) / wall,
        "share_train": sum(h["ppo/train_s"] for h in learner) / wall,
        "share_sync": sum(h.get("ppo/weight_sync_s", 0.0) for h in result.history) / wall,
        "gen_tokens_per_s": statistics.median(h["ppo/gen_tokens_per_s"] for h in hist),
        "train_tokens_per_s": statistics.median(h["ppo/train_tokens_per_s"] for h in learner),
        "staleness_mean": result.buffer["staleness_mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    home, world, tok_dir, _ = bench_world(
        "paddock-bench-ppo-", pretrain_mb=0.3, rl_prompts=200, vocab_size=1000
    )
    from paddock.cluster import connect
    from paddock.tokenizer import load_tokenizer

    models = build_models(home, len(load_tokenizer(tok_dir)), tok_dir)
    connect()
    rows = [run_mode(mode, models, tok_dir, world, args) for mode in ("sync", "async")]
    sync = rows[0]
    for r in rows:
        r["ratio_to_sync"] = r["samples_per_s"] / sync["samples_per_s"]

    meta = {
        "iterations": args.iterations,
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "rollout_workers": 2,
        "learners": 2,
    }
    write_result(args.out, "ppo_throughput", meta, rows)
    print(f"\nPPO throughput (tiny, batch {args.batch}, {args.iterations} iterations, {os.cpu_count()} CPUs)")
    print(
        f"{'mode':<6} {'samples/s':>10} {'generate':>9} {'score':>7} {'train':>7} {'sync':>7} "
        f"{'staleness':>10} {'vs sync':>8}"
    )
    for r in rows:
        print(
            f"{r['mode']:<6} {r['samples_per_s']:>10.2f} {r['share_generate']:>9.1%} {r['share_score']:>7.1%} "
            f"{r['share_train']:>7.1%} {r['share_sync']:>7.1%} {r['staleness_mean']:>10.2f} "
            f"{r['ratio_to_sync']:>8.2f}"
        )


if __name__ == "__main__":
    main()
