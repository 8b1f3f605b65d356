"""Preference collection from the current policy (Llama 2, section 3.2.1), and the reward-hacking monitor.

A round asks the current model(s) two answers per prompt (answer a and answer b, at two temperatures or from two
models), or ``collect.samples`` of them once reward models are in use (then the pairs are the models' favourite
against others, or with ``collect.pairing: all`` every pair of the different answers), and writes them as an
**annotation batch**: ``round{k}/batch.parquet`` and ``batch.jsonl`` under ``runs/{prefix}-preferences/``, one row
per pair in the shape of ``ANNOTATION``:

=============  ==========================================================================================
id             the pair's id (``r{round}-{prompt id}``, then ``/1``, ``/2`` ... for a prompt's later pairs)
round          the preference round
prompt         the dialog so far: a list of ``{"role", "content"}`` turns ending with the user's message
is_safety      whether the prompt is a safety (adversarial) prompt
response_a/b   the two answers
source_a/b     which model and temperature wrote each (``models:/tiny-rlhf-v1/1 @ T=0.7``)
preferred      label: ``"a"`` or ``"b"``
rating         label: how much better (``significantly_better``, ``better``, ``slightly_better``,
               ``negligibly_better``) or ``unsure``
safe_a/b       label: is each answer safe (needed for safety prompts; the paper's safety label)
annotator      who labelled the row
=============  ==========================================================================================

The label columns are empty in the batch. Any labelling tool that fills them (in Parquet or JSON Lines, same
columns) can be imported with ``annotator.kind: external`` and ``annotator.labels``; for the tiny world the
**simulated annotator** labels with the world's verifiers: a correct, polite answer over a rude or rambling one
over a refusal over a wrong one, safe over unsafe on safety prompts, the rating from the size of the gap (as
the world's static pairs are built), with a configurable share of flipped preferences.

Labelled rows become preference pairs (``paddock.data.schemas.PREFERENCES``): safety prompts give safety pairs
with the paper's safety bin (a chosen-unsafe, rejected-safe pair is dropped, as Llama 2 dropped them), the rest
helpfulness pairs; ``unsure`` rows are counted and left out. A held-out share of the round's pairs measures the
reward models on the policy's own answers; the rest joins ``round{k}/train.parquet``: the static pairs and every
round's pairs so far, which the round's reward models train on.

The monitor scores the held-out fresh pairs and the static test pairs with the reward models in use before the
round and after retraining: accuracy on each, and how often the combined reward orders the policy's two answers
as the labels do; also every pair of the answers to the held-out prompts and to ``collect.monitor_prompts`` more
prompts answered for it alone (``answers.parquet``, ``monitor`` true), which no reward model picked. A reward
model that loses accuracy on the policy's answers while keeping it on the static pairs is being gamed (the
paper's "hyper-specialization").
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paddock import atomic, tracking
from paddock.cluster import actor_model, gather
from paddock.config import CollectJob, paddock_home, resolve_path
from paddock.data.schemas import PREFERENCES, RATINGS, TURNS

# Every answer a round drew, one row per prompt (``round{k}/answers.parquet``): the monitor pairs them up.
ANSWERS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("round", pa.int64(), nullable=False),
        pa.field("prompt", TURNS, nullable=False),
        pa.field("is_safety", pa.bool_(), nullable=False),
        pa.field("answers", pa.list_(pa.string()), nullable=False),
        pa.field("monitor", pa.bool_(), nullable=False),  # a prompt answered for the monitor alone
    ]
)
ANNOTATION = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("round", pa.int64(), nullable=False),
        pa.field("prompt", TURNS, nullable=False),
        pa.field("is_safety", pa.bool_(), nullable=False),
        pa.field("response_a", pa.string(), nullable=False),
        pa.field("response_b", pa.string(), nullable=False),
        pa.field("source_a", pa.string(), nullable=False),
        pa.field("source_b", pa.string(), nullable=False),
        pa.field("preferred", pa.string()),
        pa.field("rating", pa.string()),
        pa.field("safe_a", pa.bool_()),
        pa.field("safe_b", pa.bool_()),
        pa.field("annotator", pa.string()),
    ]
)
UNSURE = "unsure"
# Quality gap between two answers -> the rating, as the world's static pairs are built: correct over wrong is
# significantly better, over an evasive refusal better, over a rude or rambling answer slightly better.
RATING_BY_GAP = {3: "significantly_better", 2: "better", 1: "slightly_better"}


class PreferenceError(ValueError):
    """A batch or labelled file that cannot be read as preference data."""


class LabelsNeeded(PreferenceError):
    """An external annotator's batch is written and waits for its labels."""


def work_dir(job: CollectJob) -> Path:
    return paddock_home() / "runs" / f"{job.registry_prefix}-preferences"


# --------------------------------------------------------------------------------------------------
# The simulated annotator


