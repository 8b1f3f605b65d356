"""No silent hangs: a scorer that never answers fails PPO's iteration within ``actor_timeout_s``, naming it.

The driver's rollout step runs against real Ray actors standing in for the scorers (one of them hangs from its first
call, a deterministic fault) and canned samples in place of the rollout workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from chain import REPO
from faults import kill_and_wait

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_a_hung_scorer_fails_the_iteration_within_its_timeout_naming_it(ray_cluster, tmp_path: Path) -> None:
    import ray
    from paddock.cluster import ActorTimeout, gather
    from paddock.config import PPOJob, load_config
    from paddock.ppo.hub import Publication
    from paddock.ppo.loop import Driver

    @ray.remote(num_cpus=0)
    class StandIn:
        def __init__(self, hang: bool):
            self.hang = hang

        def ref_logprobs(self, prompt_ids: list, response_ids: list) -> list:
            return [[-1.0] * len(r) for r in response_ids]

        def rewards(self, turns: list, texts: list) -> list:
            if self.hang:
                time.sleep(3600)
            return [0.5] * len(texts)

    class Actors:
        timeout_s = 3.0

        def generate(self, pub: Publication, prompts: list, seed: int, reference: bool = False) -> list:
            return [
                {
                    "prompt_ids": [1, 5],
                    "response_ids": [7, 2],
                    "text": "Paris.",
                    "policy_version": pub.version,
                }
                for _ in prompts
            ]

        def values(self, pub: Publication, rows: list) -> list:
            return [[0.0] * len(r["response_ids"]) for r in rows]

    actors = Actors()
    actors.reference, actors.rm_h, actors.rm_s = (  # type: ignore[attr-defined]
        StandIn.remote(False),
        StandIn.remote(False),
        StandIn.remote(True),
    )
    ray.get([a.rewards.remote([], []) for a in (actors.reference, actors.rm_h)])  # started
    job = load_config(
        PPOJob,
        REPO / "jobs/configs/tiny/ppo.yaml",
        ["actor_timeout_s=3", "ppo.batch_prompts=16", "ppo.mini_batch=16"],
    )
    prompts = [
        {"id": f"p{i}", "turns": [{"role": "user", "content": "Capital of France?"}]} for i in range(4)
    ]
    driver = Driver(job, None, tmp_path, prompts, [], actors, None, None)  # type: ignore[arg-type]
    pub = Publication(version=3, iteration=2, policy=[], value=[], nbytes=0)
    t0 = time.monotonic()
    with pytest.raises(ActorTimeout) as err:
        driver.rollout(pub, 0)
    waited = time.monotonic() - t0
    message = str(err.value)
    assert message.startswith(
        "scoring batch 0 (version 3): no answer from the safety reward model within 3 s"
    )
    assert (
        "helpfulness" not in message and "reference" not in message
    )  # the ones that answered are not blamed
    assert 3.0 <= waited < 60.0, waited
    # the same helper with every actor answering returns their results in order
    assert gather(
        {"a": actors.rm_h.rewards.remote([], ["x"]), "b": actors.reference.ref_logprobs.remote([], [[1]])},
        30,
        "t",
    ) == [[0.5], [[-1.0]]]
    for a in (actors.reference, actors.rm_h, actors.rm_s):
        ray.kill(a)


def test_the_hub_or_the_buffer_dying_ends_the_run_naming_it(ray_cluster, tmp_path: Path) -> None:
    """The policy hub and the rollout buffer hold the run's publications and experience, which a restart would not
    have: a dead one stops the driver with ``ActorLost`` naming it, where an unguarded ``ray.get`` raised Ray's
    own error (or, hung, waited for ever)."""
    import ray
    from paddock.cluster import ActorLost
    from paddock.config import PPOJob, load_config
    from paddock.ppo.buffer import RolloutBuffer
    from paddock.ppo.hub import PolicyHub
    from paddock.ppo.loop import Driver

    class Actors:
        timeout_s = 30.0

    job = load_config(PPOJob, REPO / "jobs/configs/tiny/ppo.yaml", [])
    hub, buffer = PolicyHub.remote(), RolloutBuffer.remote(64)  # type: ignore[attr-defined]
    driver = Driver(job, None, tmp_path, [], [], Actors(), hub, buffer)  # type: ignore[arg-type]
    kill_and_wait(buffer)
    with pytest.raises(ActorLost, match=r"^PPO's driver at batch 0: the rollout buffer died \(\w+Error\)"):
        driver.stop("kl_limit passed")  # the hub answers (its stop request is kept); the buffer does not
    assert ray.get(hub.stop_requested.remote()) == "kl_limit passed"
    kill_and_wait(hub)
    alive = threading.Thread(target=time.sleep, args=(30,), daemon=True)
    alive.start()  # the learners' fit, still running
    t0 = time.monotonic()
    with pytest.raises(ActorLost, match=r"the policy hub died"):
        driver.loop(alive)  # waits for a publication from the hub first
    assert time.monotonic() - t0 < 30


def test_a_lost_version_is_asked_for_again_and_the_run_ends_after_the_attempts(ray_cluster, tmp_path: Path):
    """The driver whose receivers lost a version asks the learners for it again when it is their latest (and
    only waits when a newer one is out); ``ppo.weight_sync_attempts`` losses in a row end the run with the last
    cause rather than a wait that nothing ends."""
    import ray
    from paddock.config import PPOJob, load_config
    from paddock.ppo.buffer import RolloutBuffer
    from paddock.ppo.hub import PolicyHub
    from paddock.ppo.loop import Driver

    class Actors:
        timeout_s = 30.0

    job = load_config(PPOJob, REPO / "jobs/configs/tiny/ppo.yaml", ["ppo.weight_sync_attempts=3"])
    hub, buffer = PolicyHub.remote(), RolloutBuffer.remote(64)  # type: ignore[attr-defined]
    driver = Driver(job, None, tmp_path, [], [], Actors(), hub, buffer)  # type: ignore[arg-type]
    ray.get(buffer.publish_version.remote(2))
    driver.lost(1, "version 1 reached too few receivers")  # a newer one is out: nothing to ask
    assert (driver.resends, driver.broken, ray.get(buffer.resend_requested.remote())) == (0, True, None)
    driver.lost(2, "the value scorer holds version 0, not 2 (restarted?) mid-batch")
    assert (driver.resends, ray.get(buffer.resend_requested.remote())) == (1, 2)
    with pytest.raises(
        RuntimeError, match=r"lost the weights 3 times in a row .*the last time: the stream broke"
    ):
        driver.lost(2, "the stream broke")
    for a in (hub, buffer):
        ray.kill(a)


def test_evaluation_and_collection_calls_time_out_naming_the_actor(ray_cluster) -> None:
    """The helpers evaluation, rejection sampling and preference collection wait on (both reward scorers, the
    rollout workers' weights and perplexity) take the stage's ``actor_timeout_s`` and name the actor that hung."""
    import ray
    from paddock.cluster import ActorTimeout
    from paddock.evaluate import workers_perplexity
    from paddock.rollout.actors import combined_scores, held_weights

    @ray.remote(num_cpus=0)
    class Hangs:
        def __init__(self, hang: bool):
            self.hang = hang

        def _maybe_hang(self) -> None:
            if self.hang:
                time.sleep(3600)

        def rewards(self, turns: list, texts: list) -> list:
            self._maybe_hang()
            return [0.25] * len(texts)

        def weights(self) -> tuple:
            self._maybe_hang()
            return (4, "digest")

        def answer_nll(self, dialogs: list, seq_len: int) -> tuple:
            self._maybe_hang()
            return (0.0, 1)

    fine, hung = Hangs.remote(False), Hangs.remote(True)
    turns = [[{"role": "user", "content": "Capital of France?"}]] * 2
    h, s, combined = combined_scores(fine, fine, turns, ["Paris.", "Lyon."], [False, False], 30)
    assert h.tolist() == s.tolist() == [0.25, 0.25] and combined.shape == (2,)
    with pytest.raises(
        ActorTimeout, match=r"^scoring 2 answers: no answer from safety reward scorer within 2 s"
    ):
        combined_scores(fine, hung, turns, ["Paris.", "Lyon."], [False, False], 2)
    assert held_weights([fine, fine], 30) == (4, "digest")
    with pytest.raises(ActorTimeout, match=r"no answer from rollout worker 1 within 2 s"):
        held_weights([fine, hung], 2)
    with pytest.raises(
        ActorTimeout, match=r"^perplexity of 2 dialogs: no answer from rollout worker 1 within"
    ):
        workers_perplexity([fine, hung], [{"turns": []}, {"turns": []}], 16, 2)
    for a in (fine, hung):
        ray.kill(a)


def test_weights_that_reach_no_receiver_fail_once_within_one_timeout(ray_cluster) -> None:
    """``Actors.load`` waits for every receiver of a publication against one deadline, not one each: three rollout
    workers that never finish receiving cost one ``actor_timeout_s`` (and the liveness check's one), then
    ``WeightsLost`` names them all. Waiting on each in turn took a timeout per worker, and again per worker to
    check that they were alive."""
    import ray
    from paddock.ppo.hub import Publication
    from paddock.ppo.loop import Actors, WeightsLost

    @ray.remote(num_cpus=0)
    class Receiver:
        def __init__(self, hang: bool):
            self.hang = hang

        def receive(self, channel: object, spec: list, rank: int, version: int) -> int:
            if self.hang:
                time.sleep(3600)
            return version

        def version(self) -> int:
            return 0

    class Channel:
        timeout_s = 2.0

        def sub(self, name: str, size: int, closes_at: float | None = None) -> str:
            return name

    actors = Actors.__new__(Actors)
    actors.channel, actors.timeout_s = Channel(), 2.0  # type: ignore[assignment]
    actors.workers = [Receiver.remote(True) for _ in range(3)]
    actors.value = Receiver.remote(False)
    ray.get([a.version.remote() for a in [*actors.workers, actors.value]])  # started
    pub = Publication(version=2, iteration=1, policy=[], value=[], nbytes=0)
    t0 = time.monotonic()
    with pytest.raises(WeightsLost, match=r"rollout worker 0', 'rollout worker 1', 'rollout worker 2'"):
        actors.load(pub)
    waited = time.monotonic() - t0
    assert 2.0 <= waited < 7.0, waited  # 2 s to load, 2 s to see them alive; 12 s one by one
    for a in [*actors.workers, actors.value]:
        ray.kill(a)


@pytest.mark.parametrize(
    ("announced_ago", "receivers", "lost", "why"),
    [
        (30.0, None, 0, r"was announced 30 s ago: its learners stopped waiting for receivers after 20 s"),
        (0.0, None, 1, r"went to a group of 3 receiving ranks; the 2 rollout workers left take 2"),
        (0.0, 3, 0, r"went to a group of 3 receiving ranks; the 2 rollout workers left take 2"),
    ],
)
def test_a_publication_whose_group_cannot_complete_is_not_joined(
    ray_cluster, announced_ago: float, receivers: int | None, lost: int, why: str
) -> None:
    """A publication whose sender stopped waiting (announced longer ago than the weight-sync timeout), or whose
    group was sized for a rollout worker since dead for good, is not joined by the rollout workers (each would wait
    in a group that cannot complete): ``WeightsLost`` at once, the value scorer still taking its own stream."""
    import ray
    from paddock.ppo.hub import Publication
    from paddock.ppo.loop import Actors, WeightsLost

    @ray.remote(num_cpus=0)
    class Receiver:
        def __init__(self) -> None:
            self.got: list[int] = []

        def receive(self, channel: object, spec: list, rank: int, version: int) -> int:
            self.got.append(version)
            return version

        def received(self) -> list[int]:
            return self.got

    class Channel:
        timeout_s = 20.0

        def sub(self, name: str, size: int, closes_at: float | None = None) -> str:
            return name

    actors = Actors.__new__(Actors)
    actors.channel, actors.timeout_s, actors.lost = Channel(), 20.0, lost  # type: ignore[assignment]
    actors.workers = [Receiver.remote() for _ in range(2)]
    actors.value = Receiver.remote()
    pub = Publication(version=2, iteration=1, policy=[], value=[], nbytes=0, receivers=receivers)
    pub.published_at -= announced_ago
    t0 = time.monotonic()
    with pytest.raises(WeightsLost, match=r"^version 2 \(attempt 0\) " + why):
        actors.load(pub)
    assert time.monotonic() - t0 < 10.0  # not the 20 s a receiver would wait
    assert ray.get([w.received.remote() for w in actors.workers]) == [[], []]
    assert ray.get(actors.value.received.remote()) == [2]
    for a in [*actors.workers, actors.value]:
        ray.kill(a)


def test_a_dead_rollout_worker_is_passed_over_when_the_engines_sleep_and_wake(ray_cluster, capsys) -> None:
    """``ppo.engine_sleep``'s turns do not end a run whose rollout worker died: the others sleep and wake, the dead
    one is named and passed over (a restarted worker comes back awake; the next load and the repairs deal with its
    weights), and a hung one costs one ``actor_timeout_s``, not one each."""
    import ray
    from paddock.ppo.loop import Actors

    @ray.remote(num_cpus=0, max_restarts=0)
    class Engine:
        def __init__(self, freed: float, hang: bool = False):
            self.freed, self.hang, self.awake = freed, hang, True

        def sleep(self) -> float:
            if self.hang:
                time.sleep(3600)
            self.awake = False
            return self.freed

        def wake(self, tags: tuple[str, ...]) -> None:
            self.awake = tags == ("weights",)

        def is_awake(self) -> bool:
            return self.awake

    actors = Actors.__new__(Actors)
    actors.timeout_s = 2.0
    actors.workers = [Engine.remote(1.5), Engine.remote(2.5), Engine.remote(0.5)]
    ray.get([w.is_awake.remote() for w in actors.workers])  # started
    kill_and_wait(actors.workers[1])
    assert actors.sleep() == 1.5  # the live ones' most; the dead one passed over
    assert ray.get([actors.workers[i].is_awake.remote() for i in (0, 2)]) == [False, False]
    actors.wake()
    assert ray.get([actors.workers[i].is_awake.remote() for i in (0, 2)]) == [True, True]
    assert (
        "rollout worker 1 was passed over giving up its device memory: ActorDiedError"
        in capsys.readouterr().out
    )
    first, hung = actors.workers, [Engine.remote(1.0, hang=True) for _ in range(3)]
    actors.workers = hung
    t0 = time.monotonic()
    assert actors.sleep() == 0.0
    assert 1.5 <= time.monotonic() - t0 < 5.0  # ray.get may return a hair before its timeout
    for a in [first[0], first[2], *hung]:
        ray.kill(a)
