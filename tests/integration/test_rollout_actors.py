"""Rollout workers and scorers as Ray actors: weights streamed by version, scores, restart after a kill."""

import os
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROMPTS = [
    {"id": "a", "turns": [{"role": "user", "content": "What is the capital of France?"}], "is_safety": False},
    {"id": "b", "turns": [{"role": "user", "content": "How do I build a pipe bomb?"}], "is_safety": True},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok):
    from paddock.models import build_causal_lm, load_scalar_model

    root = tmp_path_factory.mktemp("ckpt")
    for name, seed in (("policy", 0), ("other", 1)):
        build_causal_lm("tiny", vocab_size=len(tok), max_seq_len=256, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    # A saved reward model: its scalar head is part of the checkpoint, so a restarted scorer scores the same.
    load_scalar_model(root / "policy").save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root


def test_worker_generates_and_loads_published_weights(ray_cluster, checkpoints: Path):
    import ray
    from paddock.models import load_causal_lm
    from paddock.rollout.actors import RolloutWorker, Scorer

    worker = RolloutWorker.options(num_cpus=0.25).remote(
        str(checkpoints / "policy"), max_new_tokens=8, temperature=1.0, top_p=0.9
    )
    rows = ray.get(worker.generate.remote(PROMPTS, seed=0))
    assert [r["prompt_id"] for r in rows] == ["a", "b"] and all(r["policy_version"] == 0 for r in rows)
    assert all(len(r["behaviour_logprobs"]) == len(r["response_ids"]) > 0 for r in rows)

    # The reference scorer holding the same weights reproduces the behaviour log-probs exactly.
    ref = Scorer.options(num_cpus=0.25).remote(str(checkpoints / "policy"), "reference")
    ref_lp = ray.get(
        ref.ref_logprobs.remote([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
    )
    for r, lp in zip(rows, ref_lp, strict=True):
        assert lp == pytest.approx(r["behaviour_logprobs"], abs=1e-4)

    # Publish other weights as version 1 over a gloo group (this process sends, as learner rank 0 does): the
    # worker's log-probs now differ from the reference's.
    import torch
    from paddock.ppo import sync

    store = sync.rendezvous("127.0.0.1", 60.0)
    channel = sync.Channel("127.0.0.1", store.port, "gloo", "float32", 60.0).sub("pub1/policy", 2)
    other = load_causal_lm(checkpoints / "other")
    lay = sync.module_layout(other, 64 * 1024, torch.float32)
    received = worker.receive.remote(channel, lay, 1, 1)
    assert sync.send_module(channel, other, lay, 0, torch.device("cpu")) == sync.nbytes(lay, torch.float32)
    assert ray.get(received) == 1 and ray.get(worker.version.remote()) == 1
    rows1 = ray.get(worker.generate.remote(PROMPTS, seed=0))
    assert all(r["policy_version"] == 1 for r in rows1)
    ref_lp1 = ray.get(
        ref.ref_logprobs.remote([r["prompt_ids"] for r in rows1], [r["response_ids"] for r in rows1])
    )
    assert any(
        abs(a - b) > 1e-3
        for r, lp in zip(rows1, ref_lp1, strict=True)
        for a, b in zip(r["behaviour_logprobs"], lp, strict=True)
    )

    # Evaluation swaps whole checkpoints into the same workers: back to the policy, stamped version 2.
    assert ray.get(worker.load_checkpoint.remote(str(checkpoints / "policy"), 2)) == 2
    rows2 = ray.get(worker.generate.remote(PROMPTS, seed=0))
    assert all(r["policy_version"] == 2 for r in rows2)
    assert [r["response_ids"] for r in rows2] == [r["response_ids"] for r in rows]
    for r, r0 in zip(rows2, rows, strict=True):
        assert r["behaviour_logprobs"] == pytest.approx(r0["behaviour_logprobs"], abs=1e-5)


def test_colocated_scorers_score_as_separate_ones(ray_cluster, checkpoints: Path):
    import ray
    from paddock.rollout.actors import Member, Scorer, Scorers

    prompt_ids, response_ids = [[1, 5, 9, 11], [1, 7]], [[20, 21, 2], [30, 2]]
    turns = [p["turns"] for p in PROMPTS]
    answers = ["Paris is the capital of France.", "I can't help with that."]
    members = {
        "reference": {"checkpoint": str(checkpoints / "policy"), "kind": "reference"},
        "rm": {"checkpoint": str(checkpoints / "rm"), "kind": "reward", "seq_len": 128},
    }
    together = Scorers.options(num_cpus=0.5).remote(members)
    ref, rm = Member(together, "reference"), Member(together, "rm")
    alone = {n: Scorer.options(num_cpus=0.25).remote(**kw) for n, kw in members.items()}
    assert ray.get(ref.ref_logprobs.remote(prompt_ids, response_ids)) == ray.get(
        alone["reference"].ref_logprobs.remote(prompt_ids, response_ids)
    )
    assert ray.get(rm.rewards.remote(turns, answers)) == ray.get(alone["rm"].rewards.remote(turns, answers))
    with pytest.raises(ray.exceptions.RayTaskError, match="rewards needs a reward scorer"):
        ray.get(ref.rewards.remote(turns, answers))
    for a in (together, *alone.values()):
        ray.kill(a)


@pytest.mark.reliability
def test_reward_scorer_and_restart_after_kill(ray_cluster, checkpoints: Path):
    import ray
    from paddock.rollout.actors import Scorer

    rm = Scorer.options(num_cpus=0.25).remote(str(checkpoints / "rm"), "reward", seq_len=128)
    scores = ray.get(rm.rewards.remote([p["turns"] for p in PROMPTS], ["Paris.", "No."]))
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    pid = ray.get(rm.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    again = ray.get(rm.rewards.remote([p["turns"] for p in PROMPTS], ["Paris.", "No."]), timeout=120)
    assert again == pytest.approx(scores, abs=1e-6)
    assert ray.get(rm.__ray_call__.remote(lambda self: os.getpid())) != pid
    with pytest.raises(ray.exceptions.RayTaskError, match="needs a reference scorer"):
        ray.get(rm.ref_logprobs.remote([[1]], [[2]]))


def test_workers_compute_the_evaluation_perplexity_and_save_the_weights_they_hold(
    ray_cluster, checkpoints: Path, tmp_path
):
    """Perplexity runs on the rollout workers (the driver never loads the model) and equals the in-process value;
    a worker writes the weights it holds with their digest, and refuses when asked for another version."""
    import ray
    from paddock.evaluate import answer_perplexity, workers_perplexity
    from paddock.models import checkpoint_digest
    from paddock.rollout.actors import RolloutWorker, StaleWeightsError, held_weights

    dialogs = [
        {"turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {
            "turns": [
                {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "Five."},
            ]
        },
        {"turns": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    ]
    workers = [
        RolloutWorker.options(num_cpus=0.25).remote(
            str(checkpoints / "policy"), max_new_tokens=8, temperature=1.0, top_p=0.9, logits_chunk=4
        )
        for _ in range(2)
    ]
    here = answer_perplexity(str(checkpoints / "policy"), dialogs, 64)
    assert abs(workers_perplexity(workers, dialogs, 64, 300) - here) < 1e-3 * here
    version, digest = held_weights(workers, 300)
    assert version == 0 and digest == checkpoint_digest(checkpoints / "policy")
    written = ray.get(workers[0].save.remote(str(tmp_path / "best"), 0, {"ITERATION": "0"}))
    assert written == digest == checkpoint_digest(tmp_path / "best")
    with pytest.raises(StaleWeightsError, match="holds version 0"):
        ray.get(workers[1].save.remote(str(tmp_path / "other"), 3))
    assert not (tmp_path / "other").exists()
    for w in workers:
        ray.kill(w)


@pytest.mark.reliability
def test_ppo_stops_at_once_when_every_rollout_worker_is_dead_for_good(ray_cluster):
    """Rollout workers whose constructor fails every time (Ray's restarts used up) end the run's weight load at
    once with their error, instead of waiting on a value scorer whose stream waits for them (the learners' 900 s
    weight-sync timeout, then the driver's wait for a next version). A worker Ray is restarting is waited for."""
    import time
    from types import SimpleNamespace

    import ray
    from paddock.ppo.hub import Publication
    from paddock.ppo.loop import Actors, ActorsDead

    @ray.remote(num_cpus=0.05, max_restarts=1, max_task_retries=2)
    class Broken:
        def __init__(self) -> None:
            raise ValueError("vllm.max_model_len 512 is beyond the checkpoint's 256 positions")

        def version(self) -> int:
            return 0

        def receive(self, *args) -> None:
            return None

    @ray.remote(num_cpus=0.05, max_restarts=1, max_task_retries=2)
    class Blocked:  # a receiver waiting for group members that never come
        def version(self) -> int:
            return 0

        def receive(self, *args) -> None:
            time.sleep(300)

    actors = object.__new__(Actors)
    actors.workers = [Broken.remote() for _ in range(2)]
    actors.value = Blocked.remote()
    actors.channel = SimpleNamespace(timeout_s=600.0, sub=lambda prefix, size, closes_at=None: None)
    actors.timeout_s = 600.0
    pub = Publication(version=1, iteration=0, policy=[], value=None, nbytes=0)
    start = time.monotonic()
    with pytest.raises(ActorsDead, match=r"all 2 rollout workers are dead.*max_model_len 512 is beyond"):
        actors.load(pub)
    assert time.monotonic() - start < 200  # not the blocked receiver's 300 s (nor the channel's 600)

    alive = Blocked.remote()
    ray.get(alive.version.remote())
    ray.kill(alive, no_restart=False)  # Ray restarts it: not dead, the check waits for it
    actors.workers = [alive]
    assert actors.drop_dead(wait_s=60) == [] and actors.workers == [alive]
    ray.kill(actors.value)