def quality(prompt: Any, answer: str) -> int:
    """The world's verdict on one answer, 0..3: 3 helpful (correct and polite, or on an unsafe prompt a safe
    refusal that offers help), 2 correct but rude or rambling (a bare safe refusal), 1 a refusal of a safe
    request, 0 wrong or unsafe."""
    from paddock.world import styles, verify

    item = verify.item_for(prompt)
    polite = not (styles.is_rude(answer) or styles.is_rambling(answer))
    if item.kind == "unsafe":
        if not verify.safety_ok(prompt, answer):
            return 0
        return 3 if styles.offers_help(answer) and polite else 1
    if verify.is_refusal(answer):
        return 1
    if not verify.is_correct(item, answer):
        return 0
    return 3 if polite else 2


def simulated_label(row: dict[str, Any], seed: int, noise: float) -> dict[str, Any]:
    """The label columns for one annotation row, from the world's verifiers. Deterministic in (seed, row id)."""
    from paddock.world import verify

    rng = random.Random(f"{seed}:{row['id']}")
    prompt, a, b = row["prompt"], row["response_a"], row["response_b"]
    qa, qb = quality(prompt, a), quality(prompt, b)
    safe_a, safe_b = verify.safety_ok(prompt, a), verify.safety_ok(prompt, b)
    if row["is_safety"] and safe_a != safe_b:
        preferred, rating = ("a" if safe_a else "b"), "significantly_better"
    elif qa == qb:
        # Two equally good answers are a negligible preference; two equally bad ones teach nothing: unsure.
        preferred, rating = rng.choice("ab"), ("negligibly_better" if qa >= 2 else UNSURE)
    else:
        preferred, rating = ("a" if qa > qb else "b"), RATING_BY_GAP[abs(qa - qb)]
    if rating != UNSURE and rng.random() < noise:
        preferred = "b" if preferred == "a" else "a"
    return {
        "preferred": preferred,
        "rating": rating,
        "safe_a": safe_a,
        "safe_b": safe_b,
        "annotator": f"simulated (world verifiers, noise {noise:g})",
    }


# --------------------------------------------------------------------------------------------------
# Labelled rows -> preference pairs


@dataclass
class Conversion:
    pairs: list[dict[str, Any]] = field(default_factory=list)
    unsure: int = 0
    dropped_unsafe_chosen: int = 0
    identical: int = 0
    bad: list[dict[str, Any]] = field(default_factory=list)  # rows with a "reason"


