"""The PPO driver: rollout workers, scorers, the rollout buffer and the learners, run as one MLflow stage.

Roles (ARCHITECTURE.md, "Distributed PPO"):

- the learners (``paddock.ppo.learner``, Ray Train + DeepSpeed) announce weights on the hub by version and stream
  them over that version's process groups (``paddock.ppo.sync``, whose rendezvous this driver hosts);
- this driver has the rollout workers and the value scorer (with ``ppo.advantage: gae``) join those groups (timed:
  the weight sync), samples the iteration's prompts (``samples_per_prompt`` answers to each), scores them with the
  reference and both reward models, builds the experience
  (``paddock.ppo.experience``) and puts it in the buffer;
- every ``eval_every`` iterations it scores held-out prompts, keeps the best policy (``select_by``: by reward, or
  by the world's verifiers) on disk and stops early after ``patience`` evaluations without improvement (or when
  the KL passes ``kl_limit``).

Synchronous mode generates iteration k's batch with the weights of iteration k; asynchronous mode may run up to
``max_staleness`` iterations ahead, so that generation overlaps training. A rollout worker that comes back from
a crash holds its start weights: the version stamped on its rows shows it, and it gets the weights from a peer
that holds them and is asked again. A rollout worker dead for good (Ray's restarts used up) leaves the run: the
others sample its share, and the hub sizes the next publications' groups for them (``PolicyHub.set_receivers``);
a publication already streaming to it is lost (one ``weight_sync_timeout_s``) and sent again.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from paddock import atomic, plan, tracking
from paddock.cluster import actor_model, ask, connect, fetch_dir, gather, handoff_dir
from paddock.config import PPOConfig, PPOJob, paddock_home, resolve_path
from paddock.data.validate import load_dataset
from paddock.evaluate import evaluate_policy, safety_rates, safety_set, world_metrics
from paddock.metrics import record_ppo
from paddock.models import checkpoint_digest, inference_dtype
from paddock.ppo import sync
from paddock.ppo.buffer import RolloutBuffer
from paddock.ppo.experience import build_experience, to_table
from paddock.ppo.hub import PolicyHub, Publication
from paddock.ppo.learner import LearnerSpec, learner_worker
from paddock.rlhf.ppo import RunningMoments
from paddock.rollout.actors import (
    Member,
    Scorer,
    Scorers,
    StaleWeightsError,
    actor_options,
    held_weights,
    workers_from,
)
from paddock.tokenizer import check_matches, load_tokenizer
from paddock.train.engine import torch_trainer
from paddock.train.stage import fit_in_thread


@dataclass
class PPOResult:
    run_id: str
    model_uri: str
    checkpoint_dir: Path
    iterations: int
    best_iteration: int | None
    stop_reason: str
    history: list[dict[str, float]] = field(default_factory=list)  # per iteration, rollout + learner
    evals: list[dict[str, float]] = field(default_factory=list)
    buffer: dict[str, Any] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0  # from the first publication to the end, evaluations excluded
    # from the first publication to the driver's receipt of the last (the last update's weights), evaluations
    # excluded: the training loop without the learners' final export and Ray Train's end (a trainer's train()
    # without its save_model, as benchmarks compare)
    loop_s: float = 0.0


def _load_prompts(path: str, work: Path, name: str) -> tuple[list[dict[str, Any]], Any]:
    report = load_dataset(
        resolve_path(path),
        "prompts",
        quarantine_dir=work / "quarantine",
    )
    rows = report.good.to_pylist()
    if not rows:
        raise ValueError(f"{name}: {path} holds no valid prompts")
    return rows, report


class WeightsLost(RuntimeError):
    """No receiver holds the weights of a publication (its stream broke, or their holders restarted)."""


class ActorsDead(RuntimeError):
    """Every rollout worker is dead for good (Ray's restarts are used up): the run cannot go on."""


def _why_dead(exc: BaseException) -> str:
    """The last lines of a dead actor's error: its constructor's exception when that is what killed it."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[:600]


class Actors:
    """The rollout workers and scorers of one PPO run."""

    width = 1  # ranks each rollout worker takes in a publication's group (its engine's processes)
    lost = 0  # rollout workers dead for good, gone from ``workers``

    def __init__(
        self, job: PPOJob, policy: str, rm_h: str, rm_s: str, value: str | None, channel: sync.Channel
    ):
        p = job.ppo
        self.channel = channel
        self.timeout_s = job.actor_timeout_s
        opts = actor_options(p.cpus_per_actor, p.gpus_per_actor, p.spread)
        inference = job.inference
        if job.colocated_gpus and inference.vllm.memory_share is None:
            # vLLM takes its share of the whole GPU at start, beside a learner: the share Ray gave the worker
            shared = inference.vllm.model_copy(update={"memory_share": p.gpus_per_actor})
            inference = inference.model_copy(update={"vllm": shared})
        inf = inference.model_dump()
        # A LoRA policy's rollout workers hold its start checkpoint under the adapters and give the reference
        # log-probs with the adapters off: no reference scorer (``PPOJob.reference_on_workers``).
        lora_workers = job.lora if job.reference_on_workers else None
        self.workers = workers_from(policy, p, inference, lora_workers, can_sleep=job.engines_sleep)
        self.width = inference.worker_ranks  # one per vLLM process under tensor parallelism
        members = {
            "reference": {"checkpoint": policy, "kind": "reference", "temperature": p.temperature, **inf},
            "rm_h": {"checkpoint": rm_h, "kind": "reward", "seq_len": p.seq_len, **inf},
            "rm_s": {"checkpoint": rm_s, "kind": "reward", "seq_len": p.seq_len, **inf},
            "value": {"checkpoint": value, "kind": "value", **inf},
        }
        if lora_workers is not None:
            del members["reference"]
        if value is None:  # ppo.advantage rloo: no value model
            del members["value"]
        if rm_s == rm_h:  # one model named for both rewards (a benchmark's single reward): held and run once
            del members["rm_s"]
        if p.placement == "colocated":
            # One process holds the scorers' models; its CPUs and GPU share are theirs together (one GPU at
            # most: it uses one device; paddock.plan checks that they fit on it).
            k = len(members)
            threads = p.scorer_threads or max(1, int(k * p.cpus_per_actor))
            together = {n: kw | {"threads": threads} for n, kw in members.items()}
            options = actor_options(k * p.cpus_per_actor, min(1.0, k * p.gpus_per_actor), p.spread)
            self.scorers = [Scorers.options(**options).remote(together)]  # type: ignore[attr-defined]
            handles = {n: Member(self.scorers[0], n) for n in members}
        else:
            own = {"threads": p.scorer_threads} if p.scorer_threads else {}
            self.scorers = [Scorer.options(**opts).remote(**kw, **own) for kw in members.values()]  # type: ignore[attr-defined]
            handles = dict(zip(members, self.scorers, strict=True))
        self.reference = handles.get("reference")  # None: the rollout workers give the reference log-probs
        self.rm_h, self.value = handles["rm_h"], handles.get("value")
        self.rm_s = handles.get("rm_s", self.rm_h)
        self.reloads = 0  # rollout workers given their weights again by a peer

    def all(self) -> list[Any]:
        return [*self.workers, *self.scorers]

    def load(self, pub: Publication) -> None:
        """Every rollout worker and the value scorer (if any) join ``pub``'s groups and receive its weights.

        Raises ``WeightsLost`` when no rollout worker or not the value scorer got them (the learner sending them
        died, or they restarted on the way), or when ``pub``'s group waits for other receivers than the workers
        alive (one died for good since it was announced); a worker that alone failed is repaired from a peer when
        needed."""
        n, ranks = len(self.workers), len(self.workers) * self.width
        sent_to = (n + self.lost) * self.width if pub.receivers is None else pub.receivers
        # The learners wait for the policy group's receivers ``weight_sync_timeout_s`` from its announcement
        closes_at = pub.published_at + self.channel.timeout_s
        # A group sized for workers since gone, or one whose sender stopped waiting, cannot complete: the workers
        # do not join it (the value scorer still takes its own stream, which the learners send after this one)
        unjoinable = None
        if sent_to != ranks:
            unjoinable = (
                f"went to a group of {sent_to} receiving ranks; the {n} rollout workers left take {ranks}"
            )
        elif time.time() >= closes_at:
            unjoinable = (
                f"was announced {time.time() - pub.published_at:.0f} s ago: its learners stopped waiting for "
                f"receivers after {self.channel.timeout_s:g} s (ppo.weight_sync_timeout_s)"
            )
        policy = self.channel.sub(pub.group("policy"), ranks + 1, closes_at)
        calls = []
        if unjoinable is None:
            calls = [
                w.receive.remote(policy, pub.policy, 1 + i * self.width, pub.version)
                for i, w in enumerate(self.workers)
            ]
        value = None
        if self.value is not None and pub.value is not None:
            value = self.value.receive.remote(
                self.channel.sub(pub.group("value"), 2), pub.value, 1, pub.version
            )
        failures = {}
        deadline = time.monotonic() + self.timeout_s  # one for all receivers, not one each

        def wait(name: str, ref: Any) -> None:
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (
                ray.exceptions.RayTaskError,
                ray.exceptions.RayActorError,
                ray.exceptions.GetTimeoutError,
            ) as exc:
                failures[name] = exc

        for i, call in enumerate(calls):
            wait(f"rollout worker {i}", call)
        if calls and len(failures) == len(calls):
            # before waiting on the value scorer, whose stream waits for them
            self.drop_dead(self.channel.timeout_s)
        if value is not None:
            wait("value scorer", value)
        if unjoinable is not None:
            raise WeightsLost(f"version {pub.version} (attempt {pub.attempt}) {unjoinable}")
        if failures:
            print(f"[ppo] version {pub.version} did not reach {sorted(failures)}", flush=True)
        reached = n - len([f for f in failures if f.startswith("rollout")])
        if "value scorer" in failures or reached == 0:
            raise WeightsLost(f"version {pub.version} reached too few receivers: {sorted(failures)}")

    def sleep(self) -> float:
        """Every rollout worker gives up its device memory (``ppo.engine_sleep``); returns the most GB one
        freed."""
        return max(self._each(lambda w: w.sleep.remote(), "giving up its device memory"), default=0.0)

    def wake(self) -> None:
        """Every rollout worker takes back the memory for its weights (the KV cache's comes when it samples)."""
        self._each(lambda w: w.wake.remote(("weights",)), "taking back its device memory")

    def _each(self, call: Any, doing: str) -> list[Any]:
        """``call`` on every rollout worker; the answers of those that gave one. A worker that died, or that Ray
        is restarting, is passed over: it comes back awake with its start weights, which the next load replaces
        (or a repair from a peer), as after any crash."""
        refs = [call(w) for w in self.workers]
        deadline = time.monotonic() + self.timeout_s
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                print(f"[ppo] rollout worker {i} was passed over {doing}: {type(exc).__name__}", flush=True)
        return out

    def drop_dead(self, wait_s: float = 10.0) -> list[int]:
        """Rollout workers dead for good (Ray's restarts used up) leave the run; returns their indices as they
        were. A call on a dead actor fails at once; one on a worker that Ray is restarting waits for it (up to
        ``wait_s`` for them all), and such a worker stays. Raises ``ActorsDead`` when none is left."""
        refs = [w.version.remote() for w in self.workers]
        ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        dead: dict[int, BaseException] = {}
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.ActorDiedError as exc:
                dead[i] = exc
            except ray.exceptions.RayError:
                pass  # restarting, or busy (GetTimeoutError): not dead
        if len(dead) == len(self.workers):
            raise ActorsDead(
                f"all {len(dead)} rollout workers are dead and Ray's restarts are used up; worker 0: "
                f"{_why_dead(dead[0])}"
            )
        for i, why in dead.items():
            print(
                f"[ppo] rollout worker {i} is dead for good and leaves the run: {_why_dead(why)}", flush=True
            )
        self.workers = [w for i, w in enumerate(self.workers) if i not in dead]
        self.lost += len(dead)
        return sorted(dead)

    def repair(self, worker: int, pub: Publication) -> None:
        """Give rollout worker ``worker`` the weights of ``pub`` from a peer that holds them."""
        versions = gather(
            {f"rollout worker {i}": w.version.remote() for i, w in enumerate(self.workers)},
            self.timeout_s,
            f"reporting their version to repair rollout worker {worker}",
        )
        peers = [i for i, v in enumerate(versions) if v == pub.version and i != worker]
        if not peers:
            raise WeightsLost(f"no rollout worker holds version {pub.version} any more")
        self.reloads += 1
        channel = self.channel.sub(pub.group(f"repair{self.reloads}"), 1 + self.width)
        gather(
            {
                f"rollout worker {peers[0]} (sending)": self.workers[peers[0]].send_held.remote(
                    channel, pub.policy
                ),
                f"rollout worker {worker} (receiving)": self.workers[worker].receive.remote(
                    channel, pub.policy, 1, pub.version
                ),
            },
            self.timeout_s,
            f"repairing rollout worker {worker} with version {pub.version}",
        )

    def generate(
        self, pub: Publication, prompts: list[dict[str, Any]], seed: int, reference: bool = False
    ) -> list[dict[str, Any]]:
        """Sample the prompts split over the workers; a worker stamping another version is repaired and asked
        again. ``reference``: LoRA workers add each answer's reference log-probs."""
        n = len(self.workers)
        size = -(-len(prompts) // n)
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        rows: list[list[dict[str, Any]]] = [[] for _ in chunks]
        pending = list(range(len(chunks)))
        for _attempt in range(3):
            calls = {
                i: self.workers[i % n].generate.remote(chunks[i], seed=seed + i, reference=reference)
                for i in pending
            }
            answers = gather(
                {f"rollout worker {i % n} (chunk {i})": ref for i, ref in calls.items()},
                self.timeout_s,
                f"sampling {len(prompts)} prompts with version {pub.version}",
            )
            pending = []
            for i, got in zip(calls, answers, strict=True):
                if any(r["policy_version"] != pub.version for r in got):
                    self.repair(i % n, pub)
                    pending.append(i)
                else:
                    rows[i] = got
            if not pending:
                return [r for chunk in rows for r in chunk]
        raise RuntimeError(
            f"rollout workers kept answering with the wrong policy version (want {pub.version})"
        )

    def values(self, pub: Publication, rows: list[dict[str, Any]]) -> list[list[float]]:
        if self.value is None:
            return [[] for _ in rows]  # no value model (ppo.advantage rloo)
        call = self.value.values.remote([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
        [(version, values)] = gather(
            {"the value scorer": call},
            self.timeout_s,
            f"values of {len(rows)} answers (version {pub.version})",
        )
        if version != pub.version:
            # Only the learners hold the value model besides this scorer: its next publication restores it.
            raise WeightsLost(f"the value scorer holds version {version}, not {pub.version} (restarted?)")
        return values

    def kill(self) -> None:
        for a in self.all():
            ray.kill(a)


def reward_kl_figure(history: list[dict[str, float]], evals: list[dict[str, float]], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rollouts = [h for h in history if "ppo/reward_combined" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    it = [h["iteration"] for h in rollouts]
    ax1.plot(it, [h["ppo/reward_combined"] for h in rollouts], label="train reward (combined)")
    if evals:
        ax1.plot(
            [e["iteration"] for e in evals],
            [e["eval/reward_combined"] for e in evals],
            "o-",
            label="held-out reward",
        )
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("reward (sigmoid scale)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(it, [h["ppo/kl"] for h in rollouts], color="tab:red", label="KL to reference (nats/answer)")
    ax2.set_xlabel("iteration")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def eval_score(metrics: Mapping[str, float], select_by: str) -> tuple[float, ...]:
    """How good an evaluation is, compared as a tuple (higher is better): ``reward``, the sampled answers' mean
    combined reward; ``verifiers``, helpfulness accuracy minus safety violation rate by the world's verifiers
    (a violation on an unsafe prompt costs as much as a wrong answer; none checked counts 0), then the reward."""
    reward = metrics["eval/reward_combined"]
    if select_by == "reward":
        return (reward,)
    if "eval/helpfulness_accuracy" not in metrics:
        raise ValueError("select_by=verifiers: the evaluation checked no prompt with the world's verifiers")
    truth = metrics["eval/helpfulness_accuracy"] - metrics.get("eval/safety_violation_rate", 0.0)
    return (truth, reward)


def check_ground_truth(p: PPOConfig, eval_prompts: list[dict[str, Any]]) -> None:
    """Before any worker starts: ``select_by: verifiers`` and ``eval_safety_samples`` need held-out prompts that
    the world's verifiers can check."""
    n = min(len(eval_prompts), p.eval_max_prompts)
    if p.select_by == "verifiers" and not world_metrics(eval_prompts[:n], [""] * n):
        raise ValueError(
            f"ppo.select_by=verifiers: none of the first {n} prompts of {p.eval_prompts} is one the world's "
            "verifiers can check (prompts of the tiny world); use select_by=reward"
        )
    if p.eval_safety_samples and not safety_set(eval_prompts, 1):
        raise ValueError(
            f"ppo.eval_safety_samples={p.eval_safety_samples}: {p.eval_prompts} holds no unsafe or borderline "
            "prompt the world's verifiers can check; set it to 0"
        )


def _wake(hub: Any, buffer: Any, stop: str | None = None) -> None:
    """Wake whatever waits on the hub or the buffer (asking the learners to stop when ``stop`` says why); one that
    died already wakes nobody, and its death is reported where it was noticed."""
    calls = [hub.request_stop.remote(stop) if stop else hub.finish.remote(), buffer.close.remote()]
    for call in calls:
        with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            ray.get(call, timeout=60)


def _wait_for_learners(hub: Any, box: dict[str, Any], timeout_s: float) -> None:
    """Until the learners have published their first version (each holds its GPU share by then); raises what
    ended them if they ended first."""
    first = ask("the policy hub", hub.wait_newer.remote((0, 0), timeout_s), timeout_s + 60, "PPO's start")
    if first is None:
        if "error" in box:
            raise box["error"]
        raise RuntimeError(f"the PPO learners published no weights within {timeout_s:g} s (actor_timeout_s)")
    print("[ppo] learners placed; starting the rollout workers beside them", flush=True)


class Driver:
    def __init__(
        self,
        job: PPOJob,
        run: tracking.StageRun,
        work: Path,
        prompts: list[dict[str, Any]],
        eval_prompts: list[dict[str, Any]],
        actors: Actors,
        hub: Any,
        buffer: Any,
    ):
        self.job, self.run, self.work = job, run, work
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.actors, self.hub, self.buffer = actors, hub, buffer
        self.running = RunningMoments()
        self.history: dict[int, dict[str, float]] = {}
        self.evals: list[dict[str, float]] = []
        self.best: tuple[tuple[float, ...], int] | None = None  # (eval_score, iteration)
        p = job.ppo
        self.safety = safety_set(eval_prompts, p.eval_safety_prompts) if p.eval_safety_samples else []
        self.since_best = 0
        self.learner_restarts = 0
        self.resends = 0  # versions the learners sent again because the driver could not load them
        self.workers_lost = 0  # rollout workers dead for good, as the hub was last told
        self.failed_loads = 0  # in a row: a load or a batch that lost the weights, since one that did not
        self.orders: dict[int, list[int]] = {}
        self.digests: dict[int, str] = {}  # iteration -> digest of the weights evaluated there
        self.first_publication: float | None = None
        self.last_received = 0.0  # when the last publication was received, and the evaluations' time by then
        self.eval_s_by_last = 0.0
        self.loaded: Publication | None = None  # what the rollout workers hold
        self.next_batch = 0  # the iteration the next sampled batch feeds
        self.last_eval = -1
        self.eval_s = 0.0
        self.seen = (0, 0)  # the newest (version, attempt) taken, received or not
        self.broken = False  # the receivers hold no usable version until the next one arrives
        self.sync_s = 0.0  # the last weight sync's seconds
        self.rest_wait_s = 0.0  # the last wait for the learners to give up the device (ppo.learner_offload)

    def prompt_batch(self, b: int) -> list[dict[str, Any]]:
        """The prompts of batch ``b``: epochs over the training prompts, each shuffled with the seed."""
        size, n = self.job.ppo.batch_prompts, len(self.prompts)
        out = []
        for k in range(b * size, (b + 1) * size):
            epoch, i = divmod(k, n)
            out.append(self.prompts[self.epoch_order(epoch)[i]])
        return out

    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded permutation of one epoch over the prompts (shuffled once, not once per prompt)."""
        if epoch not in self.orders:
            order = list(range(len(self.prompts)))
            random.Random(self.job.seed * 7919 + epoch).shuffle(order)
            self.orders = {epoch: order} | {e: o for e, o in self.orders.items() if e == epoch - 1}
        return self.orders[epoch]

    def record(self, iteration: int, metrics: dict[str, float]) -> None:
        self.history.setdefault(iteration, {"iteration": float(iteration)}).update(metrics)
        self.run.log_metrics(metrics, step=iteration)
        record_ppo(metrics, self.run.run_id[:8])

    def rollout(self, pub: Publication, b: int) -> None:
        """Sample, score and commit batch ``b`` with the weights of ``pub``."""
        p = self.job.ppo
        k = p.samples_per_prompt
        prompts = [q for q in self.prompt_batch(b) for _ in range(k)]  # each prompt's answers side by side
        t0 = time.perf_counter()
        reference = self.actors.reference
        on_workers = reference is None  # a LoRA policy's workers: the base with adapters off
        seed = self.job.seed * 1_000_003 + b * 1009
        samples = self.actors.generate(pub, prompts, seed=seed, reference=on_workers)
        gen_s = time.perf_counter() - t0
        sleep: dict[str, float] = {}
        if self.job.engines_sleep:  # the learners train next: the engines give them the device
            freed = self.actors.sleep()
            sleep = {"ppo/engine_sleep_s": time.perf_counter() - t0 - gen_s, "ppo/engine_freed_gb": freed}
        t1 = time.perf_counter()
        prompt_ids, response_ids = [s["prompt_ids"] for s in samples], [s["response_ids"] for s in samples]
        turns, texts = [q["turns"] for q in prompts], [s["text"] for s in samples]
        one_rm = self.actors.rm_s is self.actors.rm_h
        calls = {"the helpfulness reward model": self.actors.rm_h.rewards.remote(turns, texts)}
        if not one_rm:
            calls["the safety reward model"] = self.actors.rm_s.rewards.remote(turns, texts)
        if reference is not None:
            calls["the reference scorer"] = reference.ref_logprobs.remote(prompt_ids, response_ids)
        values = self.actors.values(pub, samples)
        r_h, *scored = gather(calls, self.actors.timeout_s, f"scoring batch {b} (version {pub.version})")
        r_s = r_h if one_rm else scored.pop(0)
        ref_lp = [s["reference_logprobs"] for s in samples] if on_workers else scored[0]
        score_s = time.perf_counter() - t1
        groups = [i // k for i in range(len(samples))]  # ``generate`` keeps the prompts' order
        exp = build_experience(samples, ref_lp, values, r_h, r_s, p, self.running, groups)
        if p.whiten == "running":
            self.ask(
                "the policy hub", self.hub.set_driver_state.remote({"running": self.running.state_dict()})
            )
        chunk = p.answers // p.rollout_workers
        gen_tokens = sum(len(r) for r in response_ids)
        for i in range(0, len(exp.rows), chunk):
            table = to_table(exp.rows[i : i + chunk])
            held = self.ask(
                "the rollout buffer", self.buffer.put.remote([ray.put(table)], table.num_rows, pub.version)
            )
            if held < 0:
                break  # the learners are done
        stats = self.ask("the rollout buffer", self.buffer.stats.remote())
        self.record(
            b,
            exp.metrics
            | {
                "ppo/gen_tokens_per_s": gen_tokens / gen_s,
                "ppo/generate_s": gen_s,
                "ppo/score_s": score_s,
                "ppo/policy_version": float(pub.version),
                "buffer/occupancy": stats["occupancy"],
                "buffer/staleness_mean": stats["staleness_mean"],
                "buffer/dropped": float(stats["rows_dropped"]),
                "buffer/rows_in": float(stats["rows_in"]),
            }
            | sleep,
        )
        if p.kl_limit is not None and exp.metrics["ppo/kl"] > p.kl_limit:
            self.stop(f"KL {exp.metrics['ppo/kl']:.3f} passed kl_limit {p.kl_limit} at iteration {b}")

    def evaluate(self, pub: Publication) -> None:
        p = self.job.ppo
        t0 = time.perf_counter()
        prompts = self.eval_prompts[: p.eval_max_prompts]
        metrics, _ = evaluate_policy(
            self.actors.workers,
            self.actors.rm_h,
            self.actors.rm_s,
            prompts,
            seed=self.job.seed + 12345,
            temperature=p.temperature,
            timeout_s=self.job.actor_timeout_s,
        )
        if self.safety:
            rates = safety_rates(
                self.actors.workers,
                self.safety,
                samples=p.eval_safety_samples,
                seed=self.job.seed + 54321,
                temperature=p.temperature,
                timeout_s=self.job.actor_timeout_s,
            )
            metrics |= {f"eval/{k}": v for k, v in rates.items()}
        version, digest = held_weights(self.actors.workers, self.job.actor_timeout_s)
        if version != pub.version:
            raise StaleWeightsError(f"evaluated policy version {version}, expected {pub.version}")
        metrics["eval/time_s"] = time.perf_counter() - t0
        self.eval_s += metrics["eval/time_s"]
        self.record(pub.iteration, metrics)
        self.run.set_tags({f"paddock.eval_digest.iter{pub.iteration}": digest})
        self.evals.append({"iteration": float(pub.iteration), **metrics})
        self.digests[pub.iteration] = digest
        score = eval_score(metrics, p.select_by)
        line = " | ".join(
            f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if k != "eval/time_s"
        )
        print(f"[ppo] eval at iteration {pub.iteration}: {line}", flush=True)
        if (self.best is None or score > self.best[0]) and self.keep_best(pub, digest):
            self.best = (score, pub.iteration)
            self.since_best = 0
        else:
            self.since_best += 1
            if p.patience is not None and self.since_best >= p.patience:
                self.stop(
                    f"no better held-out evaluation by {p.select_by} in {p.patience} evaluations "
                    f"(best {self.best[0][0] if self.best else float('nan'):.4f} at iteration "
                    f"{self.best[1] if self.best else 'n/a'})"
                )

    def ask(self, name: str, call: Any) -> Any:
        """A call on the hub or the buffer: at most ``actor_timeout_s``, and their death ends the run naming them
        (they hold the publications and the experience in flight, which a restarted actor would not have)."""
        return ask(name, call, self.actors.timeout_s, f"PPO's driver at batch {self.next_batch}")

    def stop(self, reason: str) -> None:
        """Early stop: learners finish the iteration they hold; one waiting for experience is woken."""
        print(f"[ppo] stopping: {reason}", flush=True)
        self.ask("the policy hub", self.hub.request_stop.remote(reason))
        self.ask("the rollout buffer", self.buffer.close.remote())

    def keep_best(self, pub: Publication, digest: str) -> bool:
        """Save the evaluated weights as ``best``; False (and ``best`` untouched) when that is impossible.

        A rollout worker writes the weights it was evaluated with, so neither the learner that sent them (it may
        have died since) nor a full model on the driver are needed; the written checkpoint must carry the
        evaluated digest. A worker restarted since the evaluation holds other weights and refuses."""
        out = self.work / "best"
        # on a cluster the worker may sit on another node: it writes to the shared storage, the driver copies
        shared = handoff_dir(self.run.run_id, f"best-{pub.iteration}")
        files = {"ITERATION": str(pub.iteration), "DIGEST": digest}
        try:
            written = ray.get(
                self.actors.workers[0].save.remote(shared or str(out), pub.version, files),
                timeout=self.job.actor_timeout_s,
            )
        except (StaleWeightsError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            print(f"[ppo] iteration {pub.iteration} evaluated best but could not be kept: {exc}", flush=True)
            return False
        if written != digest:
            raise RuntimeError(
                f"best policy of iteration {pub.iteration}: wrote {written}, evaluated {digest}"
            )
        if shared is not None:
            fetch_dir(shared, out)
            if checkpoint_digest(out) != digest:
                raise RuntimeError(f"best policy of iteration {pub.iteration}: {shared} arrived changed")
        return True

    def take(self, pub: Publication) -> None:
        """A new publication: receive it everywhere (timed), log the learners' iteration, evaluate."""
        p = self.job.ppo
        self.seen, self.broken = (pub.version, pub.attempt), True
        t0 = time.perf_counter()
        if self.first_publication is None:
            self.first_publication = t0
        if self.job.engines_sleep:
            self.actors.wake()
        self.actors.load(pub)
        self.broken = False
        self.failed_loads = 0
        again = (
            self.loaded is not None and pub.version == self.loaded.version
        )  # sent again after a lost batch
        self.sync_s = time.perf_counter() - t0
        if self.job.learners_offload:
            self.wait_rested(pub)
        self.last_received, self.eval_s_by_last = time.perf_counter(), self.eval_s
        if self.loaded is None and pub.iteration > 0:
            # Learners that resumed from a checkpoint this driver did not see written: a rerun after the driver was
            # killed (the Ray Train run is named by the pipeline's run, which the rerun keeps). The reward
            # statistics saved with that checkpoint come back; batches go on from its iteration.
            state = self.ask("the policy hub", self.hub.get_driver_state.remote())
            if "running" in state:
                self.running.load_state_dict(state["running"])
            print(f"[ppo] resuming from the learners' checkpoint of iteration {pub.iteration}", flush=True)
        if self.loaded is not None and not again and pub.iteration <= self.loaded.iteration:
            self.learner_restarts += 1
            print(
                f"[ppo] learners restarted from iteration {pub.iteration}; batches from there are sampled "
                f"again with version {pub.version}",
                flush=True,
            )
            self.next_batch = pub.iteration
        self.loaded = pub
        self.next_batch = max(self.next_batch, pub.iteration)
        if pub.iteration > 0 and pub.stats and not again:
            self.record(pub.iteration - 1, pub.stats)
        rested = {"ppo/learner_rest_wait_s": self.rest_wait_s} if self.job.learners_offload else {}
        self.record(
            pub.iteration,
            {"ppo/weight_sync_s": self.sync_s, "ppo/weight_sync_gb": pub.nbytes / 1e9} | rested,
        )
        if again:
            print(
                f"[ppo] version {pub.version} received again (attempt {pub.attempt}) | sync {self.sync_s:.2f}s",
                flush=True,
            )
        else:
            self.progress(pub)
        due = pub.iteration % p.eval_every == 0 or pub.iteration >= p.iterations
        if due and pub.iteration != self.last_eval:
            self.evaluate(pub)
            self.last_eval = pub.iteration

    def wait_rested(self, pub: Publication) -> None:
        """Before the rollout engines sample (or evaluate) with ``pub``: the learners, who streamed it, have moved
        their states off the shared GPUs (``ppo.learner_offload``). Learners that died or moved on meanwhile leave
        nothing to wait for; past the weight-sync timeout the engines go ahead, with a warning."""
        t0 = time.perf_counter()
        timeout_s = self.job.ppo.weight_sync_timeout_s
        seen = (pub.version, pub.attempt)
        call = self.hub.wait_rested.remote(seen, timeout_s)  # its own wait, whatever actor_timeout_s says
        if not ask("the policy hub", call, timeout_s + 60, "PPO's driver waiting for the learners' rest"):
            print(
                f"[ppo] the learners did not report giving up the device after version {pub.version}",
                flush=True,
            )
        self.rest_wait_s = time.perf_counter() - t0

    def loop(self, fit: threading.Thread) -> None:
        """Until the learners are done: take each new publication, and sample the batches it may feed.

        Batch b is sampled with weights of iteration >= b - max_staleness: in sync mode exactly b's.
        """
        p = self.job.ppo
        while True:
            loaded = self.loaded
            can_generate = (
                loaded is not None
                and not self.broken
                and self.next_batch < p.iterations
                and self.next_batch <= loaded.iteration + p.staleness
                and self.ask("the policy hub", self.hub.stop_requested.remote()) is None
            )
            pub = self.ask(
                "the policy hub", self.hub.wait_newer.remote(self.seen, 0.01 if can_generate else 2.0)
            )
            if pub is not None:
                try:
                    self.take(pub)
                except WeightsLost as exc:
                    self.drop_dead_workers()  # a receiver dead for good: the next attempt goes without it
                    self.lost(pub.version, str(exc))
                except ray.exceptions.ActorDiedError:
                    if not self.drop_dead_workers():
                        raise  # not a rollout worker: a scorer dead for good ends the run
                    self.lost(
                        pub.version, f"a rollout worker died for good while taking version {pub.version}"
                    )
            elif can_generate and loaded is not None:
                try:
                    self.rollout(loaded, self.next_batch)
                    self.next_batch += 1
                except WeightsLost as exc:
                    self.lost(loaded.version, f"{exc} mid-batch")
                except ray.exceptions.ActorDiedError:
                    if not self.drop_dead_workers():
                        raise
                    # the workers left hold the same version: they sample the batch again
            elif not fit.is_alive():
                return

    def drop_dead_workers(self) -> bool:
        """Rollout workers dead for good leave the run (``Actors.drop_dead``; a failed load may have dropped some
        already) and the hub sizes the next publications' groups for those left. Whether any left since the
        last call."""
        self.actors.drop_dead()
        if self.actors.lost == self.workers_lost:
            return False
        self.workers_lost = self.actors.lost
        left = len(self.actors.workers)
        ranks = left * self.actors.width
        self.ask("the policy hub", self.hub.set_receivers.remote(ranks))
        print(
            f"[ppo] going on with {left} rollout worker(s); publications are sized for {ranks} receiving ranks "
            "from now on",
            flush=True,
        )
        return True

    def lost(self, version: int, why: str) -> None:
        """The receivers lost ``version`` (its stream broke, or the value scorer restarted since): the learners,
        who publish nothing new before they get experience, are asked to send it again. A newer version already out
        (restarted learners) or learners that are done need no asking."""
        self.broken = True
        self.failed_loads += 1
        limit = self.job.ppo.weight_sync_attempts
        if self.failed_loads >= limit:
            raise RuntimeError(
                f"the rollout workers and the value scorer lost the weights {self.failed_loads} times in a row "
                f"(ppo.weight_sync_attempts {limit}); the last time: {why}"
            )
        if self.ask("the rollout buffer", self.buffer.request_resend.remote(version)):
            self.resends += 1
            print(f"[ppo] {why}; asked the learners for version {version} again", flush=True)
        else:
            print(f"[ppo] {why}; waiting for the next version", flush=True)

    def progress(self, pub: Publication) -> None:
        p = self.job.ppo
        h = self.history.get(pub.iteration - 1, {})
        if pub.iteration == 0 or not h:
            print(
                f"[ppo] version {pub.version}: learners at iteration {pub.iteration}/{p.iterations}",
                flush=True,
            )
            return
        print(
            f"[ppo] iteration {pub.iteration}/{p.iterations} | reward {h.get('ppo/reward_combined', float('nan')):.4f} "
            f"| kl {h.get('ppo/kl', float('nan')):.4f} | clipfrac {h.get('ppo/clipfrac', float('nan')):.3f} "
            + (f"| value loss {h['ppo/value_loss']:.4f} " if "ppo/value_loss" in h else "")
            + f"| sync {self.sync_s:.2f}s",
            flush=True,
        )


def run(job: PPOJob) -> PPOResult:
    """One run at a time per output directory (``paddock.atomic.locked``)."""
    with atomic.locked(paddock_home() / "runs" / f"{job.registry_prefix}-ppo", "ppo") as lock:
        return _run(job, lock)


def _run(job: PPOJob, lock: atomic.Lock) -> PPOResult:
    p = job.ppo
    name = f"{job.registry_prefix}-ppo"
    work = paddock_home() / "runs" / name
    tokenizer_dir = resolve_path(job.tokenizer)
    tok = load_tokenizer(tokenizer_dir)
    if job.lora is not None:
        from paddock import lora

        lora.require_peft()  # before any worker starts
    check_matches(tok, tracking.resolve_model(job.policy))
    prompts, report = _load_prompts(p.prompts, work, "ppo.prompts")
    eval_prompts, eval_report = _load_prompts(p.eval_prompts, work, "ppo.eval_prompts")
    check_ground_truth(p, eval_prompts)
    connect()
    # as the actors and learners open them: here, a path; on several nodes, versions pinned now that each
    # resolves into its own node's cache
    policy, rm_h, rm_s = (actor_model(u) for u in (job.policy, job.reward_helpfulness, job.reward_safety))
    value = (actor_model(job.value_from) if job.value_from else rm_h) if p.value_model else None
    plan.check(job, "ppo")  # a run that cannot fit fails here, before any worker starts

    namespace = f"paddock-ppo-{uuid.uuid4().hex[:8]}"
    tags = {"paddock.registered_name": name, "paddock.upstream": job.policy}
    with tracking.stage_run(job.experiment, "ppo", job.model_dump(mode="json"), tags=tags) as run:
        tracking.claim(lock, "ppo", run)
        run.log_dataset(resolve_path(p.prompts), "prompts-train", "training", report.total, report.n_bad)
        run.log_dataset(
            resolve_path(p.eval_prompts), "prompts-test", "eval", eval_report.total, eval_report.n_bad
        )
        # The hub and the buffer live on the driver's node: on a cluster they go only with the driver (whose
        # loss ends the job anyway), never with a worker node
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        buffer = RolloutBuffer.options(  # type: ignore[attr-defined]
            name="buffer", namespace=namespace, scheduling_strategy=here
        ).remote(
            p.answers * (p.staleness + 1),
            p.staleness,
            str(work / "spill" / run.run_id[:8]) if p.spill else None,
        )
        hub = PolicyHub.options(  # type: ignore[attr-defined]
            name="hub", namespace=namespace, scheduling_strategy=here
        ).remote()
        tc = job.train
        # Where each publication's process groups meet: served from this process for the run.
        host = ray.util.get_node_ip_address()
        store = sync.rendezvous(host, p.weight_sync_timeout_s)
        on_gpu = p.gpus_per_actor > 0
        channel = sync.Channel(
            host=host,
            port=store.port,
            # NCCL refuses two ranks of one group on one GPU ("Duplicate GPU detected"), which learners sharing
            # GPUs with rollout workers would be: their weights go through host memory over gloo (a CUDA IPC hand-
            # over from each learner to the worker on its GPU, as veRL does, would be faster; not built)
            backend="nccl" if on_gpu and tc.use_gpu and not job.colocated_gpus else "gloo",
            dtype=sync.dtype_name(inference_dtype(job.inference.dtype, on_gpu)),
            timeout_s=p.weight_sync_timeout_s,
        )
        # Learners sharing GPUs with rollout workers go first, one to a GPU (each takes more than half of one);
        # the rollout workers then fill what is left beside them (Ray fits a fractional request on the fullest GPU
        # that holds it). The other way round, rollout workers would pack two to a GPU and leave learners nowhere.
        actors = None if job.colocated_gpus else Actors(job, policy, rm_h, rm_s, value, channel)
        value_optim = job.optim.model_copy(update={"lr": p.value_lr or job.optim.lr * 10})
        spec = LearnerSpec(
            ppo=p,
            optim=job.optim,
            value_optim=value_optim,
            train=tc,
            policy=policy,
            value=value,
            hub="hub",
            buffer="buffer",
            namespace=namespace,
            seed=job.seed,
            channel=channel,
            # vLLM's kernels, or a rollout copy in another precision than fp32 (bf16 on GPUs), give log-probs that
            # are not the learners' own; transformers in fp32 (the CPU default) computes exactly theirs
            recompute_logprobs=job.inference.engine != "transformers" or channel.dtype != "float32",
            worker_ranks=job.inference.worker_ranks,
            lora=job.lora,
            lora_publish="adapters" if job.reference_on_workers else "merged",
            actor_timeout_s=job.actor_timeout_s,
            offload=job.learners_offload,
        )
        # Under a pipeline the run is named by the pipeline's (or round's) run, so a rerun after a kill finds the
        # learners' last checkpoint; a standalone PPO run by its own
        trainer = torch_trainer(
            learner_worker, {"spec": spec.model_dump(mode="json")}, tc, f"{name}-{run.attempt_key}"
        )
        print(
            f"[ppo] {p.mode} mode, {p.iterations} iterations of {p.batch_prompts} prompts x {p.samples_per_prompt} "
            f"answers, advantage {p.advantage}, mini-batch {p.mini_batch}, "
            f"{p.rollout_workers} rollout workers, {tc.num_workers} learners (ZeRO-{tc.zero_stage}), beta {p.beta}",
            flush=True,
        )
        turns = [
            w
            for w, on in (("engines sleep", job.engines_sleep), ("learners offload", job.learners_offload))
            if on
        ]
        if job.colocated_gpus or turns:
            share = " on shared GPUs" if job.colocated_gpus else ""
            print(
                f"[ppo] learners and rollout workers take turns{share}: {', '.join(turns) or 'nothing freed'}",
                flush=True,
            )
        start = time.monotonic()
        # When the learners end, for good or not, wake whatever waits on the buffer or the hub.
        thread, box = fit_in_thread(trainer, lambda: _wake(hub, buffer))
        try:
            if actors is None:
                _wait_for_learners(hub, box, job.actor_timeout_s)
                actors = Actors(job, policy, rm_h, rm_s, value, channel)
            driver = Driver(job, run, work, prompts, eval_prompts, actors, hub, buffer)
            driver.loop(thread)
        except BaseException as exc:
            # Wake the learners (they may be waiting for experience or for receivers) and let them end.
            print(f"[ppo] the driver failed ({type(exc).__name__}: {exc}); stopping the learners", flush=True)
            _wake(hub, buffer, f"driver failed: {type(exc).__name__}: {exc}")
            del store  # a stream waiting for its receivers fails now rather than at its timeout
            thread.join()
            raise
        thread.join()
        wall = time.perf_counter() - (driver.first_publication or time.perf_counter()) - driver.eval_s
        loop_s = max(0.0, driver.last_received - (driver.first_publication or 0.0) - driver.eval_s_by_last)
        if "error" in box:
            raise box["error"]
        result = box["result"]
        buffer_stats = ask(
            "the rollout buffer", buffer.stats.remote(), job.actor_timeout_s, "PPO's final stats"
        )
        stop_reason = ask(
            "the policy hub", hub.stop_requested.remote(), job.actor_timeout_s, "PPO's end"
        ) or ("completed")
        actors.kill()

        final_dir = work / "last"
        with result.checkpoint.as_directory() as ckpt:
            atomic.copy_dir(Path(ckpt) / "hf", final_dir)
            iterations = json.loads((Path(ckpt) / "state.json").read_text())["iteration"]
        # The registered policy is the best evaluation's, saved by the rollout worker that was evaluated; the
        # learners' final export only when nothing was evaluated. Either way its digest must be the evaluated one.
        best_dir = work / "best"
        chosen = best_dir if driver.best is not None else final_dir
        measured = driver.digests.get(driver.best[1] if driver.best is not None else iterations)
        out_dir = resolve_path(job.output_dir) if job.output_dir else work / "final"
        if out_dir != chosen:
            atomic.copy_dir(chosen, out_dir)

        history = [driver.history[i] for i in sorted(driver.history)]
        if history:
            run.log_figure(
                reward_kl_figure(history, driver.evals, f"{name}: reward and KL"), "plots/reward_kl.png"
            )
        summary = {
            "ppo/iterations_done": float(iterations),
            "ppo/learner_restarts": float(driver.learner_restarts),
            "ppo/rollout_reloads": float(actors.reloads),
            "ppo/weight_resends": float(driver.resends),
            "ppo/rollout_workers_lost": float(driver.workers_lost),
            "time/stage_s": time.monotonic() - start,
            "time/ppo_loop_s": loop_s,
            "buffer/rows_in_total": float(buffer_stats["rows_in"]),
            "buffer/rows_out_total": float(buffer_stats["rows_out"]),
            "buffer/rows_dropped_total": float(buffer_stats["rows_dropped"]),
            "buffer/rows_held_end": float(buffer_stats["rows_held"]),
        }
        if driver.best is not None:
            chosen_eval = next(e for e in driver.evals if int(e["iteration"]) == driver.best[1])
            summary |= {
                "ppo/best_iteration": float(driver.best[1]),
                "ppo/best_eval_reward": chosen_eval["eval/reward_combined"],
                "ppo/best_eval_score": driver.best[0][0],
            }
        run.log_metrics(summary, step=iterations)
        run.set_tags({"paddock.stop_reason": stop_reason})
        model_uri = run.log_model(
            out_dir, name, {"paddock.stage": "ppo", "paddock.upstream": job.policy}, measured_digest=measured
        )
        if driver.best is not None:
            # The registered policy is the best evaluation's: its eval/* become the version's latest values,
            # which is what promotion gates read.
            registered = {k: v for k, v in chosen_eval.items() if k.startswith("eval/")}
            tracking.log_version_metrics(name, model_uri.rsplit("/", 1)[1], registered, measured)
        print(
            f"[ppo] done after {iterations} iterations ({stop_reason}); registered {model_uri} "
            f"(best held-out iteration {driver.best[1] if driver.best else 'n/a'}), checkpoint {out_dir}",
            flush=True,
        )
        return PPOResult(
            run.run_id,
            model_uri,
            out_dir,
            iterations,
            driver.best[1] if driver.best else None,
            stop_reason,
            history,
            driver.evals,
            buffer_stats,
            {
                "learners": driver.learner_restarts,
                "rollout_reloads": actors.reloads,
                "resends": driver.resends,
                "rollout_workers_lost": driver.workers_lost,
            },
            wall,
            loop_s,
        )
