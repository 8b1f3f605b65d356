"""A preference round on the shared tiny chain: tiny-sft answers the world's prompts twice, the simulated annotator
labels the batch, the pairs join the static ones, and the monitor scores the chain's reward models on them. The
same batch labelled by "people" (an external file) imports to the same pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = 100  # every training prompt of the test world: a tiny SFT model's answers are mostly both wrong


def collect_job(world_dir: Path, *more: str):
    from paddock.config import CollectJob, load_config

    return load_config(
        CollectJob,
        None,
        [
            "registry_prefix=tiny",
            "models=[models:/tiny-sft@latest]",
            f"static_preferences={world_dir}/preferences/train.parquet",
            f"static_test={world_dir}/preferences/test.parquet",
            f"collect.prompts={world_dir}/prompts/train.parquet",
            f"collect.max_prompts={PROMPTS}",
            "collect.batch_prompts=25",
            "collect.max_new_tokens=32",
            "collect.rollout_workers=2",
            "collect.cpus_per_actor=0.5",
            "collect.test_fraction=0.25",
            "annotator.noise=0.0",
            *more,
        ],
    )


RMS = ("models:/tiny-rm-helpfulness@latest", "models:/tiny-rm-safety@latest")  # the chain's reward models


def four_answers(world_dir: Path, *more: str):
    """A collection of four answers a prompt with the chain's reward models in use."""
    return collect_job(
        world_dir, "collect.samples=4", f"reward_helpfulness={RMS[0]}", f"reward_safety={RMS[1]}", *more
    )


@pytest.fixture(scope="module")
def collected(chain, world_dir: Path):
    from paddock.rlhf import preferences

    job = collect_job(world_dir, "collect.round=7")
    return job, preferences.run(job)


def test_a_round_labels_the_policy_s_answers_and_mixes_them_with_the_static_pairs(collected, world_dir: Path):
    from paddock.rlhf import preferences as prefs

    job, result = collected
    batch = pq.read_table(result.batch)
    assert batch.schema == prefs.ANNOTATION and batch.num_rows == PROMPTS
    rows = batch.to_pylist()
    assert all(r["preferred"] is None and r["round"] == 7 for r in rows)  # written unlabelled
    assert {r["source_a"].rsplit(" @ ", 1)[1] for r in rows} == {"T=0.7"}
    assert {r["source_b"].rsplit(" @ ", 1)[1] for r in rows} == {"T=1"}
    assert rows[0]["source_a"].startswith("models:/tiny-sft/")
    assert sum(r["response_a"] != r["response_b"] for r in rows) > PROMPTS // 2  # two samples, not one twice
    labelled = pq.read_table(result.batch.parent / "labelled.parquet").to_pylist()
    assert labelled == [{**r, **prefs.simulated_label(r, job.seed, 0.0)} for r in rows]

    conv = prefs.to_pairs(labelled)
    assert result.pairs == len(conv.pairs) > 0 and result.unsure == conv.unsure
    train = pq.read_table(result.batch.parent / "pairs_train.parquet").to_pylist()
    test = pq.read_table(result.fresh_test).to_pylist()
    assert sorted(p["id"] for p in train + test) == sorted(p["id"] for p in conv.pairs)
    assert len(test) == round(len(conv.pairs) * 0.25)
    static = pq.read_table(world_dir / "preferences" / "train.parquet").num_rows
    mixed = pq.read_table(result.train)
    assert mixed.num_rows == static + len(train)
    assert mixed.column("id").to_pylist()[static:] == [p["id"] for p in train]


def test_the_monitor_scores_the_reward_models_on_fresh_and_static_pairs(collected):
    from paddock.rlhf import preferences

    job, result = collected
    metrics = preferences.monitor(job, {"after": RMS}, static_pairs=300)
    assert metrics["monitor/fresh_pairs"] == len(pq.read_table(result.fresh_test))
    for key in ("fresh_accuracy", "fresh_agreement", "static_accuracy", "static_agreement"):
        assert 0.0 <= metrics[f"monitor/after/{key}"] <= 1.0
    fresh = pq.read_table(result.fresh_test).to_pylist()
    clear = [p for p in fresh if p["rating"] != "negligibly_better"]
    assert metrics["monitor/after/fresh_clear_pairs"] == len(clear)
    if clear:  # agreement on them is a share of them
        assert metrics["monitor/after/fresh_agreement_clear"] * len(clear) == pytest.approx(
            round(metrics["monitor/after/fresh_agreement_clear"] * len(clear)), abs=1e-4
        )
    # The chain's reward models trained on the static pairs: above chance on their test split (test_supervised.py
    # holds the helpfulness RM above 0.65 on all of it; 300 of its pairs have a standard error of 0.03)
    assert metrics["monitor/after/static_accuracy"] > 0.58


