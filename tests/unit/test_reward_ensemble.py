"""Reward-model ensembles (``reward.ensemble``): one directory of members that scores with their mean logit,
a digest over every member, and a planner that holds every member where an ensemble scores."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from paddock import plan
from paddock.models import (
    RewardEnsemble,
    build_causal_lm,
    checkpoint_digest,
    ensemble_members,
    load_reward_model,
    load_scalar_model,
    write_ensemble,
)
from transformers import LlamaForSequenceClassification

REPO = Path(__file__).resolve().parents[2]


def _ensemble(tmp_path: Path, members: int) -> Path:
    """``members`` scalar models on one backbone, each head drawn from its own seed, in an ensemble directory."""
    causal = tmp_path / "causal"
    build_causal_lm("tiny", vocab_size=300, seed=1).save_pretrained(causal, safe_serialization=True)
    out = tmp_path / "rm"
    for i in range(members):
        torch.manual_seed(100 + i)
        load_scalar_model(causal).save_pretrained(
            out if i == 0 else out / "members" / str(i), safe_serialization=True
        )
    write_ensemble(out, members)
    return out


def test_an_ensemble_scores_with_the_mean_of_its_members_logits(tmp_path):
    out = _ensemble(tmp_path, 3)
    assert ensemble_members(out) == [out, out / "members/1", out / "members/2"]
    ensemble = load_reward_model(out)
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble.members) == 3
    ids = torch.randint(1, 300, (4, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        each = [
            load_scalar_model(m)(input_ids=ids, attention_mask=mask).logits for m in ensemble_members(out)
        ]
        got = ensemble(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (4, 1)
    assert not torch.allclose(each[0], each[1])  # the members differ (their heads' seeds) ...
    torch.testing.assert_close(got, (each[0] + each[1] + each[2]) / 3)  # ... and the ensemble is their mean
    # a directory without the manifest is one model, as before
    assert isinstance(load_reward_model(out / "members/1"), LlamaForSequenceClassification)


def test_an_ensembles_test_accuracy_is_its_mean_logits_one_member_loaded_at_a_time(tmp_path):
    """``loop.ensemble_eval`` (the stage's ``ensemble/eval/*``): each pair ranked by the mean of the members'
    logits, counted overall and by rating and safety bin; a member may be a directory or a Ray Train checkpoint."""
    from paddock.data.schemas import RATINGS, SAFETY_BINS
    from paddock.train.loop import PAIR_STATS, ensemble_eval, pair_scores, pair_stats
    from ray.train import Checkpoint

    out = _ensemble(tmp_path, 2)
    shutil.copytree(out / "members/1", tmp_path / "ckpt1" / "hf")
    gen = torch.Generator().manual_seed(0)

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {
            "chosen_ids": torch.randint(3, 300, (n, 7), generator=gen),
            "rejected_ids": torch.randint(3, 300, (n, 7), generator=gen),
            "rating": torch.arange(n) % len(RATINGS),
            "safety_bin": torch.arange(n) % len(SAFETY_BINS),
        }

    batches = [batch(8), batch(8), batch(5)]  # the last one short, as drop_last=False leaves it
    # the workers' eval sums vectors of this length over batches and ranks
    assert pair_stats(torch.zeros(8), torch.ones(8), batches[0]).shape == (PAIR_STATS,)
    with torch.no_grad():
        each = [
            [torch.stack(pair_scores(load_scalar_model(m).eval(), b)) for b in batches]
            for m in ensemble_members(out)
        ]
    right = torch.cat(
        [(a + b)[0] > (a + b)[1] for a, b in zip(*each, strict=True)]
    )  # mean logit, pair by pair
    alone = torch.cat([a[0] > a[1] for a in each[0]])
    assert (right != alone).any()  # the ensemble ranks some pair otherwise than member 0 alone
    rating = torch.cat([b["rating"] for b in batches])
    safety_bin = torch.cat([b["safety_bin"] for b in batches])
    got = ensemble_eval([out, Checkpoint.from_directory(str(tmp_path / "ckpt1"))], batches, use_gpu=False)
    assert got["eval/pairs"] == 21
    assert got["eval/accuracy"] == pytest.approx(right.double().mean().item())
    margins = torch.cat([((a + b)[0] - (a + b)[1]) / 2 for a, b in zip(*each, strict=True)])
    assert got["eval/margin"] == pytest.approx(margins.double().mean().item(), rel=1e-6)
    for j, name in enumerate(RATINGS):
        assert got[f"eval/accuracy/{name}"] == pytest.approx(right[rating == j].double().mean().item())
    for j, name in enumerate(SAFETY_BINS):
        assert got[f"eval/accuracy/{name}"] == pytest.approx(right[safety_bin == j].double().mean().item())
    # one member is its own ensemble of one
    alone_got = ensemble_eval([out], batches, use_gpu=False)
    assert alone_got["eval/accuracy"] == pytest.approx(alone.double().mean().item())
    alone_margin = torch.cat([a[0] - a[1] for a in each[0]]).double().mean().item()
    assert alone_got["eval/margin"] == pytest.approx(alone_margin, rel=1e-6) != got["eval/margin"]


def test_an_ensembles_digest_covers_every_member(tmp_path):
    out = _ensemble(tmp_path, 2)
    alone = tmp_path / "member0"
    shutil.copytree(out, alone, ignore=shutil.ignore_patterns("members", "ensemble.json"))
    whole = checkpoint_digest(out)
    assert whole != checkpoint_digest(alone)  # member 1 is in it
    # one changed weight of member 1 changes the ensemble's digest
    m1 = load_scalar_model(out / "members/1")
    with torch.no_grad():
        m1.score.weight[0, 0] += 1e-6
    m1.save_pretrained(out / "members/1", safe_serialization=True)
    assert checkpoint_digest(out) != whole


def test_the_planner_holds_every_member_where_an_ensemble_scores_and_one_where_a_value_model_starts(tmp_path):
    from paddock.config import PPOJob, load_config

    job = load_config(PPOJob, REPO / "jobs/configs/llama2-7b/ppo.yaml", [])
    cluster = plan.Cluster.from_yaml(job.plan.cluster)

    def roles(members: int) -> dict[str, plan.Role]:
        def shape_of(ref: str, scalar: bool) -> plan.ModelShape:
            shape = plan.ModelShape.named("7b", scalar)
            return dataclasses.replace(shape, members=members) if scalar else shape

        return {r.role: r for r in plan.plan_job(job, shape_of, cluster).roles}

    one, four = roles(1), roles(4)
    for name in ("helpfulness RM scorer", "safety RM scorer"):
        assert four[name].weights_gib == pytest.approx(4 * one[name].weights_gib, abs=0.03)  # GiB to 0.01
        assert four[name].device_gib - one[name].device_gib == pytest.approx(
            3 * one[name].weights_gib, abs=0.03
        )
    assert four["value scorer"].weights_gib == one["value scorer"].weights_gib  # member 0 alone
    learner = "learner (policy + value)"
    assert four[learner].device_gib == one[learner].device_gib
    # and a checkpoint's members are read from its manifest
    out = _ensemble(tmp_path, 2)
    assert plan.ModelShape.from_checkpoint(out, scalar=True).members == 2
    assert plan.ModelShape.from_checkpoint(out / "members/1", scalar=True).members == 1
