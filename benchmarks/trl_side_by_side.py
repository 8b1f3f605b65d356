"""paddock against TRL on the same model, tokens and hyperparameters: SFT and reward-model training.

Both sides read identical inputs: paddock's packed SFT windows (ids and answer-only loss mask) and its tokenised
preference pairs with their margins, from one tiny world and tokenizer, starting from the same weights. paddock
runs its stage (Ray Train, 2 workers x 1 thread, ZeRO-2); TRL runs `SFTTrainer` / `RewardTrainer` in one process
with 2 threads (equal cores), with the same optimiser (AdamW 0.9/0.95, eps 1e-5, weight decay 0.1, clip 1.0),
schedule (cosine with warmup), global batch and number of steps. Reported per side: wall time of the whole run,
steady-state tokens/s (median step after warmup), peak resident memory of the training processes, and quality
read the same way for both: perplexity on held-out answers (SFT) and accuracy on held-out pairs (reward model).
Online RL against TRL is not here yet.

    pip install -e '.[bench]'   # TRL and its datasets/accelerate
    python benchmarks/trl_side_by_side.py [--sft-steps 60] [--rm-steps 60] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _world import bench_world, write_result

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, RM_SEQ_LEN, GLOBAL_BATCH, LR, RM_LR, WARMUP = 256, 128, 16, 1e-3, 5e-4, 5


class WorkerMemory:
    """Peak summed RSS of Ray Train worker processes, sampled every 0.2 s while a paddock stage runs."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if (
                    any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))
                    and p.info["memory_info"]
                ):
                    rss += p.info["memory_info"].rss
            self.peak = max(self.peak, rss)
            time.sleep(0.2)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def paddock_stage(kind: str, overrides: list[str]) -> dict[str, Any]:
    from paddock.config import RewardJob, SFTJob, load_config
    from paddock.train.stage import run_supervised

    cls, config, stage = (
        (SFTJob, "sft.yaml", "sft")
        if kind == "sft"
        else (RewardJob, "reward_helpfulness.yaml", "reward_helpfulness")
    )
    job = load_config(cls, REPO / "jobs/configs/tiny" / config, overrides)
    start = time.monotonic()
    with WorkerMemory() as mem:
        result = run_supervised(job, stage)
    steps = job.train.max_steps or 0
    hist = [h for h in result.history if WARMUP < h["step"] < steps]
    return {
        "wall_s": time.monotonic() - start,
        "tokens_per_s": statistics.median(h["train/tokens_per_s"] for h in hist),
        "peak_rss_gb": mem.peak / 1e9,
        "checkpoint": str(result.checkpoint_dir),
    }


def _trl_child(
    kind: str, data: dict[str, Any], init: str, tok_dir: str, out: str, steps: int, queue: Any
) -> None:
    """One TRL run in its own process (so that its peak RSS is its own), 2 threads."""
    torch.set_num_threads(2)
    from datasets import Dataset
    from paddock.models import PAD_ID, load_causal_lm, load_scalar_model
    from paddock.tokenizer import load_tokenizer
    from transformers import TrainerCallback

    tok = load_tokenizer(tok_dir)
    pad = tok.convert_ids_to_tokens(PAD_ID)
    common = {
        "output_dir": out,
        "per_device_train_batch_size": GLOBAL_BATCH,
        "max_steps": steps,
        "learning_rate": LR if kind == "sft" else RM_LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": WARMUP,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-5,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "dataloader_num_workers": 0,
        "seed": 0,
        "pad_token": pad,
        "disable_tqdm": True,
    }
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter() - self.t0)

    start = time.monotonic()
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer: Any = SFTTrainer(
            model=load_causal_lm(init),
            args=SFTConfig(**common, max_length=SEQ_LEN, packing=False, completion_only_loss=True),
            train_dataset=Dataset.from_dict(data),
            processing_class=tok,
            callbacks=[StepTimes()],
        )
        tokens_per_step = GLOBAL_BATCH * SEQ_LEN
    else:
        from trl import RewardConfig, RewardTrainer

        model = load_scalar_model(init)
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**common, max_length=RM_SEQ_LEN, center_rewards_coefficient=None),
            train_dataset=Dataset.from_dict(data),
            processing_class=tok,
            callbacks=[StepTimes()],
        )
        tokens_per_step = 2 * GLOBAL_BATCH * RM_SEQ_LEN  # paddock counts padded pair windows the same way
    trainer.train()
    trainer.model.config.pad_token_id = PAD_ID
    trainer.save_model(out)
    queue.put(
        {
            "wall_s": time.monotonic() - start,
            "tokens_per_s": tokens_per_step / statistics.median(times[WARMUP:]),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "checkpoint": out,
        }
    )


def trl_run(
    kind: str, data: dict[str, Any], init: str, tok_dir: Path, out: Path, steps: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_trl_child, args=(kind, data, init, str(tok_dir), str(out), steps, queue))
    p.start()
    result = queue.get(timeout=3600)
    p.join()
    return result


