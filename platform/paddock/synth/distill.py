"""Safety context distillation (Llama 2, section 4.2.4): the safety preprompt's effect, without the preprompt.

For each adversarial (safety) prompt the policy answers twice: with the safety preprompt as its system prompt
(optionally with an answer template) and without it. The preprompted answer is kept only when the safety reward
model scores it above the plain answer (the paper's targeted distillation: it avoids distilling where the
preprompt makes answers worse or vaguer). The kept (prompt without preprompt, answer) pairs fine-tune the policy
with the SFT stage, registered as ``{prefix}-cd``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from paddock import atomic, plan, tracking
from paddock.cluster import actor_model, connect, gather
from paddock.config import DistillJob, paddock_home, resolve_path
from paddock.data.schemas import DIALOGS
from paddock.data.validate import load_dataset
from paddock.evaluate import generate_all
from paddock.rollout.actors import Scorer, actor_options, workers_from
from paddock.train.stage import StageResult, finetune_sft_job, run_supervised


@dataclass
class DistillResult:
    prompts: int
    kept: int
    mean_safety_with: float
    mean_safety_without: float
    dataset: Path
    finetune: StageResult


def distilled(
    job: DistillJob, prompts: list[dict[str, Any]], policy: str, rm_s: str
) -> tuple[list[dict[str, Any]], float, float]:
    """The preprompted answers the safety reward model prefers to the plain ones, as training dialogs without
    the preprompt (repeated up to ``distill.min_examples``), and the mean safety scores with and without it."""
    d = job.distill
    system = d.preprompt + (f" {d.answer_template}" if d.answer_template else "")
    workers = workers_from(policy, d, job.inference)
    opts = actor_options(d.cpus_per_actor, d.gpus_per_actor)
    scorer = Scorer.options(**opts).remote(rm_s, "reward", seq_len=d.seq_len, **job.inference.model_dump())  # type: ignore[attr-defined]
    t = job.actor_timeout_s
    with_pre = generate_all(workers, [p | {"system": system} for p in prompts], job.seed, None, 16, t)
    without = generate_all(workers, prompts, job.seed, None, 16, t)
    turns = [p["turns"] for p in prompts]
    s_with, s_without = gather(
        {
            "the safety reward model (answers with the preprompt)": scorer.rewards.remote(
                turns, [r["text"] for r in with_pre]
            ),
            "the safety reward model (answers without it)": scorer.rewards.remote(
                turns, [r["text"] for r in without]
            ),
        },
        t,
        f"scoring {len(prompts)} answers with and without the preprompt",
    )
    for a in [*workers, scorer]:
        ray.kill(a)
    kept = [
        {
            "id": f"cd-{p['id']}",
            "system": None,
            "turns": [*p["turns"], {"role": "assistant", "content": r["text"]}],
            "tags": ["context_distillation"],
        }
        for p, r, a, b in zip(prompts, with_pre, s_with, s_without, strict=True)
        if r["finished"] and r["text"] and a > b
    ]
    mean_with, mean_without = sum(s_with) / len(s_with), sum(s_without) / len(s_without)
    print(
        f"[context_distillation] kept {len(kept)} of {len(prompts)} preprompted answers (safety RM: "
        f"{mean_with:.3f} with the preprompt, {mean_without:.3f} without)",
        flush=True,
    )
    if not kept:
        unfinished = sum(not r["finished"] for r in with_pre)
        why = "the preprompt never raised the safety score"
        if unfinished:
            why = (
                f"{unfinished} of {len(with_pre)} preprompted answers ran past distill.max_new_tokens="
                f"{d.max_new_tokens} without ending (only finished answers are kept); raise it"
            )
        raise ValueError(f"context distillation kept no answer: {why}")
    if len(kept) < d.min_examples:
        print(
            f"[context_distillation] repeating the {len(kept)} kept answers up to distill.min_examples="
            f"{d.min_examples} so that the fine-tune takes full steps",
            flush=True,
        )
        kept = [
            kept[i % len(kept)] | {"id": f"{kept[i % len(kept)]['id']}-r{i // len(kept)}"}
            for i in range(d.min_examples)
        ]
    return kept, mean_with, mean_without


def run(job: DistillJob) -> DistillResult:
    """One run at a time per output directory (``paddock.atomic.locked``)."""
    with atomic.locked(paddock_home() / "runs" / f"{job.registry_prefix}-cd", "context_distillation"):
        return _run(job)  # its fine-tune (run_supervised) notes the MLflow run on the lock


def _run(job: DistillJob) -> DistillResult:
    d = job.distill
    finetune_sft_job(job, None, "cd")  # a bad SFT config fails before sampling
    # pinned (a version registered meanwhile changes nothing here); a missing model fails before Ray starts
    policy, rm_s = tracking.model_ref(job.policy), tracking.model_ref(job.reward_safety)
    work = paddock_home() / "runs" / f"{job.registry_prefix}-cd"
    report = load_dataset(
        resolve_path(d.prompts),
        "prompts",
        quarantine_dir=work / "quarantine",
    )
    prompts = [r for r in report.good.to_pylist() if r["is_safety"]][: d.max_prompts]
    if not prompts:
        raise ValueError(f"distill.prompts: {d.prompts} holds no safety prompts (is_safety true)")
    connect()
    plan.check(job, "context_distillation")
    dataset = work / "distilled.parquet"
    key = atomic.key_of(
        {
            "models": [policy, rm_s],
            "distill": d.model_dump(mode="json", exclude={"cpus_per_actor", "gpus_per_actor"}),
            "inference": job.inference.model_dump(mode="json"),
            "seed": job.seed,
            "prompts": prompts,
        }
    )
    found = atomic.read_keyed(dataset, key, "context_distillation")  # a rerun after a kill samples nothing
    if found is not None:
        kept = found[0].to_pylist()
        mean_with, mean_without = float(found[1]["safety_with"]), float(found[1]["safety_without"])
    else:
        kept, mean_with, mean_without = distilled(job, prompts, actor_model(policy), actor_model(rm_s))
        random.Random(job.seed).shuffle(kept)
        table = pa.Table.from_pylist(kept, schema=DIALOGS)
        atomic.write_keyed(
            table, dataset, key, safety_with=repr(mean_with), safety_without=repr(mean_without)
        )
    finetune = run_supervised(finetune_sft_job(job, dataset, "cd"), "context_distillation")
    tracking.tag_run(
        finetune.run_id,
        {
            "paddock.cd.prompts": str(len(prompts)),
            "paddock.cd.kept": str(len(kept)),
            "paddock.cd.safety_with_preprompt": f"{mean_with:.4f}",
            "paddock.cd.safety_without_preprompt": f"{mean_without:.4f}",
        },
    )
    return DistillResult(len(prompts), len(kept), mean_with, mean_without, dataset, finetune)
