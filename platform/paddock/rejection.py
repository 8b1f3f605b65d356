"""Rejection-sampling fine-tuning (Llama 2, section 3.2.3).

For each prompt, K answers are sampled from the policy by the rollout workers, scored by both reward models,
and combined as in the paper (the safety score for safety prompts or when it is below 0.15, else the
helpfulness score). The best finished answer per prompt is kept; later rounds pool the best answers of all
earlier rounds (``pool: last_round`` reproduces the variant that regressed in the paper). The kept set is
written as an SFT dataset and fine-tuned with the SFT stage, registered as ``{prefix}-rs``.

The best-of-N curve (maximum and median combined reward over the first N samples, N = 1..K) is logged as
metrics and a plot: the gap between them is what rejection sampling harvests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from paddock import atomic, plan, tracking
from paddock.cluster import actor_model, connect, gather
from paddock.config import RejectionJob, paddock_home, resolve_path
from paddock.data.schemas import DIALOGS
from paddock.data.validate import load_dataset
from paddock.rlhf.ppo import best_of_n_curve
from paddock.rollout.actors import Scorer, actor_options, combined_scores, start_workers
from paddock.train.stage import StageResult, finetune_sft_job, run_supervised

POOL_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("turns", DIALOGS.field("turns").type),
        ("answer", pa.string()),
        ("reward", pa.float64()),
        ("round", pa.int64()),
    ]
)


@dataclass
class RejectionResult:
    kept: int
    skipped: int
    mean_reward: float
    mean_best_reward: float
    best_of_n_max: list[float]
    best_of_n_median: list[float]
    dataset: Path
    finetune: StageResult | None


def curve_figure(maxima: list[float], medians: list[float], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = list(range(1, len(maxima) + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, maxima, "o-", label="max over N samples")
    ax.plot(n, medians, "s--", label="median over N samples")
    ax.fill_between(n, medians, maxima, alpha=0.15, label="what rejection sampling harvests")
    ax.set_xlabel("N samples per prompt")
    ax.set_ylabel("combined reward (sigmoid scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def sample_and_score(
    job: RejectionJob, prompts: list[dict[str, Any]]
) -> tuple[list[list[dict[str, Any]]], torch.Tensor]:
    """K scored samples per prompt: (samples[prompt][k], combined rewards (prompts, K))."""
    rc = job.rejection
    # as the actors open them: the driver's paths on one node, pinned registry URIs on several
    policy, rm_h, rm_s = (actor_model(u) for u in (job.policy, job.reward_helpfulness, job.reward_safety))
    opts = actor_options(rc.cpus_per_worker, rc.gpus_per_actor)
    workers = start_workers(
        policy,
        rc.rollout_workers,
        max_new_tokens=rc.max_new_tokens,
        temperature=rc.temperature,
        top_p=rc.top_p,
        num_cpus=rc.cpus_per_worker,
        num_gpus=rc.gpus_per_actor,
        inference=job.inference.model_dump(),
    )
    inf = job.inference.model_dump()
    helpful = Scorer.options(**opts).remote(rm_h, "reward", seq_len=rc.seq_len, **inf)  # type: ignore[attr-defined]
    safety = Scorer.options(**opts).remote(rm_s, "reward", seq_len=rc.seq_len, **inf)  # type: ignore[attr-defined]

    batches = [prompts[i : i + rc.batch_prompts] for i in range(0, len(prompts), rc.batch_prompts)]
    calls = []
    for b, batch in enumerate(batches):
        for k in range(rc.k):
            w = (b * rc.k + k) % len(workers)
            seed = hash((job.seed, rc.round, b, k)) % 2**31
            calls.append((b, k, w, workers[w].generate.remote(batch, seed=seed)))
    samples: list[list[dict[str, Any]]] = [[{} for _ in range(rc.k)] for _ in prompts]
    for n, (b, k, w, ref) in enumerate(calls, 1):
        [rows] = gather(
            {f"rollout worker {w}": ref}, job.actor_timeout_s, f"sampling batch {b}, answer {k + 1}"
        )
        for j, row in enumerate(rows):
            samples[b * rc.batch_prompts + j][k] = row
        if n % max(1, len(calls) // 10) == 0 or n == len(calls):
            print(
                f"[rejection_sampling] sampled {n}/{len(calls)} batches of {rc.batch_prompts} prompts",
                flush=True,
            )
    flat = [s for per_prompt in samples for s in per_prompt]
    turns = [prompts[i]["turns"] for i in range(len(prompts)) for _ in range(rc.k)]
    texts = [s["text"] for s in flat]
    r_h, r_s, combined = combined_scores(
        helpful, safety, turns, texts, [s["is_safety"] for s in flat], job.actor_timeout_s
    )
    combined = combined.reshape(len(prompts), rc.k)
    for s, h, sa, c in zip(flat, r_h.tolist(), r_s.tolist(), combined.flatten().tolist(), strict=True):
        s |= {"reward_helpfulness": h, "reward_safety": sa, "reward_combined": c}
    for actor in [*workers, helpful, safety]:
        ray.kill(actor)
    return samples, combined


SAMPLES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("k", pa.int64()),
        ("text", pa.string()),
        ("finished", pa.bool_()),
        ("reward_helpfulness", pa.float64()),
        ("reward_safety", pa.float64()),
        ("reward_combined", pa.float64()),
    ]
)


def samples_key(job: RejectionJob, prompts: list[dict[str, Any]]) -> str:
    """What a round's scored samples depend on: the policy's and reward models' registered versions (``@latest``
    resolved), the sampling settings, the seed and the prompts (their text). A rerun with the same key reuses them."""
    rc = job.rejection
    return atomic.key_of(
        {
            "models": [
                tracking.model_ref(u) for u in (job.policy, job.reward_helpfulness, job.reward_safety)
            ],
            "sampling": rc.model_dump(
                mode="json",
                include={"k", "temperature", "top_p", "max_new_tokens", "batch_prompts", "round", "seq_len"},
            ),
            "inference": job.inference.model_dump(mode="json"),
            "seed": job.seed,
            "prompts": prompts,
        }
    )


def scored_samples(
    job: RejectionJob, prompts: list[dict[str, Any]], path: Path
) -> tuple[list[list[dict[str, Any]]], torch.Tensor]:
    """``sample_and_score``, kept in ``path``: a rerun of the round after a kill (in the fine-tuning, say) reads
    the samples back instead of drawing them again, when nothing they depend on changed (``samples_key``)."""
    # the models pinned once: the samples drawn are the ones the key names, whatever registers meanwhile
    job = job.model_copy(
        update={
            u: tracking.model_ref(getattr(job, u)) for u in ("policy", "reward_helpfulness", "reward_safety")
        }
    )
    key = samples_key(job, prompts)
    k = job.rejection.k
    found = atomic.read_keyed(path, key, "rejection_sampling")
    if found is not None:
        rows = found[0].to_pylist()
        samples = [rows[i * k : (i + 1) * k] for i in range(len(prompts))]
        combined = torch.tensor([[s["reward_combined"] for s in per] for per in samples], dtype=torch.float32)
        return samples, combined
    samples, combined = sample_and_score(job, prompts)
    rows = [
        {"prompt_id": p["id"], "k": j, **{f: s[f] for f in SAMPLES_SCHEMA.names[2:]}}
        for p, per in zip(prompts, samples, strict=True)
        for j, s in enumerate(per)
    ]
    atomic.write_keyed(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), path, key)
    return samples, combined


def run(job: RejectionJob) -> RejectionResult:
    """One run at a time per output directory (``paddock.atomic.locked``)."""
    with atomic.locked(paddock_home() / "runs" / f"{job.registry_prefix}-rs", "rejection_sampling") as lock:
        return _run(job, lock)


def _run(job: RejectionJob, lock: atomic.Lock) -> RejectionResult:
    rc = job.rejection
    finetune_sft_job(job, None, "rs")  # a bad SFT config fails before sampling
    connect()
    plan.check(job, "rejection_sampling")
    report = load_dataset(
        resolve_path(rc.prompts),
        "prompts",
        quarantine_dir=paddock_home() / "runs" / f"{job.registry_prefix}-rs" / "quarantine",
    )
    prompts = report.good.to_pylist()[: rc.max_prompts]
    work = paddock_home() / "runs" / f"{job.registry_prefix}-rs"
    with tracking.stage_run(
        job.experiment,
        "rejection_sampling",
        job.model_dump(mode="json"),
        tags={"paddock.upstream": job.policy},
    ) as run:
        tracking.claim(lock, "rejection_sampling", run)
        run.log_dataset(resolve_path(rc.prompts), "prompts", "sampling", report.total, report.n_bad)
        samples, combined = scored_samples(job, prompts, work / f"round{rc.round}" / "samples.parquet")
        maxima, medians = best_of_n_curve(combined)
        for n, (mx, md) in enumerate(zip(maxima, medians, strict=True), 1):
            run.log_metrics({"rs/best_of_n_max": mx, "rs/best_of_n_median": md}, step=n)
        run.log_figure(curve_figure(maxima, medians, f"best of N, round {rc.round}"), "plots/best_of_n.png")

        best_rows, skipped = [], 0
        for p, per_prompt in zip(prompts, samples, strict=True):
            finished = [s for s in per_prompt if s["finished"] and s["text"]]
            if not finished:
                skipped += 1
                continue
            top = max(finished, key=lambda s: s["reward_combined"])
            best_rows.append(
                {
                    "prompt_id": p["id"],
                    "turns": p["turns"],
                    "answer": top["text"],
                    "reward": top["reward_combined"],
                    "round": rc.round,
                }
            )
        pool_path = work / "pool.parquet"
        earlier = (
            pq.read_table(pool_path).to_pylist() if pool_path.is_file() and rc.pool == "all_rounds" else []
        )
        earlier = [r for r in earlier if r["round"] < rc.round]
        pool: dict[str, dict[str, Any]] = {}
        for r in earlier + best_rows:
            if r["prompt_id"] not in pool or r["reward"] > pool[r["prompt_id"]]["reward"]:
                pool[r["prompt_id"]] = r
        work.mkdir(parents=True, exist_ok=True)
        atomic.write_parquet(pa.Table.from_pylist(earlier + best_rows, schema=POOL_SCHEMA), pool_path)
        kept = [
            {
                "id": f"rs-{r['prompt_id']}",
                "system": None,
                "turns": [*r["turns"], {"role": "assistant", "content": r["answer"]}],
                "tags": ["rs", f"round:{r['round']}"],
            }
            for r in pool.values()
        ]
        random.Random(job.seed).shuffle(kept)
        dataset = work / f"round{rc.round}" / "kept.parquet"
        dataset.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_parquet(pa.Table.from_pylist(kept, schema=DIALOGS), dataset)
        mean_all = combined.mean().item()
        mean_best = sum(r["reward"] for r in pool.values()) / max(1, len(pool))
        run.log_metrics(
            {
                "rs/mean_reward_all": mean_all,
                "rs/mean_reward_kept": mean_best,
                "rs/kept": len(kept),
                "rs/skipped_unfinished": skipped,
                "rs/finished_rate": sum(s["finished"] for ps in samples for s in ps) / combined.numel(),
            },
            step=rc.round,
        )
        run.log_artifact(dataset, "kept")
        print(
            f"[rejection_sampling] kept {len(kept)} answers (mean combined reward {mean_best:.3f} vs {mean_all:.3f} "
            f"over all samples); {skipped} prompts had no finished answer",
            flush=True,
        )

    finetune = run_supervised(finetune_sft_job(job, dataset, "rs"), "rs_finetune")
    return RejectionResult(len(kept), skipped, mean_all, mean_best, maxima, medians, dataset, finetune)
