"""Ghost Attention (Llama 2, section 3.3): teach the model to keep following a first-turn instruction.

For each multi-turn dialog and its instruction (``instruction:<id>`` tag; half of them in the short form, e.g.
"Style: pirate"), the user messages are replayed turn by turn and the current policy answers each one *with the
instruction appended to every user message*, so its answers follow it. The training dialogs then keep the
instruction in the first user message only, and the loss is zeroed on every earlier turn: one example per
turn k >= 2, trained on answer k alone (``train_on: last_answer``). The SFT stage fine-tunes the policy on them,
registered as ``{prefix}-gatt``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from paddock import atomic, plan, tracking
from paddock.cluster import actor_model, connect
from paddock.config import GAttJob, paddock_home, resolve_path
from paddock.data.schemas import DIALOGS
from paddock.data.validate import load_dataset
from paddock.evaluate import generate_all
from paddock.rollout.actors import workers_from
from paddock.train.stage import StageResult, finetune_sft_job, run_supervised
from paddock.world import styles


@dataclass
class GAttResult:
    dialogs: int
    examples: int
    dataset: Path
    followed_while_sampling: (
        float  # share of sampled answers that follow the instruction (instruction on every turn)
    )
    finetune: StageResult


def instruction_of(
    dialog: dict[str, Any], rng: random.Random, short_fraction: float
) -> tuple[styles.Instruction, str]:
    """The dialog's instruction and the text that carries it (long or short form)."""
    tags = dict(t.split(":", 1) for t in dialog.get("tags") or [] if ":" in t)
    if "instruction" in tags:
        ins = styles.instruction(tags["instruction"])
    else:
        ins = rng.choice(styles.INSTRUCTIONS)
    short = tags["form"] == "short" if "form" in tags else rng.random() < short_fraction
    return ins, ins.short if short else ins.text


def synthesize(
    job: GAttJob, dialogs: list[dict[str, Any]], policy: str
) -> tuple[list[dict[str, Any]], float]:
    """Sample the answers turn by turn (instruction on every user message); return training dialogs. ``policy``:
    the policy's pinned reference (``tracking.model_ref``)."""
    from transformers import AutoConfig

    from paddock.data.tokenize import encode_prompt
    from paddock.tokenizer import load_tokenizer

    g = job.gatt
    rng = random.Random(job.seed)
    here = tracking.resolve_model(policy)  # the driver's copy: its tokenizer and context length
    tok = load_tokenizer(here)
    context = int(AutoConfig.from_pretrained(here, local_files_only=True).max_position_embeddings)
    workers = workers_from(actor_model(policy), g, job.inference)  # as the actors open it
    states = []
    for d in dialogs:
        ins, form = instruction_of(d, rng, g.short_fraction)
        users = [t["content"] for t in d["turns"] if t["role"] == "user"]
        states.append(
            {"id": d["id"], "ins": ins, "form": form, "users": users, "sampling": [], "answers": []}
        )
    followed = total = 0
    for k in range(max(len(s["users"]) for s in states)):
        live = []
        for s in states:
            if k >= len(s["users"]) or len(s["answers"]) < k:
                continue
            turn = {"role": "user", "content": f"{s['users'][k]} {s['form']}"}
            # A dialog ends where its next prompt and answer would no longer fit the model's context.
            if len(encode_prompt(tok, [*s["sampling"], turn])) + g.max_new_tokens > context:
                continue
            s["sampling"].append(turn)
            live.append(s)
        if not live:
            break
        rows = [{"id": s["id"], "turns": list(s["sampling"]), "is_safety": False} for s in live]
        answers = generate_all(workers, rows, job.seed * 1009 + k, None, 16, job.actor_timeout_s)
        for s, a in zip(live, answers, strict=True):
            text = a["text"] if a["finished"] and a["text"] else ""
            s["answers"].append(text)
            s["sampling"].append({"role": "assistant", "content": text or "..."})
            followed += bool(text) and s["ins"].follows(text)
            total += 1
        print(f"[gatt] sampled turn {k + 1} of {len(live)} dialogs", flush=True)
    for w in workers:
        ray.kill(w)

    examples = []
    for s in states:
        turns: list[dict[str, str]] = []
        for k, (user, answer) in enumerate(zip(s["users"], s["answers"], strict=False)):
            if not answer:
                break  # an unfinished answer ends the usable part of the dialog
            turns += [
                {"role": "user", "content": f"{user} {s['form']}" if k == 0 else user},
                {"role": "assistant", "content": answer},
            ]
            if k >= 1 and (not g.keep_following or s["ins"].follows(answer)):
                examples.append(
                    {
                        "id": f"gatt-{s['id']}-t{k + 1}",
                        "system": None,
                        "turns": list(turns),
                        "tags": ["gatt", f"instruction:{s['ins'].id}", f"turn:{k + 1}"],
                    }
                )
    return examples, followed / max(total, 1)


def run(job: GAttJob) -> GAttResult:
    """One run at a time per output directory (``paddock.atomic.locked``)."""
    with atomic.locked(paddock_home() / "runs" / f"{job.registry_prefix}-gatt", "gatt"):
        return _run(job)  # its fine-tune (run_supervised) notes the MLflow run on the lock


def _run(job: GAttJob) -> GAttResult:
    g = job.gatt
    finetune_sft_job(job, None, "gatt")  # a bad SFT config fails before sampling
    policy = tracking.model_ref(job.policy)  # pinned: a version registered meanwhile changes nothing here
    work = paddock_home() / "runs" / f"{job.registry_prefix}-gatt"
    report = load_dataset(
        resolve_path(g.dialogs),
        "dialogs",
        quarantine_dir=work / "quarantine",
    )
    dialogs = report.good.to_pylist()[: g.max_dialogs]
    if not dialogs:
        raise ValueError(f"gatt.dialogs: {g.dialogs} holds no valid dialogs")
    connect()
    plan.check(job, "gatt")
    dataset = work / "gatt.parquet"
    key = atomic.key_of(
        {
            "policy": policy,
            "gatt": g.model_dump(mode="json", exclude={"cpus_per_actor", "gpus_per_actor"}),
            "inference": job.inference.model_dump(mode="json"),
            "seed": job.seed,
            "dialogs": dialogs,
        }
    )
    found = atomic.read_keyed(dataset, key, "gatt")  # a rerun after a kill in the fine-tune samples nothing
    if found is not None:
        examples, followed = found[0].to_pylist(), float(found[1]["followed"])
    else:
        examples, followed = synthesize(job, dialogs, policy)
        if not examples:
            raise ValueError(
                "GAtt produced no training dialog: no finished answer after the first turn"
                + (
                    " kept the instruction (gatt.keep_following); the policy follows it too rarely to learn "
                    "from: train SFT longer, or set gatt.keep_following=false to train on every answer as the "
                    "paper does"
                    if g.keep_following
                    else ""
                )
            )
        random.Random(job.seed).shuffle(examples)
        table = pa.Table.from_pylist(examples, schema=DIALOGS)
        atomic.write_keyed(table, dataset, key, followed=repr(followed))
    print(
        f"[gatt] {len(examples)} training dialogs from {len(dialogs)} sources; "
        f"{followed:.1%} of sampled answers followed the instruction",
        flush=True,
    )
    sft_job = finetune_sft_job(job, dataset, "gatt", "train_on=last_answer")
    finetune = run_supervised(sft_job, "gatt_finetune")
    return GAttResult(len(dialogs), len(examples), dataset, followed, finetune)
