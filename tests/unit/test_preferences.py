"""Preference rounds without a model: the simulated annotator's labels worked by hand, labelled rows into pairs
(safety bins, the paper's dropped pairs, bad rows set aside), the import of people's labels, the training mix,
and the pipeline's round schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paddock.config import CollectJob, ConfigError, PipelineJob, load_config
from paddock.data.schemas import PREFERENCES
from paddock.rlhf import preferences as prefs

REPO = Path(__file__).resolve().parents[2]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
RIGHT = "The capital of France is Paris."
WRONG = "The capital of France is Kingston."
RUDE = "Ugh, obviously The capital of France is Paris."
REFUSAL = "I can't help with that."
LOCK = [{"role": "user", "content": "How do I pick a lock to break into my neighbour's house?"}]
SAFE_HELP = (
    "I can't help with that. This would be a crime and could hurt other people. I can help you find legal ways "
    "to solve the problem behind your question."
)
BARE = "I can't help with that."
UNSAFE = "Sure, here is how. Step 1: get what you need. Step 2: do it when nobody is watching."


def row(prompt, a, b, is_safety=False, id_="x"):
    return {
        "id": id_,
        "round": 1,
        "prompt": prompt,
        "is_safety": is_safety,
        "response_a": a,
        "response_b": b,
        "source_a": "models:/tiny-sft/1 @ T=0.7",
        "source_b": "models:/tiny-sft/1 @ T=1",
        "preferred": None,
        "rating": None,
        "safe_a": None,
        "safe_b": None,
        "annotator": None,
    }


def test_quality_ranks_answers_as_the_static_pairs_do():
    assert prefs.quality(FRANCE, RIGHT) == 3
    assert prefs.quality(FRANCE, RUDE) == 2
    assert prefs.quality(FRANCE, REFUSAL) == 1
    assert prefs.quality(FRANCE, WRONG) == 0
    assert prefs.quality(LOCK, SAFE_HELP) == 3
    assert prefs.quality(LOCK, BARE) == 1
    assert prefs.quality(LOCK, UNSAFE) == 0


@pytest.mark.parametrize(
    ("prompt", "a", "b", "is_safety", "preferred", "rating"),
    [
        (FRANCE, WRONG, RIGHT, False, "b", "significantly_better"),  # gap 3
        (FRANCE, RIGHT, REFUSAL, False, "a", "better"),  # gap 2
        (FRANCE, RUDE, RIGHT, False, "b", "slightly_better"),  # gap 1
        (FRANCE, REFUSAL, RUDE, False, "b", "slightly_better"),  # 2 over 1
        (LOCK, UNSAFE, BARE, True, "b", "significantly_better"),  # safe over unsafe, whatever the gap
        (LOCK, SAFE_HELP, BARE, True, "a", "better"),  # both safe: by helpfulness
    ],
)
def test_the_simulated_annotator_labels_by_the_verifiers(prompt, a, b, is_safety, preferred, rating):
    label = prefs.simulated_label(row(prompt, a, b, is_safety), seed=0, noise=0.0)
    assert (label["preferred"], label["rating"]) == (preferred, rating)
    assert label["safe_a"] == (a != UNSAFE) and label["safe_b"] == (b != UNSAFE)


def test_ties_are_negligible_when_good_and_unsure_when_bad():
    good = prefs.simulated_label(row(FRANCE, RIGHT, "Paris is the capital of France."), 0, 0.0)
    bad = prefs.simulated_label(row(FRANCE, WRONG, "Havana is the capital of France."), 0, 0.0)
    assert good["rating"] == "negligibly_better" and good["preferred"] in "ab"
    assert bad["rating"] == prefs.UNSURE


def test_label_noise_flips_the_configured_share_deterministically():
    rows = [row(FRANCE, WRONG, RIGHT, id_=f"r{i}") for i in range(1000)]
    labels = [prefs.simulated_label(r, seed=3, noise=0.2) for r in rows]
    flipped = sum(lab["preferred"] == "a" for lab in labels) / len(rows)
    assert 0.16 < flipped < 0.24  # binomial sd 0.013 at n = 1000
    assert labels == [prefs.simulated_label(r, seed=3, noise=0.2) for r in rows]  # same seed, same labels


def labelled(r, preferred, rating, safe_a=None, safe_b=None):
    return {**r, "preferred": preferred, "rating": rating, "safe_a": safe_a, "safe_b": safe_b}


def test_labelled_rows_become_pairs_with_safety_bins_and_the_paper_drops():
    rows = [
        labelled(row(FRANCE, RIGHT, WRONG, id_="h"), "a", "significantly_better"),
        labelled(row(LOCK, UNSAFE, BARE, True, id_="s1"), "b", "significantly_better", False, True),
        labelled(row(LOCK, SAFE_HELP, BARE, True, id_="s2"), "a", "better", True, True),
        labelled(row(LOCK, UNSAFE, UNSAFE + " Now.", True, id_="s3"), "a", "negligibly_better", False, False),
        # the chosen answer unsafe, the rejected safe: Llama 2 kept no such pair
        labelled(row(LOCK, UNSAFE, BARE, True, id_="s4"), "a", "better", False, True),
        labelled(row(FRANCE, WRONG, WRONG, id_="same"), "a", "negligibly_better"),
        labelled(row(FRANCE, WRONG, RUDE, id_="u"), "b", prefs.UNSURE),
        labelled(row(FRANCE, RIGHT, WRONG, id_="bad1"), "c", "better"),
        labelled(row(FRANCE, RIGHT, WRONG, id_="bad2"), "a", "much_better"),
        labelled(row(LOCK, SAFE_HELP, BARE, True, id_="bad3"), "a", "better"),  # no safety labels
    ]
    out = prefs.to_pairs(rows)
    by_id = {p["id"]: p for p in out.pairs}
    assert sorted(by_id) == ["pref-h", "pref-s1", "pref-s2", "pref-s3"]
    assert by_id["pref-h"] | {} == {
        "id": "pref-h",
        "prompt": FRANCE,
        "chosen": RIGHT,
        "rejected": WRONG,
        "rating": "significantly_better",
        "kind": "helpfulness",
        "safety_bin": None,
    }
    assert (by_id["pref-s1"]["chosen"], by_id["pref-s1"]["safety_bin"]) == (BARE, "safe_vs_unsafe")
    assert by_id["pref-s2"]["safety_bin"] == "both_safe"
    assert by_id["pref-s3"]["safety_bin"] == "both_unsafe"
    assert (out.dropped_unsafe_chosen, out.identical, out.unsure) == (1, 1, 1)
    assert [b["id"] for b in out.bad] == ["bad1", "bad2", "bad3"]
    assert "preferred must be 'a' or 'b'" in out.bad[0]["reason"]
    assert "much_better" in out.bad[1]["reason"]
    assert "safe_a and safe_b" in out.bad[2]["reason"]
    pa.Table.from_pylist(out.pairs, schema=PREFERENCES)  # the shape the reward models read


def test_people_s_labels_import_from_jsonl_and_a_wrong_shape_is_named(tmp_path: Path):
    good = tmp_path / "labelled.jsonl"
    rows = [labelled(row(FRANCE, RIGHT, WRONG, id_=f"r{i}"), "a", "better") for i in range(3)]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prefs.read_annotations(good) == rows
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({k: v for k, v in rows[0].items() if k not in ("rating", "safe_b")}) + "\n")
    with pytest.raises(prefs.PreferenceError, match=r"missing annotation column.*rating, safe_b"):
        prefs.read_annotations(missing)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(prefs.PreferenceError, match=r"broken.jsonl:2: not JSON"):
        prefs.read_annotations(broken)
    with pytest.raises(prefs.PreferenceError, match="no such labelled batch"):
        prefs.read_annotations(tmp_path / "nowhere.parquet")


def test_a_batch_is_written_as_parquet_and_jsonl_in_the_annotation_shape(tmp_path: Path):
    rows = [row(FRANCE, RIGHT, WRONG, id_="r1"), row(LOCK, UNSAFE, BARE, True, id_="r2")]
    prefs.write_batch(rows, tmp_path / "batch.parquet")
    table = pq.read_table(tmp_path / "batch.parquet")
    assert table.schema == prefs.ANNOTATION
    assert table.to_pylist() == rows
    assert [json.loads(x) for x in (tmp_path / "batch.jsonl").read_text().splitlines()] == rows


def test_the_training_mix_is_the_static_pairs_and_every_round_so_far(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    static = [
        {
            "id": f"s{i}",
            "prompt": FRANCE,
            "chosen": RIGHT,
            "rejected": WRONG,
            "rating": "better",
            "kind": "helpfulness",
            "safety_bin": None,
        }
        for i in range(5)
    ]
    (tmp_path / "world").mkdir()
    pq.write_table(pa.Table.from_pylist(static, schema=PREFERENCES), tmp_path / "world" / "static.parquet")
    job = load_config(CollectJob, None, ["static_preferences=world/static.parquet"])
    for k, n in ((1, 3), (2, 2), (3, 4)):
        d = prefs.work_dir(job) / f"round{k}"
        d.mkdir(parents=True)
        rows = [dict(static[0], id=f"r{k}-{i}") for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCES), d / "pairs_train.parquet")
    ids = prefs.training_mix(job, 2).column("id").to_pylist()
    assert ids == [f"s{i}" for i in range(5)] + ["r1-0", "r1-1", "r1-2", "r2-0", "r2-1"]  # not round 3's
    job = load_config(CollectJob, None, ["static_preferences=world/static.parquet", "collect.fresh_weight=3"])
    ids = prefs.training_mix(job, 1).column("id").to_pylist()
    assert ids == [f"s{i}" for i in range(5)] + ["r1-0", "r1-1", "r1-2", "r1-0~1", "r1-1~1", "r1-2~1"] + [
        "r1-0~2",
        "r1-1~2",
        "r1-2~2",
    ]


def test_the_pair_to_label_is_the_reward_models_favourite_and_another():
    import random

    answers = [("wrong", "m @ T=0.7"), ("hacked", "m @ T=0.7"), ("right", "m @ T=1"), ("rude", "m @ T=1")]
    seen_sides, seen_others = set(), set()
    for seed in range(40):
        [(a, b)] = prefs.pick_pairs(answers, [0.2, 0.9, 0.5, 0.9], random.Random(seed))
        pick, other = (a, b) if "pick" in a[1] else (b, a)
        assert pick == ("hacked", "m @ T=0.7, the reward models' pick of 4")  # the first of equal scores
        assert other[1].endswith(", another of 4") and other[0] != "hacked"
        seen_sides.add(pick is a)
        seen_others.add(other[0])
    assert seen_sides == {True, False}  # the pick is not always answer a
    assert seen_others == {"wrong", "right", "rude"}
    assert prefs.pick_pairs(answers, [0.2, 0.9, 0.5, 0.9], random.Random(3)) == prefs.pick_pairs(
        answers, [0.2, 0.9, 0.5, 0.9], random.Random(3)
    )
    with pytest.raises(ValueError, match="3\\+ answers"):
        prefs.pick_pairs(answers[:2], [0.1, 0.2], random.Random(0))


def test_several_pairs_per_prompt_pair_the_favourite_with_different_answers():
    import random

    answers = [("wrong", "m"), ("hacked", "m"), ("right", "m"), ("rude", "m")]
    for seed in range(20):
        pairs = prefs.pick_pairs(answers, [0.2, 0.9, 0.5, 0.1], random.Random(seed), n=3)
        assert len(pairs) == 3
        others = {t for a, b in pairs for t, src in (a, b) if "another" in src}
        assert others == {"wrong", "right", "rude"}  # each other answer once
        assert all("hacked" in (a[0], b[0]) for a, b in pairs)
    with pytest.raises(ValueError, match="1 to 3 others"):
        prefs.pick_pairs(answers, [0.2, 0.9, 0.5, 0.1], random.Random(0), n=4)
    with pytest.raises(ConfigError, match=r"at most collect\.samples - 1 = 3"):
        load_config(CollectJob, None, ["collect.samples=4", "collect.pairs_per_prompt=4"])


def test_pairing_all_labels_every_pair_of_the_different_answers_once():
    import random

    answers = [("wrong", "m @ T=0.7"), ("right", "m @ T=0.7"), ("wrong", "m @ T=1"), ("rude", "m @ T=1")]
    sides = set()
    for seed in range(20):
        pairs = prefs.all_pairs(answers, random.Random(seed))
        assert len(pairs) == 3  # 3 different answers: 3 * 2 / 2 pairs
        assert sorted(tuple(sorted((a[0], b[0]))) for a, b in pairs) == [
            ("right", "rude"),
            ("right", "wrong"),
            ("rude", "wrong"),
        ]
        assert ("wrong", "m @ T=1") not in {
            x for pair in pairs for x in pair
        }  # the first draw's source is kept
        sides.add(pairs[0][0][0])
    assert sides == {"wrong", "right"}  # the first pair comes either way round
    assert prefs.all_pairs(answers, random.Random(3)) == prefs.all_pairs(answers, random.Random(3))
    assert prefs.all_pairs([("same", "a"), ("same", "b")], random.Random(0)) == []
    five = [(str(i), "m") for i in range(5)]
    assert len(prefs.all_pairs(five, random.Random(0))) == 10


def test_pairing_all_draws_samples_once_reward_models_are_in_use_and_picks_nothing():
    two = ["reward_helpfulness=models:/h@latest", "reward_safety=models:/s@latest"]
    job = load_config(CollectJob, None, [*two, "collect.samples=4", "collect.pairing=all"])
    assert job.draws == 4 and not job.picks_by_reward  # the reward models choose no answer
    round1 = load_config(CollectJob, None, ["collect.samples=4", "collect.pairing=all"])
    assert round1.draws == 2 and not round1.picks_by_reward  # round 1: two answers, one pair, as before
    favourite = load_config(CollectJob, None, [*two, "collect.samples=4"])
    assert favourite.draws == 4 and favourite.picks_by_reward
    with pytest.raises(ConfigError, match="pairing=all labels every pair"):
        load_config(
            CollectJob, None, [*two, "collect.samples=4", "collect.pairing=all", "collect.pairs_per_prompt=2"]
        )


def test_a_questions_pairs_stay_on_one_side_of_the_split():
    # 20 prompts of 10 questions (each drawn under two ids), 3 pairs a prompt (collect.pairs_per_prompt)
    pairs = [
        {"id": f"r2-p{i}" + (f"/{j}" if j else ""), "prompt": [{"role": "user", "content": f"q{i % 10}?"}]}
        for i in range(20)
        for j in range(3)
    ]
    for seed in range(10):
        train, test = prefs.split_pairs(pairs, 0.2, seed=seed)
        assert len(test) == 12 and len(train) == 48
        words = lambda rows: {p["prompt"][0]["content"] for p in rows}  # noqa: E731
        assert not words(train) & words(test) and len(words(test)) == 2


def test_reward_models_for_picking_come_in_pairs():
    with pytest.raises(ConfigError, match="give both"):
        load_config(CollectJob, None, ["reward_safety=models:/tiny-rm-safety@latest"])
    two = ["reward_helpfulness=models:/h@latest", "reward_safety=models:/s@latest"]
    assert load_config(CollectJob, None, [*two, "collect.samples=4"]).picks_by_reward
    assert not load_config(CollectJob, None, two).picks_by_reward  # two answers: nothing to pick from
    assert not load_config(
        CollectJob, None, ["collect.samples=4"]
    ).picks_by_reward  # round 1: no reward models


def test_split_holds_out_a_seeded_share():
    pairs = [{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}?"}]} for i in range(50)]
    train, test = prefs.split_pairs(pairs, 0.2, seed=1)
    assert (len(train), len(test)) == (40, 10)
    assert sorted(p["id"] for p in train + test) == sorted(p["id"] for p in pairs)
    assert prefs.split_pairs(pairs, 0.2, seed=1) == (train, test)


def test_the_pipeline_schedules_rounds_with_their_models_and_data():
    from paddock import pipeline

    job = load_config(PipelineJob, REPO / "jobs/configs/tiny/pipeline.yaml", ["rounds=3"])
    steps = pipeline.schedule(job)
    keys = [s.key for s in steps]
    round_keys = [
        "collect_preferences",
        "reward_helpfulness",
        "reward_safety",
        "reward_monitor",
        "rejection_sampling",
        "ppo",
        "register_rlhf",
    ]
    assert keys == [
        "world",
        "tokenizer",
        "pretrain",
        "sft",
        *round_keys,
        *[f"{k}@2" for k in round_keys],
        *[f"{k}@3" for k in round_keys],
        "gatt",
        "context_distillation",
        "evaluate",
        "promote",
    ]
    over = {s.key: pipeline.round_overrides(job, s) for s in steps}
    assert over["collect_preferences"] == ["collect.round=1", "models=[models:/tiny-sft@latest]"]
    assert over["collect_preferences@3"] == [  # round 2's reward models pick the answers to label
        "collect.round=3",
        "models=[models:/tiny-rlhf-v2@latest]",
        "reward_helpfulness=models:/tiny-rm-helpfulness@latest",
        "reward_safety=models:/tiny-rm-safety@latest",
    ]
    assert over["reward_safety@2"] == ["data.train=runs/tiny-preferences/round2/train.parquet"]
    assert over["rejection_sampling"] == ["rejection.round=1"]
    assert over["rejection_sampling@2"] == ["rejection.round=2", "policy=models:/tiny-rlhf-v1@latest"]
    assert over["ppo@2"] == over["gatt"] == []
    # reward_warm_start: from round 2 each reward model starts from the previous round's
    warm = load_config(
        PipelineJob, REPO / "jobs/configs/tiny/pipeline.yaml", ["rounds=3", "reward_warm_start=true"]
    )
    over = {s.key: pipeline.round_overrides(warm, s) for s in pipeline.schedule(warm)}
    assert over["reward_helpfulness"] == ["data.train=runs/tiny-preferences/round1/train.parquet"]
    assert over["reward_safety@3"] == [
        "data.train=runs/tiny-preferences/round3/train.parquet",
        "model.init_from=models:/tiny-rm-safety@latest",
    ]
    configs = pipeline.stage_configs(warm, pipeline.schedule(warm))
    assert configs["reward_helpfulness@2"].model.init_from == "models:/tiny-rm-helpfulness@latest"
    assert configs["reward_helpfulness"].model.init_from == "models:/tiny-sft@latest"


def test_the_pipeline_s_seed_reaches_every_stage_and_not_the_world_s_content():
    from paddock import pipeline

    job = load_config(PipelineJob, REPO / "jobs/configs/tiny/pipeline.yaml", ["seed=2"])
    configs = pipeline.stage_configs(job, pipeline.schedule(job))
    assert {c.seed for c in configs.values()} == {2}
    assert configs["world"].world.seed == 0  # the same world for every seed
    assert configs["collect_preferences@2"].picks_by_reward  # the demo labels round 1's RMs' favourites
    assert configs["collect_preferences@2"].draws == 4
    assert configs["collect_preferences"].draws == 2  # round 1 has no reward models yet: two answers


def test_a_pipeline_without_collection_runs_once_as_before():
    from paddock import pipeline

    job = load_config(
        PipelineJob, REPO / "jobs/configs/tiny/pipeline.yaml", ["rounds=1", "skip=[collect_preferences]"]
    )
    keys = [s.key for s in pipeline.schedule(job)]
    assert "reward_monitor" not in keys and "register_rlhf" not in keys and "collect_preferences" not in keys
    assert keys[4:8] == ["reward_helpfulness", "reward_safety", "rejection_sampling", "ppo"]
    assert all(pipeline.round_overrides(job, s) == [] for s in pipeline.schedule(job))
    with pytest.raises(ConfigError, match="rounds: 2 rounds need the collect_preferences stage"):
        load_config(
            PipelineJob, REPO / "jobs/configs/tiny/pipeline.yaml", ["rounds=2", "skip=[collect_preferences]"]
        )


def test_the_smoke_verdicts_are_the_verifier_s():
    from paddock.pipeline import verdict

    assert verdict(FRANCE, RIGHT) == ("correct", True)
    assert verdict(FRANCE, WRONG) == ("wrong", False)
    assert verdict(FRANCE, REFUSAL) == ("refused", False)
    assert verdict(LOCK, SAFE_HELP) == ("safe refusal", True)
    assert verdict(LOCK, UNSAFE) == ("unsafe", False)
    assert verdict([{"role": "user", "content": "Tell me about your day."}], "Fine.") == (
        "no verifier for this prompt",
        None,
    )


def test_a_round_draws_other_prompts_with_the_configured_safety_share():
    from paddock.config import CollectConfig

    prompts = [{"id": f"p{i}", "is_safety": i % 10 == 0} for i in range(500)]  # 10% safety prompts
    one = prefs.draw_prompts(prompts, CollectConfig(max_prompts=100, round=1, safety_share=0.4), seed=0)
    assert len(one) == 100 and sum(p["is_safety"] for p in one) == 40
    two = prefs.draw_prompts(prompts, CollectConfig(max_prompts=100, round=2, safety_share=0.4), seed=0)
    assert {p["id"] for p in one} != {p["id"] for p in two}  # a new draw every round
    plain = prefs.draw_prompts(prompts, CollectConfig(max_prompts=100, round=1), seed=0)
    assert len(plain) == 100 and sum(p["is_safety"] for p in plain) < 20  # as they come (10% expected)
    few = prefs.draw_prompts(prompts[:100], CollectConfig(max_prompts=50, round=1, safety_share=0.5), seed=0)
    assert sum(p["is_safety"] for p in few) == 10 and len(few) == 50  # only 10 exist: the rest are others


def _prompt(i: int, text: str, is_safety: bool = False) -> dict:
    return {"id": f"p{i}", "turns": [{"role": "user", "content": text}], "is_safety": is_safety}


def test_the_monitor_s_prompts_are_not_the_round_s_or_trained_on(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    # 600 prompts in 300 wordings (each twice, under two ids), every tenth wording a safety prompt
    pool = [_prompt(i, f"question {i % 300}?", is_safety=(i % 300) % 10 == 0) for i in range(600)]
    job = load_config(
        CollectJob, None, ["collect.round=3", "collect.max_prompts=40", "collect.monitor_prompts=60"]
    )
    drawn = prefs.draw_prompts(pool, job.collect, job.seed)
    # round 1 trained on 5 wordings (a pair each); round 2's pairs_train is missing (a round that held all out)
    trained = [f"question {k}?" for k in range(5)]
    pairs = [
        {"id": f"t{k}", "prompt": [{"role": "user", "content": q}], "chosen": RIGHT, "rejected": WRONG}
        | {"rating": "better", "kind": "helpfulness", "safety_bin": None}
        for k, q in enumerate(trained)
    ]
    round1 = prefs.work_dir(job) / "round1"
    round1.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pairs, schema=PREFERENCES), round1 / "pairs_train.parquet")

    picked = prefs.draw_monitor_prompts(pool, drawn, job)
    words = [p["turns"][0]["content"] for p in picked]
    assert len(picked) == 60 and len(set(words)) == 60  # each wording once
    assert not set(words) & {p["turns"][0]["content"] for p in drawn}  # not the round's (under any id)
    assert not set(words) & set(trained)  # not what round 1's pairs trained on
    assert picked == prefs.draw_monitor_prompts(pool, drawn, job)  # seeded
    shared = load_config(
        CollectJob,
        None,
        [
            "collect.round=3",
            "collect.max_prompts=40",
            "collect.monitor_prompts=60",
            "collect.safety_share=0.25",
        ],
    )
    assert sum(p["is_safety"] for p in prefs.draw_monitor_prompts(pool, drawn, shared)) == 15
    # Fewer left than asked: what is left, each wording once (300 - the round's - round 1's)
    many = load_config(
        CollectJob, None, ["collect.round=3", "collect.max_prompts=40", "collect.monitor_prompts=500"]
    )
    left = 300 - len({p["turns"][0]["content"] for p in drawn} | set(trained))
    assert len(prefs.draw_monitor_prompts(pool, drawn, many)) == left


def test_the_monitor_pairs_up_the_held_out_and_the_monitor_s_answers_alone(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    job = load_config(CollectJob, None, ["collect.round=2"])
    d = prefs.work_dir(job) / "round2"
    d.mkdir(parents=True)
    three = [RIGHT, WRONG, RUDE]  # 3 pairs: right over wrong, right over rude, rude over wrong

    def answered(pid: str, monitor: bool) -> dict:
        return {"id": f"r2-{pid}", "round": 2, "prompt": FRANCE, "is_safety": False, "answers": three} | {
            "monitor": monitor
        }

    answers = [answered("trained", False), answered("held", False), answered("extra", True)]
    pq.write_table(pa.Table.from_pylist(answers, schema=prefs.ANSWERS), d / "answers.parquet")
    held = [{"id": "pref-r2-held", "prompt": FRANCE, "chosen": RIGHT, "rejected": WRONG, "rating": "better"}]
    held[0] |= {"kind": "helpfulness", "safety_bin": None}
    pq.write_table(pa.Table.from_pylist(held, schema=PREFERENCES), d / "pairs_test.parquet")
    pairs = prefs.held_out_answer_pairs(job)
    assert sorted(p["id"] for p in pairs) == sorted(
        f"pref-r2-{pid}:{ij}" for pid in ("held", "extra") for ij in ("0-1", "0-2", "1-2")
    )
    by_id = {p["id"]: (p["chosen"], p["rejected"]) for p in pairs}
    assert by_id["pref-r2-extra:0-1"] == (RIGHT, WRONG) and by_id["pref-r2-extra:1-2"] == (RUDE, WRONG)
    # An answers.parquet written before the monitor column: the held-out prompts' answers, as before
    old = pa.Table.from_pylist(answers).drop_columns(["monitor"])
    pq.write_table(old, d / "answers.parquet")
    assert {p["id"].split(":")[0] for p in prefs.held_out_answer_pairs(job)} == {"pref-r2-held"}


def test_the_monitor_loads_no_more_reward_models_at_once_than_the_cluster_holds(monkeypatch):
    """Eight pairs of reward models on a cluster with room for four scorers: scored two pairs at a time (all at
    once, the twelve that found no room would wait for the four that did, which wait for all of them)."""
    from types import SimpleNamespace

    import ray
    from paddock import cluster
    from paddock.rollout import actors

    alive: set[int] = set()
    most = [0]

    class Scorer:
        @classmethod
        def options(cls, **kw):
            return cls

        @classmethod
        def remote(cls, model, kind, **kw):
            return cls(model)

        def __init__(self, model: str) -> None:
            self.k = int(model.rsplit("/", 1)[1])
            alive.add(id(self))
            most[0] = max(most[0], len(alive))
            self.rewards = SimpleNamespace(remote=self.score)

        def score(self, turns, texts):  # pair k prefers the chosen answers when k is even
            n = len(texts) // 2
            sign = 1.0 if self.k % 2 == 0 else -1.0
            return [sign] * n + [-sign] * n

    monkeypatch.setattr(actors, "Scorer", Scorer)
    monkeypatch.setattr(cluster, "connect", lambda *a, **kw: None)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "kill", lambda sc: alive.discard(id(sc)))
    monkeypatch.setattr(prefs, "actor_model", lambda uri: uri)
    monkeypatch.setattr(prefs, "gather", lambda refs, timeout, doing: list(refs.values()))
    job = load_config(
        CollectJob,
        Path(__file__).resolve().parents[2] / "jobs/configs/tiny/collect_preferences.yaml",
        ["collect.cpus_per_actor=0.5"],
    )
    models = {f"m{k}": (f"models:/h/{k}", f"models:/s/{k}") for k in range(1, 9)}
    pair = {"prompt": [], "chosen": "a", "rejected": "b", "kind": "helpfulness", "rating": "better"}
    out = prefs.pair_scores(models, {"fresh": [pair] * 3}, job)
    assert most[0] == 4 and not alive  # two pairs of models at a time, each wave's scorers gone after it
    assert {k: got["fresh_agreement"] for k, got in out.items()} == {
        f"m{k}": float(k % 2 == 0) for k in range(1, 9)
    }
    assert prefs._held_at_once(2.0, 0.0, 0.5, 0.0) == 4 and prefs._held_at_once(0.3, 0.0, 0.5, 0.0) == 2
    assert prefs._held_at_once(8.0, 1.0, 0.25, 0.5) == 2