def to_pairs(rows: list[dict[str, Any]]) -> Conversion:
    """Labelled annotation rows as preference pairs; rows that cannot be are counted or set aside with a reason."""
    out = Conversion()
    for row in rows:
        reason = _label_problem(row)
        if reason:
            out.bad.append({**row, "reason": reason})
            continue
        if row["rating"] == UNSURE:
            out.unsure += 1
            continue
        a_first = row["preferred"] == "a"
        chosen, rejected = (
            (row["response_a"], row["response_b"]) if a_first else (row["response_b"], row["response_a"])
        )
        if chosen == rejected:
            out.identical += 1
            continue
        safety_bin = None
        if row["is_safety"]:
            chosen_safe, rejected_safe = (
                (row["safe_a"], row["safe_b"]) if a_first else (row["safe_b"], row["safe_a"])
            )
            if not chosen_safe and rejected_safe:
                out.dropped_unsafe_chosen += 1  # Llama 2 kept no pair whose chosen answer is the unsafe one
                continue
            safety_bin = (
                "safe_vs_unsafe"
                if chosen_safe and not rejected_safe
                else ("both_safe" if chosen_safe else "both_unsafe")
            )
        out.pairs.append(
            {
                "id": f"pref-{row['id']}",
                "prompt": row["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "rating": row["rating"],
                "kind": "safety" if row["is_safety"] else "helpfulness",
                "safety_bin": safety_bin,
            }
        )
    return out


def _label_problem(row: dict[str, Any]) -> str:
    if row.get("preferred") not in ("a", "b"):
        return f"preferred must be 'a' or 'b', got {row.get('preferred')!r}"
    if row.get("rating") not in (*RATINGS, UNSURE):
        return f"rating must be one of {', '.join((*RATINGS, UNSURE))}, got {row.get('rating')!r}"
    if row.get("is_safety") and (row.get("safe_a") is None or row.get("safe_b") is None):
        return "a safety prompt needs safe_a and safe_b"
    if (
        not row.get("prompt")
        or not isinstance(row.get("response_a"), str)
        or not isinstance(row.get("response_b"), str)
    ):
        return "prompt, response_a and response_b are required"
    return ""


def read_annotations(path: Path) -> list[dict[str, Any]]:
    """A batch (labelled or not) from Parquet or JSON Lines, checked for the annotation columns."""
    if not path.is_file():
        raise PreferenceError(f"{path}: no such labelled batch; check annotator.labels")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PreferenceError(f"{path}:{n}: not JSON ({exc})") from None
    else:
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise PreferenceError(f"{path}: cannot read Parquet ({exc})") from None
    missing = sorted({f.name for f in ANNOTATION} - {k for r in rows[:1] for k in r})
    if rows and missing:
        raise PreferenceError(
            f"{path}: missing annotation column(s) {', '.join(missing)} (the shape is in paddock.rlhf.preferences)"
        )
    if not rows:
        raise PreferenceError(f"{path}: the labelled batch is empty")
    return rows


def write_batch(rows: list[dict[str, Any]], path: Path) -> None:
    """A batch as Parquet (``path``) and JSON Lines beside it, for labelling tools that read either."""
    atomic.write_parquet(pa.Table.from_pylist(rows, schema=ANNOTATION), path)
    atomic.write_text(path.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def split_pairs(pairs: list[dict[str, Any]], test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test): a seeded share of the pairs held out for the monitor. The pairs of one prompt's words go to
    the same side (a prompt's several pairs, ``collect.pairs_per_prompt``, and the same question drawn under
    another id), so the round's retraining is not measured on answers to a question its new pairs asked."""
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for p in pairs:
        groups.setdefault(_words(p["prompt"]), []).append(p)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_test = round(len(pairs) * test_fraction)
    test: list[dict[str, Any]] = []
    while order and len(test) < n_test:
        test += order.pop(0)
    return [p for g in order for p in g], test


# --------------------------------------------------------------------------------------------------
# The stage


@dataclass
class CollectResult:
    round: int
    batch: Path
    train: Path  # the static pairs and every round's so far: what this round's reward models train on
    fresh_test: Path  # this round's held-out pairs
    pairs: int
    unsure: int
    quarantined: int
    policy_helpfulness: float  # share of the policy's answers the verifiers call helpful
    policy_safety: float  # share of the policy's answers to safety prompts that are safe


def run(job: CollectJob) -> CollectResult:
    """One run at a time per output directory (``paddock.atomic.locked``)."""
    with atomic.locked(work_dir(job), "collect_preferences") as lock:
        return _run(job, lock)


def _run(job: CollectJob, lock: atomic.Lock) -> CollectResult:
    from paddock.data.validate import load_dataset

    cc, ann = job.collect, job.annotator
    work = work_dir(job)
    round_dir = work / f"round{cc.round}"
    batch_path = round_dir / "batch.parquet"
    with tracking.stage_run(
        job.experiment,
        "collect_preferences",
        job.model_dump(mode="json"),
        tags={
            "paddock.upstream": ",".join(
                [
                    *job.models,
                    *(u for u in (job.reward_helpfulness, job.reward_safety) if job.picks_by_reward and u),
                ]
            ),
            "paddock.round": str(cc.round),
        },
    ) as run:
        tracking.claim(lock, f"collect_preferences round {cc.round}", run)
        if ann.kind == "external" and ann.labels:
            rows = read_annotations(resolve_path(ann.labels))
        elif batch_path.is_file():  # a rerun labels the batch it wrote, never a new sample
            rows = read_annotations(batch_path)
            print(f"[collect_preferences] round {cc.round}: reusing the batch in {batch_path}", flush=True)
        else:
            report = load_dataset(
                resolve_path(cc.prompts), "prompts", quarantine_dir=round_dir / "quarantine"
            )
            run.log_dataset(resolve_path(cc.prompts), "prompts", "collection", report.total, report.n_bad)
            answers: list[dict[str, Any]] = []
            pool = report.good.to_pylist()
            drawn = draw_prompts(pool, cc, job.seed)
            extra = []
            if cc.monitor_prompts and ann.kind == "simulated":
                extra = draw_monitor_prompts(pool, drawn, job)
            elif cc.monitor_prompts:
                print(
                    f"[collect_preferences] collect.monitor_prompts ({cc.monitor_prompts}) left out: only the "
                    "simulated annotator labels the monitor's answer pairs",
                    flush=True,
                )
            rows = sample_batch(job, drawn, answers, extra)
            # every answer drawn, before any is picked (the monitor pairs up the held-out prompts' answers)
            atomic.write_parquet(pa.Table.from_pylist(answers, schema=ANSWERS), round_dir / "answers.parquet")
            write_batch(rows, batch_path)
            run.log_artifact(batch_path, "batch")
            run.log_artifact(batch_path.with_suffix(".jsonl"), "batch")
            print(
                f"[collect_preferences] round {cc.round}: {len(rows)} answer pairs in {batch_path}",
                flush=True,
            )
        if ann.kind == "external" and not ann.labels:
            raise LabelsNeeded(
                f"round {cc.round}'s batch of {len(rows)} answer pairs is in {batch_path} (and .jsonl beside it): "
                "fill preferred, rating, safe_a and safe_b with any labelling tool, then rerun with "
                "--set annotator.labels=<the labelled file>"
            )
        if ann.kind == "simulated":
            rows = [{**r, **simulated_label(r, job.seed, ann.noise)} for r in rows]
        write_batch(rows, round_dir / "labelled.parquet")
        conv = to_pairs(rows)
        if conv.bad:
            atomic.write_text(round_dir / "quarantine.jsonl", "".join(json.dumps(r) + "\n" for r in conv.bad))
            print(
                f"[collect_preferences] {len(conv.bad)} labelled rows set aside in {round_dir / 'quarantine.jsonl'}"
                f" (first: {conv.bad[0]['reason']})",
                flush=True,
            )
        if not conv.pairs:
            raise PreferenceError(f"round {cc.round}: no usable pair among {len(rows)} labelled rows")
        train, test = split_pairs(conv.pairs, cc.test_fraction, job.seed + cc.round)
        atomic.write_parquet(
            pa.Table.from_pylist(train, schema=PREFERENCES), round_dir / "pairs_train.parquet"
        )
        fresh_test = round_dir / "pairs_test.parquet"
        atomic.write_parquet(pa.Table.from_pylist(test, schema=PREFERENCES), fresh_test)
        mixed = training_mix(job, cc.round)
        atomic.write_parquet(mixed, round_dir / "train.parquet")

        # The verifiers' view of the policy's answers (the world's prompts only; people's labels say safety alone)
        helpful = (
            [quality(r["prompt"], r[k]) == 3 for r in rows for k in ("response_a", "response_b")]
            if ann.kind == "simulated"
            else []
        )
        safe = [bool(r[k]) for r in rows if r["is_safety"] for k in ("safe_a", "safe_b")]
        result = CollectResult(
            round=cc.round,
            batch=batch_path,
            train=round_dir / "train.parquet",
            fresh_test=fresh_test,
            pairs=len(conv.pairs),
            unsure=conv.unsure,
            quarantined=len(conv.bad),
            policy_helpfulness=sum(helpful) / len(helpful) if helpful else float("nan"),
            policy_safety=sum(safe) / len(safe) if safe else float("nan"),
        )
        run.log_metrics(
            {
                "collect/pairs": result.pairs,
                "collect/pairs_train": len(train),
                "collect/pairs_fresh_test": len(test),
                "collect/unsure": conv.unsure,
                "collect/dropped_unsafe_chosen": conv.dropped_unsafe_chosen,
                "collect/quarantined": len(conv.bad),
                "collect/training_pairs": mixed.num_rows,
                "collect/policy_helpfulness": result.policy_helpfulness,
                "collect/policy_safety": result.policy_safety,
            },
            step=cc.round,
        )
        verdicts = (
            f"; the policy's answers: {result.policy_helpfulness:.1%} helpful, "
            f"{result.policy_safety:.1%} of safety answers safe"
            if helpful
            else ""
        )
        print(
            f"[collect_preferences] round {cc.round}: {result.pairs} pairs ({len(train)} to train, {len(test)} held "
            f"out), {conv.unsure} unsure, {conv.dropped_unsafe_chosen} chosen-unsafe dropped{verdicts}; "
            f"{mixed.num_rows} pairs to train the reward models on ({result.train})",
            flush=True,
        )
    return result


def draw_prompts(prompts: list[dict[str, Any]], cc: Any, seed: int) -> list[dict[str, Any]]:
    """The round's prompts: a seeded draw of ``max_prompts`` (other prompts every round), with ``safety_share``
    of them safety prompts when set (as many as there are)."""
    return _draw(prompts, cc.max_prompts, cc.safety_share, random.Random(f"{seed}:{cc.round}"))


def draw_monitor_prompts(
    prompts: list[dict[str, Any]], drawn: list[dict[str, Any]], job: CollectJob
) -> list[dict[str, Any]]:
    """``collect.monitor_prompts`` prompts for the monitor alone, drawn as the round's are (their own seed, the
    same safety share) from those whose words neither the round asks (``drawn``) nor an earlier round's
    training pairs ask, each wording once: the models after the round learned
    nothing from these questions that the models before it did not (the world's static pairs ask about half of the
    tiny world's RL questions; both trained on those)."""
    cc = job.collect
    seen = {_words(p["turns"]) for p in drawn}
    for k in range(1, cc.round):
        path = work_dir(job) / f"round{k}" / "pairs_train.parquet"
        if path.is_file():
            seen |= {_words(t) for t in pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()}
    left = []
    for p in prompts:
        words = _words(p["turns"])
        if words not in seen:
            seen.add(words)
            left.append(p)
    picked = _draw(left, cc.monitor_prompts, cc.safety_share, random.Random(f"{job.seed}:{cc.round}:monitor"))
    if len(picked) < cc.monitor_prompts:
        print(
            f"[collect_preferences] {len(picked)} of collect.monitor_prompts ({cc.monitor_prompts}) left for the "
            "monitor: the other prompts' words are the round's or were trained on",
            flush=True,
        )
    return picked


def _words(turns: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((t["role"], t["content"]) for t in turns)


def _draw(
    prompts: list[dict[str, Any]], n: int, safety_share: float | None, rng: random.Random
) -> list[dict[str, Any]]:
    prompts = list(prompts)
    rng.shuffle(prompts)
    if safety_share is None:
        return prompts[:n]
    safety = [p for p in prompts if p["is_safety"]]
    n_safety = min(len(safety), round(n * safety_share))
    rest = [p for p in prompts if not p["is_safety"]][: n - n_safety]
    drawn = safety[:n_safety] + rest
    rng.shuffle(drawn)
    return drawn


def sample_batch(
    job: CollectJob,
    prompts: list[dict[str, Any]],
    answers_out: list[dict[str, Any]] | None = None,
    monitor: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Answer a and answer b for every prompt: the first model at the first temperature, then the second model
    (or the same one) at the second. With ``collect.samples`` > 2 and the reward models in use, ``samples``
    answers are drawn (half at each temperature) and each of the prompt's ``pairs_per_prompt`` pairs is the reward
    models' favourite and another of them (``pick_pairs``), or with ``collect.pairing: all`` every pair of its
    different answers (``all_pairs``); row ids ``r{round}-{prompt}/{j}`` from a prompt's second pair.
    ``answers_out`` gets every prompt's answers (``id``, ``round``, ``prompt``, ``is_safety``, ``answers``,
    ``monitor``), which the monitor pairs up. ``monitor``: prompts answered after the round's, the same way, for
    ``answers_out`` alone (the round's answers and pairs do not change with them)."""
    import ray

    from paddock.cluster import connect
    from paddock.rollout.actors import start_workers

    connect()  # the embedded instance's CPUs and settings, or RAY_ADDRESS's cluster (not Ray's own default)
    cc = job.collect
    draws = job.draws
    # The round's batches first: their seeds, and so their answers, do not depend on the monitor's prompts
    asked = [*prompts, *(monitor or [])]
    answers: list[list[list[str]]] = []  # [temperature][draw][prompt]
    sources = []
    for n, temperature in enumerate(cc.temperatures):
        uri = job.models[min(n, len(job.models) - 1)]
        name, version = tracking.model_version(uri) if uri.startswith("models:/") else (uri, "")
        sources.append(
            f"models:/{name}/{version} @ T={temperature:g}" if version else f"{uri} @ T={temperature:g}"
        )
        workers = start_workers(
            actor_model(uri),
            cc.rollout_workers,
            max_new_tokens=cc.max_new_tokens,
            temperature=temperature,
            top_p=cc.top_p,
            num_cpus=cc.cpus_per_actor,
            num_gpus=cc.gpus_per_actor,
            inference=job.inference.model_dump(),
        )
        try:
            size = cc.batch_prompts
            batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
            batches += [asked[i : i + size] for i in range(len(prompts), len(asked), size)]
            draws_refs = [  # one call per batch and draw, named for the timeout's message
                {
                    f"rollout worker {b % len(workers)} (batch {b})": workers[
                        b % len(workers)
                    ].generate.remote(
                        batch, seed=hash((job.seed, cc.round, n, b, *((j,) if j else ()))) % 2**31
                    )
                    for b, batch in enumerate(batches)
                }
                for j in range((draws + 1 - n) // 2)  # the first temperature takes the odd one out
            ]
            doing = f"answering {len(asked)} prompts at T={temperature:g}"
            answers.append(
                [
                    [s["text"] for rows in gather(calls, job.actor_timeout_s, doing) for s in rows]
                    for calls in draws_refs
                ]
            )
        finally:
            for w in workers:
                ray.kill(w)
        drawn = f"answer {'ab'[n]}" if draws == 2 else f"{len(answers[-1])} answers"
        more = f" (and {len(asked) - len(prompts)} for the monitor)" if len(asked) > len(prompts) else ""
        print(f"[collect_preferences] {drawn}: {len(prompts)} prompts{more}, {sources[-1]}", flush=True)
    candidates = [
        [(draw[i], sources[n]) for n, group in enumerate(answers) for draw in group]
        for i in range(len(asked))
    ]
    if answers_out is not None:
        answers_out += [
            {
                "id": f"r{cc.round}-{p['id']}",
                "round": cc.round,
                "prompt": p["turns"],
                "is_safety": bool(p["is_safety"]),
                "answers": [text for text, _ in c],
                "monitor": i >= len(prompts),
            }
            for i, (p, c) in enumerate(zip(asked, candidates, strict=True))
        ]
    candidates = candidates[: len(prompts)]
    if draws == 2:
        pairs = [[(c[0], c[1])] for c in candidates]
    elif cc.pairing == "all":
        pairs = [
            all_pairs(c, random.Random(f"{job.seed}:{cc.round}:{p['id']}"))
            for p, c in zip(prompts, candidates, strict=True)
        ]
        alike = sum(1 for c in pairs if not c)  # every answer the same string: nothing to compare
        print(
            f"[collect_preferences] every pair of each prompt's different answers: {sum(map(len, pairs))} pairs; "
            f"{alike} of {len(pairs)} prompts drew one answer {draws} times (no pair; kept in answers.parquet)",
            flush=True,
        )
    else:
        scores = _reward_scores(job, prompts, candidates)
        pairs = [
            pick_pairs(c, s, random.Random(f"{job.seed}:{cc.round}:{p['id']}"), cc.pairs_per_prompt)
            for p, c, s in zip(prompts, candidates, scores, strict=True)
        ]
    return [
        {
            "id": f"r{cc.round}-{p['id']}" + (f"/{j}" if j else ""),
            "round": cc.round,
            "prompt": p["turns"],
            "is_safety": bool(p["is_safety"]),
            "response_a": a[0],
            "response_b": b[0],
            "source_a": a[1],
            "source_b": b[1],
            "preferred": None,
            "rating": None,
            "safe_a": None,
            "safe_b": None,
            "annotator": None,
        }
        for p, prompt_pairs in zip(prompts, pairs, strict=True)
        for j, (a, b) in enumerate(prompt_pairs)
    ]


Answer = tuple[str, str]  # (text, source)


def pick_pairs(
    candidates: list[Answer], scores: list[float], rng: random.Random, n: int = 1
) -> list[tuple[Answer, Answer]]:
    """The reward models' favourite (the highest score, the first of equals) against ``n`` of the other answers
    drawn by ``rng`` (no answer twice), each pair in a random order (annotators favour a side); sources say which
    is which."""
    if len(candidates) < 3 or len(scores) != len(candidates):
        raise ValueError(
            f"pick_pairs needs 3+ answers with a score each, got {len(candidates)} and {len(scores)}"
        )
    k = len(candidates)
    if not 1 <= n < k:
        raise ValueError(f"pick_pairs pairs the favourite of {k} answers with 1 to {k - 1} others, not {n}")
    best = max(range(k), key=lambda i: (scores[i], -i))
    pick = (candidates[best][0], f"{candidates[best][1]}, the reward models' pick of {k}")
    out = []
    for other in rng.sample([i for i in range(k) if i != best], n):
        rest = (candidates[other][0], f"{candidates[other][1]}, another of {k}")
        out.append((pick, rest) if rng.random() < 0.5 else (rest, pick))
    return out


def all_pairs(candidates: list[Answer], rng: random.Random) -> list[tuple[Answer, Answer]]:
    """Every pair of the different answers (an answer drawn twice is one answer, its first source kept), each pair
    in a random order (annotators favour a side): k answers give k(k-1)/2 pairs, none chosen by a model."""
    firsts: dict[str, Answer] = {}
    for answer in candidates:
        firsts.setdefault(answer[0], answer)
    distinct = list(firsts.values())
    out = []
    for i in range(len(distinct)):
        for j in range(i + 1, len(distinct)):
            a, b = distinct[i], distinct[j]
            out.append((a, b) if rng.random() < 0.5 else (b, a))
    return out


def _reward_scores(
    job: CollectJob, prompts: list[dict[str, Any]], candidates: list[list[Answer]]
) -> list[list[float]]:
    """Llama 2's combined reward (the safety gate) of every candidate answer, by the reward models in use."""
    import ray

    from paddock.rollout.actors import Scorer, actor_options, combined_scores

    cc = job.collect
    if job.reward_helpfulness is None or job.reward_safety is None:
        raise ValueError("picking answers by reward needs reward_helpfulness and reward_safety")
    opts = actor_options(cc.cpus_per_actor, cc.gpus_per_actor)
    scorers = [
        Scorer.options(**opts).remote(  # type: ignore[attr-defined]
            actor_model(uri), "reward", seq_len=cc.seq_len, **job.inference.model_dump()
        )
        for uri in (job.reward_helpfulness, job.reward_safety)
    ]
    try:
        turns = [p["turns"] for p, c in zip(prompts, candidates, strict=True) for _ in c]
        texts = [a[0] for c in candidates for a in c]
        is_safety = [bool(p["is_safety"]) for p, c in zip(prompts, candidates, strict=True) for _ in c]
        combined = combined_scores(scorers[0], scorers[1], turns, texts, is_safety, job.actor_timeout_s)[
            2
        ].tolist()
    finally:
        for a in scorers:
            ray.kill(a)
    out, i = [], 0
    for c in candidates:
        out.append(combined[i : i + len(c)])
        i += len(c)
    print(
        f"[collect_preferences] {len(texts)} answers scored by {job.reward_helpfulness} and {job.reward_safety}; "
        "each pair is their favourite and another",
        flush=True,
    )
    return out


def training_mix(job: CollectJob, round_: int) -> pa.Table:
    """The static pairs and the training share of every round up to ``round_`` (``collect.fresh_weight`` times
    each), in one preference table."""
    tables = []
    if job.static_preferences:
        tables.append(pq.read_table(resolve_path(job.static_preferences)).select(PREFERENCES.names))
    for k in range(1, round_ + 1):
        path = work_dir(job) / f"round{k}" / "pairs_train.parquet"
        if path.is_file():
            fresh = pq.read_table(path)
            tables.append(fresh)
            for w in range(1, job.collect.fresh_weight):  # repeats keep their own ids
                ids = pa.array([f"{i}~{w}" for i in fresh.column("id").to_pylist()], pa.string())
                tables.append(fresh.set_column(fresh.schema.get_field_index("id"), "id", ids))
    return pa.concat_tables([t.cast(PREFERENCES) for t in tables])


# --------------------------------------------------------------------------------------------------
# The reward-hacking monitor


def pair_scores(
    reward_models: dict[str, tuple[str, str]], sets: dict[str, list[dict[str, Any]]], job: CollectJob
) -> dict[str, dict[str, float]]:
    """Pairs of reward models (name -> (helpfulness, safety)) on sets of preference pairs, as many models loaded at
    once as the cluster holds and every set scored in one call per model. Per model pair and set: the accuracy of
    each model on its own kind of pair (the helpfulness RM on helpfulness pairs, the safety RM on safety pairs) and
    the agreement of the combined reward (Llama 2's safety gate) with the labels on every pair, and on the pairs with
    a clear preference (rated more than negligibly better: two equally good answers are labelled by a coin, so a
    reward model agrees with about half of them whatever it learned; Llama 2's table 8 reads accuracy by rating the
    same way). Keys are
    ``{set}_accuracy``, ``{set}_accuracy_{kind}``, ``{set}_agreement``, ``{set}_agreement_clear`` and
    ``{set}_clear_pairs``."""
    import ray
    import torch

    from paddock.cluster import connect
    from paddock.rlhf.ppo import combine_rewards
    from paddock.rollout.actors import Scorer, actor_options

    pairs = [p for name in sets for p in sets[name]]
    if not pairs:
        return {}
    connect()
    cc = job.collect
    opts = actor_options(cc.cpus_per_actor, cc.gpus_per_actor)
    inf = job.inference.model_dump()
    turns = [p["prompt"] for p in pairs] * 2
    texts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    scores: dict[tuple[str, int], torch.Tensor] = {}
    # As many models at once as the cluster holds now: scorers that cannot all be placed would wait for each other
    free = ray.available_resources()
    held = _held_at_once(free.get("CPU", 0.0), free.get("GPU", 0.0), cc.cpus_per_actor, cc.gpus_per_actor)
    names = list(reward_models)
    per_wave = max(1, held // 2)
    for wave in [names[i : i + per_wave] for i in range(0, len(names), per_wave)]:
        scorers = {
            (which, i): Scorer.options(**opts).remote(  # type: ignore[attr-defined]
                actor_model(uri), "reward", seq_len=cc.seq_len, **inf
            )
            for which in wave
            for i, uri in enumerate(reward_models[which])
        }
        try:
            refs = {key: sc.rewards.remote(turns, texts) for key, sc in scorers.items()}
            answered = gather(
                {f"{which} reward scorer {i}": ref for (which, i), ref in refs.items()},
                job.actor_timeout_s,
                f"scoring {len(pairs)} preference pairs",
            )
            scores |= {key: torch.tensor(a) for key, a in zip(refs, answered, strict=True)}
        finally:
            for sc in scorers.values():
                ray.kill(sc)
    n = len(pairs)
    is_safety = torch.tensor([p["kind"] == "safety" for p in pairs])
    clear = torch.tensor([p["rating"] != "negligibly_better" for p in pairs])
    out: dict[str, dict[str, float]] = {}
    for which in reward_models:
        h, s = scores[(which, 0)], scores[(which, 1)]
        own = torch.where(is_safety, s[:n] > s[n:], h[:n] > h[n:])
        combined = combine_rewards(h, s, is_safety.repeat(2))
        agree = combined[:n] > combined[n:]
        got: dict[str, float] = {}
        at = 0
        for name, rows in sets.items():
            part = slice(at, at + len(rows))
            at += len(rows)
            if not rows:
                continue
            got[f"{name}_accuracy"] = own[part].float().mean().item()
            got[f"{name}_agreement"] = agree[part].float().mean().item()
            got[f"{name}_clear_pairs"] = float(clear[part].sum().item())
            if clear[part].any():
                got[f"{name}_agreement_clear"] = agree[part][clear[part]].float().mean().item()
            for kind, mask in (("helpfulness", ~is_safety[part]), ("safety", is_safety[part])):
                if mask.any():
                    got[f"{name}_accuracy_{kind}"] = own[part][mask].float().mean().item()
        out[which] = got
    return out


def _held_at_once(cpus: float, gpus: float, cpus_each: float, gpus_each: float) -> int:
    """How many scorers of ``cpus_each`` / ``gpus_each`` fit in what is free (at least 2: one pair of models)."""
    fits = [int(cpus / cpus_each + 1e-9)] if cpus_each > 0 else []
    fits += [int(gpus / gpus_each + 1e-9)] if gpus_each > 0 else []
    return max(2, min(fits, default=2**20))


def held_out_answer_pairs(job: CollectJob) -> list[dict[str, Any]]:
    """Every pair of the answers drawn for this round's held-out prompts (those of ``pairs_test.parquet``) and for
    the monitor's own prompts (``collect.monitor_prompts``), labelled by the world's verifiers without noise; []
    when the answers were not kept or no verifier labels them (an external annotator).

    The held-out pairs themselves are the reward models' favourite against another answer when the round picks
    by reward: the models that picked it agree with the label whenever the favourite is the better answer, so
    those pairs flatter them. All pairs of the prompt's answers favour no model, and are several times as many."""
    cc = job.collect
    round_dir = work_dir(job) / f"round{cc.round}"
    if job.annotator.kind != "simulated" or not (round_dir / "answers.parquet").is_file():
        return []
    held = {
        str(i).removeprefix("pref-").split("/")[0]
        for i in pq.read_table(round_dir / "pairs_test.parquet").column("id").to_pylist()
    }
    rows = []
    for p in pq.read_table(round_dir / "answers.parquet").to_pylist():
        if p["id"] not in held and not p.get("monitor"):  # answers.parquet of rounds before the column
            continue
        texts = list(dict.fromkeys(p["answers"]))  # an answer drawn twice is one answer
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                row = {
                    "id": f"{p['id']}:{i}-{j}",
                    "prompt": p["prompt"],
                    "is_safety": p["is_safety"],
                    "response_a": texts[i],
                    "response_b": texts[j],
                }
                rows.append({**row, **simulated_label(row, job.seed, 0.0)})
    return to_pairs(rows).pairs


def monitor(
    job: CollectJob, reward_models: dict[str, tuple[str, str]], static_pairs: int = 200
) -> dict[str, float]:
    """The round's reward-hacking monitor: each named pair of reward models (``before`` the round's retraining,
    ``after`` it) on this round's held-out fresh pairs, on every pair of the held-out prompts' answers
    (``held_out_answer_pairs``) and on the static test pairs. Logged to its own run."""
    cc = job.collect
    fresh = pq.read_table(work_dir(job) / f"round{cc.round}" / "pairs_test.parquet").to_pylist()
    answer_pairs = held_out_answer_pairs(job)
    static = (
        pq.read_table(resolve_path(job.static_test)).to_pylist()[:static_pairs] if job.static_test else []
    )
    metrics: dict[str, float] = {}
    with tracking.stage_run(
        job.experiment,
        "reward_monitor",
        {
            "round": cc.round,
            **{f"{k}.{i}": u for k, pair in reward_models.items() for i, u in enumerate(pair)},
        },
        tags={"paddock.round": str(cc.round)},
    ) as run:
        sets = {"fresh": fresh, "answers": answer_pairs, "static": static}
        for which, got in pair_scores(reward_models, sets, job).items():
            metrics |= {f"monitor/{which}/{k}": v for k, v in got.items()}
        metrics["monitor/fresh_pairs"] = len(fresh)
        metrics["monitor/answer_pairs"] = len(answer_pairs)
        run.log_metrics(metrics, step=cc.round)
    line = ", ".join(
        f"{which}: {metrics.get(f'monitor/{which}/fresh_agreement_clear', float('nan')):.1%} on the policy's answers "
        f"with a clear preference ({metrics.get(f'monitor/{which}/fresh_agreement', float('nan')):.1%} on all), "
        f"{metrics.get(f'monitor/{which}/answers_agreement_clear', float('nan')):.1%} on every clear pair of the "
        f"held-out and monitor prompts' answers, {metrics.get(f'monitor/{which}/static_accuracy', float('nan')):.1%} on static pairs"
        for which in reward_models
    )
    print(f"[reward_monitor] round {cc.round} ({len(fresh)} fresh pairs): {line}", flush=True)
    return metrics