def rm_accuracy(model_dir: str, pairs: dict[str, Any]) -> float:
    """Share of held-out pairs whose chosen answer outscores the rejected one, scored as paddock's reward stage
    scores them in training (``pair_scores`` on ``TokenizePairs``' padded ids)."""
    from paddock.models import load_scalar_model
    from paddock.train.loop import pair_scores

    model = load_scalar_model(model_dir).eval()
    wins: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(pairs["chosen_ids"]), 64):
            batch = {k: torch.from_numpy(pairs[k][i : i + 64]) for k in ("chosen_ids", "rejected_ids")}
            chosen, rejected = pair_scores(model, batch)
            wins += (chosen > rejected).tolist()
    return sum(wins) / len(wins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--rm-steps", type=int, default=60)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit("trl_side_by_side: TRL is not installed; pip install -e '.[bench]'") from None

    home, world, tok_dir, _ = bench_world(
        "paddock-bench-trl-", pretrain_mb=0.3, rl_prompts=20, vocab_size=2000, dialogs=1500
    )
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from paddock.cluster import connect
    from paddock.data.tokenize import IGNORE
    from paddock.evaluate import answer_perplexity
    from paddock.models import PAD_ID, build_causal_lm
    from paddock.tokenizer import load_tokenizer
    from paddock.train.data import TokenizeAndPack, TokenizePairs

    tok = load_tokenizer(tok_dir)
    init = home / "init"
    build_causal_lm("tiny", len(tok), SEQ_LEN, seed=0).save_pretrained(init, safe_serialization=True)
    tok.save_pretrained(init)

    # The same tokens for both: paddock's packed windows and tokenised pairs.
    windows = TokenizeAndPack(str(tok_dir), "dialogs", SEQ_LEN)(
        pq.read_table(world / "sft" / "train.parquet")
    )
    sft_data = {
        "input_ids": windows["input_ids"].tolist(),
        "completion_mask": (windows["labels"] != IGNORE).astype(int).tolist(),
    }
    pairs_fn = TokenizePairs(str(tok_dir), RM_SEQ_LEN, "small")

    def unpadded(table: Any) -> dict[str, Any]:
        p = pairs_fn(table)
        strip = lambda a: [[t for t in row if t != PAD_ID] for row in a.tolist()]  # noqa: E731
        return {
            "chosen_ids": strip(p["chosen_ids"]),
            "rejected_ids": strip(p["rejected_ids"]),
            "margin": p["margin"].tolist(),
        }

    test_prefs = pq.read_table(world / "preferences" / "test.parquet")
    rm_test = pairs_fn(test_prefs.filter(pc.equal(test_prefs["kind"], "helpfulness")))
    held_out = pq.read_table(world / "sft" / "test.parquet").to_pylist()[:100]

    connect()
    common = [
        f"tokenizer={tok_dir}",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.zero_stage=2",
    ]
    rows = []
    sft_paddock = paddock_stage(
        "sft",
        [
            *common,
            f"model.init_from={init}",
            f"data.train={world}/sft/train.parquet",
            f"data.test={world}/sft/test.parquet",
            f"data.seq_len={SEQ_LEN}",
            f"train.micro_batch_size={GLOBAL_BATCH // 2}",
            f"train.max_steps={args.sft_steps}",
            f"train.eval_every={args.sft_steps * 10}",
            f"optim.lr={LR}",
            f"optim.warmup_steps={WARMUP}",
            "registry_prefix=bench-trl",
        ],
    )
    sft_trl = trl_run("sft", sft_data, str(init), tok_dir, home / "trl-sft", args.sft_steps)
    for side, r in (("paddock", sft_paddock), ("TRL", sft_trl)):
        r["quality"] = answer_perplexity(r.pop("checkpoint"), held_out, SEQ_LEN)
        rows.append({"name": f"SFT, {side}", "quality_metric": "held-out answer perplexity", **r})

    # Both reward models start from paddock's SFT result and read the pairs paddock's stage mixed (helpfulness
    # plus as many safety pairs, Llama 2's recipe), which it writes under its run directory.
    rm_init = str(home / "runs" / "bench-trl-sft" / "final")
    rm_paddock = paddock_stage(
        "rm",
        [
            *common,
            f"model.init_from={rm_init}",
            f"data.train={world}/preferences/train.parquet",
            f"data.test={world}/preferences/test.parquet",
            f"data.seq_len={RM_SEQ_LEN}",
            f"train.micro_batch_size={GLOBAL_BATCH // 2}",
            f"train.max_steps={args.rm_steps}",
            f"train.eval_every={args.rm_steps * 10}",
            f"optim.lr={RM_LR}",
            "registry_prefix=bench-trl",
        ],
    )
    rm_train = unpadded(
        pq.read_table(home / "runs" / "bench-trl-rm-helpfulness" / "data" / "train-helpfulness.parquet")
    )
    rm_trl = trl_run("rm", rm_train, rm_init, tok_dir, home / "trl-rm", args.rm_steps)
    for side, r in (("paddock", rm_paddock), ("TRL", rm_trl)):
        r["quality"] = rm_accuracy(r.pop("checkpoint"), rm_test)
        rows.append({"name": f"reward model, {side}", "quality_metric": "held-out pair accuracy", **r})
    for a, b in ((rows[0], rows[1]), (rows[2], rows[3])):
        a["tokens_per_s_vs_trl"] = a["tokens_per_s"] / b["tokens_per_s"]
        a["wall_vs_trl"] = a["wall_s"] / b["wall_s"]

    meta = {
        "trl": trl.__version__,
        "shape": "tiny",
        "global_batch": GLOBAL_BATCH,
        "sft_steps": args.sft_steps,
        "rm_steps": args.rm_steps,
    }
    write_result(args.out, "trl_side_by_side", meta, rows)
    print(f"\npaddock vs TRL {trl.__version__} (tiny model, {os.cpu_count()} CPUs, equal cores)")
    print(f"{'run':<24} {'wall s':>8} {'tokens/s':>10} {'peak GB':>8} {'quality':>9}")
    for r in rows:
        print(
            f"{r['name']:<24} {r['wall_s']:>8.1f} {r['tokens_per_s']:>10.0f} {r['peak_rss_gb']:>8.2f} {r['quality']:>9.3f}"
        )


if __name__ == "__main__":
    main()