def test_people_s_labels_are_imported_after_the_batch_is_written(collected, world_dir: Path):
    from paddock.rlhf import preferences as prefs

    job, result = collected
    # "external": the second run of the round finds its batch, asks for labels and names where the batch is
    waiting = collect_job(world_dir, "collect.round=7", "annotator.kind=external")
    with pytest.raises(
        prefs.LabelsNeeded, match=r"round 7's batch of 100 answer pairs is in .*round7/batch.parquet"
    ):
        prefs.run(waiting)
    # a labelling tool's output: the batch's JSON Lines with the label columns filled (by the same rules here)
    rows = [json.loads(x) for x in result.batch.with_suffix(".jsonl").read_text().splitlines()]
    labelled = [{**r, **prefs.simulated_label(r, job.seed, 0.0), "annotator": "people"} for r in rows]
    labelled[0]["rating"] = "enormously_better"  # one bad row: set aside with its reason, nothing else lost
    file = world_dir.parent / "labelled.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    imported = prefs.run(
        collect_job(world_dir, "collect.round=8", "annotator.kind=external", f"annotator.labels={file}")
    )
    assert imported.quarantined == 1
    quarantine = (imported.batch.parent / "quarantine.jsonl").read_text().splitlines()
    assert "enormously_better" in json.loads(quarantine[0])["reason"]
    expected = prefs.to_pairs(labelled[1:]).pairs
    got = pq.read_table(imported.batch.parent / "pairs_train.parquet").to_pylist()
    got += pq.read_table(imported.fresh_test).to_pylist()
    assert sorted(p["id"] for p in got) == sorted(p["id"] for p in expected)


def test_with_four_answers_the_reward_models_favourite_is_labelled(chain, world_dir: Path):
    """collect.samples=4 with the chain's reward models: each pair is their favourite of the prompt's four answers
    (by Llama 2's combined reward, recomputed here) and another of the four, the favourite on either side."""
    import torch
    from paddock import tracking
    from paddock.rlhf import preferences as prefs
    from paddock.rlhf.ppo import combine_rewards
    from paddock.rollout.actors import ScorerModel

    job = four_answers(world_dir, "collect.round=9", "collect.max_prompts=40")
    result = prefs.run(job)
    rows = pq.read_table(result.batch).to_pylist()
    assert len(rows) == 40
    picked = [("pick of 4" in r["source_a"], "pick of 4" in r["source_b"]) for r in rows]
    assert all(a != b for a, b in picked)  # exactly one side is the favourite
    assert {a for a, _ in picked} == {True, False}  # and it is not always answer a
    assert all(("another of 4" in r["source_a"]) == b for r, (_, b) in zip(rows, picked, strict=True))
    scorers = [ScorerModel(str(tracking.resolve_model(u)), "reward", seq_len=256) for u in RMS]
    turns = [r["prompt"] for r in rows]
    scores = []
    for side in ("response_a", "response_b"):
        h, s = (torch.tensor(m.rewards(turns, [r[side] for r in rows])) for m in scorers)
        scores.append(combine_rewards(h, s, torch.tensor([r["is_safety"] for r in rows])))
    for i, (a_is_pick, _) in enumerate(picked):
        pick, other = (scores[0][i], scores[1][i]) if a_is_pick else (scores[1][i], scores[0][i])
        assert pick >= other - 1e-4, rows[i]  # the favourite scores at least as high as the other answer
    # Every answer drawn is kept: the monitor pairs up the held-out prompts' four answers, labelled without noise
    kept = {r["id"]: r for r in pq.read_table(result.batch.parent / "answers.parquet").to_pylist()}
    assert len(kept) == 40 and all(len(r["answers"]) == 4 for r in kept.values())
    assert all({r["response_a"], r["response_b"]} <= set(kept[r["id"]]["answers"]) for r in rows)
    held = {p["id"].removeprefix("pref-") for p in pq.read_table(result.fresh_test).to_pylist()}
    pairs = prefs.held_out_answer_pairs(job)
    assert pairs and {p["id"].removeprefix("pref-").split(":")[0] for p in pairs} <= held
    for p in pairs:
        answers = kept[p["id"].removeprefix("pref-").split(":")[0]]["answers"]
        assert p["chosen"] in answers and p["rejected"] in answers and p["chosen"] != p["rejected"]
        verdict = (prefs.quality(p["prompt"], p["chosen"]), prefs.quality(p["prompt"], p["rejected"]))
        assert verdict[0] >= verdict[1]  # the verifiers' better answer is the chosen one (no label noise)
    clear = [p for p in pairs if p["rating"] != "negligibly_better"]
    metrics = prefs.monitor(job, {"before": RMS, "after": RMS}, static_pairs=50)
    assert metrics["monitor/answer_pairs"] == len(pairs)
    assert metrics["monitor/after/answers_clear_pairs"] == len(clear)
    if clear:  # the same models before and after: the same agreement
        after = metrics["monitor/after/answers_agreement_clear"]
        assert after == metrics["monitor/before/answers_agreement_clear"]


def test_pairing_all_labels_every_pair_of_each_prompt_s_answers(chain, world_dir: Path):
    """collect.pairing=all with four answers: each prompt's rows are every pair of its different answers (as
    answers.parquet keeps them), the reward models in use score nothing and are no upstream of the round."""
    import mlflow
    from paddock.rlhf import preferences as prefs

    job = four_answers(world_dir, "collect.round=11", "collect.max_prompts=16", "collect.pairing=all")
    result = prefs.run(job)
    rows = pq.read_table(result.batch).to_pylist()
    drawn = pq.read_table(result.batch.parent / "answers.parquet")
    assert drawn.schema == prefs.ANSWERS
    kept = {r["id"]: r for r in drawn.to_pylist()}
    assert len(kept) == 16 and all(len(r["answers"]) == 4 for r in kept.values())
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["id"].split("/")[0], []).append(r)
    for pid, answers in kept.items():
        distinct = set(answers["answers"])
        got = by_prompt.get(pid, [])
        assert len(got) == len(distinct) * (len(distinct) - 1) // 2, pid
        assert {frozenset((r["response_a"], r["response_b"])) for r in got} == {
            frozenset((a, b)) for a in distinct for b in distinct if a < b
        }
        assert [r["id"] for r in got] == [f"{pid}/{j}" if j else pid for j in range(len(got))]
    assert not any("pick of" in r["source_a"] + r["source_b"] for r in rows)
    run = mlflow.search_runs(
        experiment_names=[job.experiment], filter_string="tags.`paddock.round` = '11'", output_format="list"
    )[0]
    assert "rm-" not in run.data.tags["paddock.upstream"]  # the reward models chose nothing


def test_the_monitor_s_own_prompts_leave_the_round_as_it_was(chain, world_dir: Path):
    """collect.monitor_prompts: the round's batch and answers are those of the same round without them (their
    batches come after the round's, seeded as before); their answers, to prompts of other words, join the
    monitor's answer pairs."""
    from paddock.rlhf import preferences as prefs

    # A quarter safety prompts (the monitor's 4 of them, from the 7 left): refusals against compliance give the
    # verifiers' clear pairs that a tiny model's facts rarely do
    same = ("collect.round=12", "collect.max_prompts=24", "collect.safety_share=0.25")
    plain = four_answers(world_dir, *same)
    extra = four_answers(world_dir, *same, "registry_prefix=tinymon", "collect.monitor_prompts=16")
    batches = [pq.read_table(prefs.run(job).batch).to_pylist() for job in (plain, extra)]
    assert batches[0] == batches[1] and len(batches[0]) == 24
    answers = [
        pq.read_table(prefs.work_dir(job) / "round12" / "answers.parquet").to_pylist()
        for job in (plain, extra)
    ]
    assert answers[1][:24] == answers[0] and not any(r["monitor"] for r in answers[0])
    mine = answers[1][24:]
    assert len(mine) == 16 and all(r["monitor"] and len(r["answers"]) == 4 for r in mine)
    assert sum(r["is_safety"] for r in mine) == 4  # the round's safety share
    asked = {json.dumps(r["prompt"]) for r in answers[0]}
    assert not {json.dumps(r["prompt"]) for r in mine} & asked  # other words than the round's
    pairs = [prefs.held_out_answer_pairs(job) for job in (plain, extra)]
    ids = {p["id"].removeprefix("pref-").split(":")[0] for p in pairs[1]}
    assert pairs[0] == [
        p for p in pairs[1] if not p["id"].startswith(tuple(f"pref-{r['id']}:" for r in mine))
    ]
    assert ids & {r["id"] for r in mine}  # the monitor's own answers are paired (those not all alike)
    metrics = prefs.monitor(extra, {"after": RMS}, static_pairs=10)
    assert metrics["monitor/answer_pairs"] == len(pairs[1]) > len(pairs[0])
