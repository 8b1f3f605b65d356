"""Rollout workers and scorers as Ray actors: thin shells around ``paddock.rollout.core``.

A ``RolloutWorker`` holds an inference copy of the policy and the version of the weights it holds; it receives
new weights over the publication's process group (``receive``, ``paddock.ppo.sync``) before its next batch, or
from a peer (``send_held``) when it lost them. A ``Scorer`` holds a frozen model:
the reference policy (log-probs for the KL penalty) or a reward model (sigmoid-scale scores). Both run on
fractional CPU or one GPU, and are created with restarts so that a killed process comes back; a task that
fails is retried a bounded number of times, and then the caller sees the error: no default reward is made up.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from paddock import lora as adapters
from paddock.cluster import actor_device, gather, is_uri, put_dir
from paddock.config import LoraSettings
from paddock.data.tokenize import encode_prompt
from paddock.models import (
    inference_dtype,
    load_causal_lm,
    load_reward_model,
    load_scalar_model,
    save_checkpoint,
)
from paddock.ppo import sync
from paddock.rlhf.ppo import combine_rewards
from paddock.rollout.core import (
    LOGITS_CHUNK,
    TOKEN_BUDGET,
    Sample,
    TokenValues,
    answer_nll,
    answer_text,
    device_of,
    micro_batches,
    pack,
    reward_scores,
    sample,
    sequence_logprobs,
    unalign,
)
from paddock.tokenizer import load_tokenizer

# A killed actor process is restarted up to 3 times; a failed call is retried twice, then raises.


class StaleWeightsError(RuntimeError):
    """A rollout worker holds other weights than the policy version a caller names."""


def local_checkpoint(ref: str) -> str:
    """The checkpoint directory of ``ref`` on this actor's node: a ``models:/`` URI (``tracking.model_ref``) is
    downloaded from MLflow into this node's model cache once; a path must exist here."""
    from paddock import tracking

    return str(tracking.resolve_model(ref))


def _device_used() -> int:
    """Bytes in use on this process's GPU, by anyone (vLLM's memory is not torch's allocator's); 0 without one."""
    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def _inference(dtype: str) -> tuple[torch.device, torch.dtype]:
    device = actor_device()
    return device, inference_dtype(dtype, device.type == "cuda")


@ray.remote(max_restarts=3, max_task_retries=2)
class RolloutWorker:
    """A policy's inference copy, in the precision ``dtype`` names (``InferenceConfig``), generating and scoring
    in micro-batches of at most ``token_budget`` tokens.

    With ``lora`` (a LoRA policy's ``LoraSettings`` as a dict; transformers engine) the worker holds the start
    checkpoint with the policy's adapters on top: publications carry the adapters alone, samples come from base +
    adapters, the reference log-probs (``generate(..., reference=True)``) from the base with the adapters off,
    and what is saved or digested is the merged plain model."""

    def __init__(
        self,
        checkpoint: str,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        threads: int = 1,
        dtype: str = "auto",
        token_budget: int = TOKEN_BUDGET,
        logits_chunk: int = LOGITS_CHUNK,
        attn_implementation: str = "auto",
        engine: str = "transformers",
        vllm: Mapping[str, Any] | None = None,
        lora: Mapping[str, Any] | None = None,
        can_sleep: bool = False,
    ):
        torch.set_num_threads(threads)
        self.device, self.dtype = _inference(dtype)
        self.can_sleep = can_sleep  # vLLM needs to know at start (its sleep mode)
        self.asleep = False  # the device memory given up (``sleep``) until ``wake``
        self.engine_stale = False  # vLLM woken from its sleep: its weights are garbage until reloaded
        self.attn = attn_implementation
        if lora is not None and engine != "transformers":
            raise ValueError("a rollout worker holds LoRA adapters on the transformers engine only")
        self.lora = LoraSettings(**lora) if lora is not None else None
        self.keep = adapters.is_adapter if self.lora is not None else None  # what publications carry
        self.token_budget, self.logits_chunk = token_budget, logits_chunk
        checkpoint = local_checkpoint(checkpoint)
        self.tok = load_tokenizer(checkpoint)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.engine: Any = None
        self.checkpoint, self.vllm = checkpoint, dict(vllm or {})
        # Group ranks this worker takes in a publication: one, or one per vLLM worker under tensor parallelism.
        self.width = int(self.vllm.get("tensor_parallel", 1)) if engine == "vllm" else 1
        # Under tensor parallelism the mirror lives in shared memory: (its spec, the flat tensor it is).
        self.shared: tuple[dict[str, Any], torch.Tensor] | None = None
        if engine == "vllm":
            # vLLM holds the weights on the device; ``model`` is the host mirror in the Hugging Face layout
            # (what the worker saves, digests and passes to peers), loaded into vLLM whenever it changes.
            self.on_gpu = self.device.type == "cuda"
            self.device = torch.device("cpu")
            self.engine = self._start_engine(checkpoint)
        elif engine != "transformers":
            raise ValueError(f"inference.engine must be 'transformers' or 'vllm', got {engine!r}")
        self.model = self._load(checkpoint)
        self._share()
        self.policy_version = 0
        self.digest: str | None = None  # of the weights held, taken when first asked

    def _load(self, checkpoint: str) -> torch.nn.Module:
        model = load_causal_lm(checkpoint, self.dtype, self.attn)
        if (
            self.lora is not None
        ):  # fresh adapters are the identity (B = 0): version 0 is the checkpoint itself
            model = adapters.wrap(model, self.lora, scalar=False)  # type: ignore[assignment]
        return model.eval().to(self.device)

    def _share(self) -> None:
        """Under tensor parallelism, put the mirror in shared memory where every vLLM worker reads and the first
        writes it (``paddock.rollout.vllm_engine``), filling the same memory again after the first time."""
        if self.width > 1:
            from paddock.rollout.vllm_engine import share_mirror

            first = self.shared is None
            self.shared = share_mirror(self.model, self.shared)
            if first:
                self.engine.map_mirror(self.shared[0])

    def ranks(self) -> int:
        """How many ranks of a publication's group this worker takes (``receive``'s ``rank`` and on)."""
        return self.width

    def receive(self, channel: sync.Channel, layout: sync.Layout, rank: int, policy_version: int) -> int:
        """Join a publication's group as ``rank`` (and the ranks after it, ``ranks``) and load the weights bucket by
        bucket; returns the version.

        While they arrive the worker holds no version (-1): a stream cut off half way leaves weights that no
        caller may take for any version's. Under vLLM each bucket goes on into the engine as it lands in the
        host mirror, in one in-place reload; with tensor parallelism vLLM's workers receive them and write the
        mirror."""
        self.policy_version, self.digest = -1, None
        self.wake(("weights",))  # the KV cache's memory comes back when sampling starts
        if self.width > 1:
            sync.check_layout(self.model, layout)
            self._reload(lambda: self.engine.receive(channel, layout, rank))
            self.engine_stale = False
        elif self.engine is not None:
            wire = self._wire(channel)
            self._reload(
                lambda: self.engine.reload(sync.stream_into(channel, self.model, layout, rank, wire))
            )
            self.engine_stale = False
        else:
            sync.receive_into(channel, self.model, layout, rank, self.device, self.keep)
        self.policy_version = policy_version
        return policy_version

    def _start_engine(self, checkpoint: str) -> Any:
        from paddock.rollout.vllm_engine import VllmEngine

        eos = self.tok.eos_token_id
        return VllmEngine(
            checkpoint, dtype=self.dtype, eos_id=eos, on_gpu=self.on_gpu, sleep=self.can_sleep, **self.vllm
        )

    def sleep(self) -> float:
        """Give up this worker's device memory until ``wake`` (``ppo.engine_sleep``: the learners train in it):
        vLLM sleeps (weights and KV cache freed), the transformers engine moves its model to the host. Returns the
        GB of device memory freed (0 on a CPU, where nothing moves)."""
        if self.asleep:
            return 0.0
        before = _device_used()
        if self.engine is not None:
            self.engine.sleep()
            self.engine_stale = True
        elif self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.asleep = True
        return max(0.0, before - _device_used()) / 1e9

    def wake(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Take back the device memory ``sleep`` gave up (vLLM: the weights' and the KV cache's, as ``tags``
        say). Woken vLLM weights are reloaded from the host mirror before the next sample unless new ones
        arrive first."""
        if self.engine is not None:
            self.engine.wake(tags)
        elif self.asleep and self.device.type == "cuda":
            self.model.to(self.device)
        self.asleep = False

    def _ready(self) -> None:
        """Awake, and vLLM holding the mirror's weights: what sampling and scoring need."""
        self.wake()
        if self.engine_stale:
            self._reload(self._from_mirror)
            self.engine_stale = False

    def _from_mirror(self) -> None:
        if self.width > 1:
            self.engine.reload_mirror()
        else:
            self.engine.reload(iter(self.model.state_dict().items()))

    def _wire(self, channel: sync.Channel) -> torch.device:
        """Where this worker's end of a group's buckets lives: NCCL's on the GPU, even for a host mirror."""
        return torch.device("cuda") if channel.backend == "nccl" else self.device

    def _reload(self, load: Any) -> None:
        """Load weights into vLLM in place (``load()`` does). A reload cut off half way (a stream whose sender
        died) leaves vLLM's model half swapped and unusable, which another reload does not mend: the engine and
        the mirror start again from the worker's checkpoint, still holding no version, and the error goes to the
        caller."""
        try:
            load()
        except BaseException:
            self.engine.close()
            self.model = load_causal_lm(self.checkpoint, self.dtype, self.attn).eval().to(self.device)
            if self.shared is not None:  # the new engine's workers map a new mirror
                from paddock.rollout.vllm_engine import release_mirror

                release_mirror(self.shared[0])
                self.shared = None
            self.engine = self._start_engine(self.checkpoint)
            self._share()
            raise

    def send_held(self, channel: sync.Channel, layout: sync.Layout) -> int:
        """Stream the weights held to a peer that lost them (rank 0 of ``channel``); returns their version. They are
        read from ``model`` wherever it is (a sleeping transformers model on the host, vLLM's host mirror): nothing
        needs waking."""
        sync.send_held(channel, self.model, layout, self._wire(channel))
        return self.policy_version

    def version(self) -> int:
        """The policy version held (-1 while weights arrive or after a stream broke)."""
        return self.policy_version

    def weights(self) -> tuple[int, str]:
        """(policy version, digest) of the weights held: what an evaluation on this worker measured."""
        if self.digest is None:
            self.digest = adapters.merged_digest(self.model)
        return self.policy_version, self.digest

    def save(self, out: str, policy_version: int, files: Mapping[str, str] | None = None) -> str:
        """Write the weights held as a checkpoint at ``out`` (atomically; a path, or a pyarrow.fs URI to upload
        to) and return its digest.

        Raises ``StaleWeightsError`` unless they are ``policy_version``'s: a worker restarted since it was
        evaluated holds its start weights, which must not be saved under another version's evaluation."""
        if self.policy_version != policy_version:
            raise StaleWeightsError(
                f"asked to save policy version {policy_version}, but this rollout worker holds version "
                f"{self.policy_version} (restarted since?)"
            )
        if not is_uri(out):  # this node's disk, or a filesystem every node mounts
            self.digest = save_checkpoint(self.model, self.tok, out, files)
            return self.digest
        with tempfile.TemporaryDirectory() as tmp:  # object storage: written here, then uploaded whole
            self.digest = save_checkpoint(self.model, self.tok, Path(tmp) / "checkpoint", files)
            put_dir(str(Path(tmp) / "checkpoint"), out)
        return self.digest

    def load_checkpoint(self, checkpoint: str, policy_version: int) -> int:
        """Hold another model from now on (one set of workers evaluating several models in turn).

        A worker restarted after a crash comes back with the checkpoint it was created with and version 0;
        callers compare the versions stamped on its rows to notice."""
        checkpoint = local_checkpoint(checkpoint)
        self.wake()
        self.model = self._load(checkpoint)
        self.tok = load_tokenizer(checkpoint)
        if self.engine is not None:
            self.policy_version = -1
            self.checkpoint = checkpoint  # what a broken reload starts again from
            self._share()
            self._reload(self._from_mirror)
        self.policy_version, self.digest = policy_version, None
        return policy_version

    def answer_nll(self, dialogs: Sequence[Mapping[str, Any]], seq_len: int) -> tuple[float, int]:
        """Summed NLL of the dialogs' answer tokens under the weights held, and their count (perplexity)."""
        self._ready()
        return answer_nll(self.model, self.tok, dialogs, seq_len, self.logits_chunk)

    def generate(
        self,
        prompts: Sequence[Mapping[str, Any]],
        seed: int,
        temperature: float | None = None,
        reference: bool = False,
    ) -> list[dict[str, Any]]:
        """One sample per prompt row (``id``, ``turns``, ``is_safety``, optional ``system``): ids, behaviour
        log-probs, text, version.

        ``temperature`` overrides the worker's for this call (0: greedy, as evaluation uses). ``reference``: also
        each answer's log-probs under the start policy at the worker's temperature (``reference_logprobs``), from
        the base with the adapters off; a LoRA worker only.
        """
        temperature = self.temperature if temperature is None else temperature
        self._ready()
        if self.engine is not None:
            samples = self._engine_samples(prompts, seed, temperature)
        else:
            samples = sample(
                self.model,
                self.tok,
                [p["turns"] for p in prompts],
                seed=seed,
                max_new_tokens=self.max_new_tokens,
                temperature=temperature,
                top_p=self.top_p,
                systems=[p.get("system") for p in prompts],
                token_budget=self.token_budget,
                logits_chunk=self.logits_chunk,
            )
        return [
            {
                "prompt_id": p["id"],
                "is_safety": bool(p["is_safety"]),
                "prompt_ids": s.prompt_ids,
                "response_ids": s.response_ids,
                "behaviour_logprobs": s.behaviour_logprobs,
                "text": answer_text(self.tok, s.response_ids),
                "finished": s.finished,
                "policy_version": self.policy_version,
            }
            | ({"reference_logprobs": lp} if lp is not None else {})
            for p, s, lp in zip(prompts, samples, self._reference(samples, reference), strict=True)
        ]

    @torch.no_grad()
    def _reference(self, samples: Sequence[Sample], wanted: bool) -> Sequence[list[float] | None]:
        if not wanted:
            return [None] * len(samples)
        if self.lora is None:
            raise ValueError(
                "reference log-probs come from a LoRA worker's base; other workers hold no reference"
            )
        with self.model.disable_adapter():  # type: ignore[operator]
            return sequence_logprobs(
                self.model,
                [s.prompt_ids for s in samples],
                [s.response_ids for s in samples],
                self.temperature,
                self.token_budget,
                self.logits_chunk,
            )

    def _engine_samples(
        self, prompts: Sequence[Mapping[str, Any]], seed: int, temperature: float
    ) -> list[Sample]:
        """Samples from the vLLM engine. Their behaviour log-probs are the engine's; PPO's learners recompute
        them with the policy's own forward pass and log the difference (``rollout/logprob_drift``)."""
        ids = [encode_prompt(self.tok, p["turns"], p.get("system")) for p in prompts]
        out = self.engine.generate(
            ids, max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=self.top_p, seed=seed
        )
        return [
            Sample(p, g.response_ids, g.engine_logprobs, g.finished) for p, g in zip(ids, out, strict=True)
        ]


class ScorerModel:
    """One model that scores samples (the body of a ``Scorer`` actor, or one member of a ``Scorers`` actor).

    ``kind="reference"``: log-probs of responses under the start policy (the KL anchor); ``"reward"``:
    sigmoid-scale scores; ``"value"``: per-token values of the PPO value model, whose weights the learners
    publish by version like the policy's (``receive``). Scorers run forward passes only, always on transformers
    (``engine`` and ``vllm``, the rollout engine's settings, are accepted and not used).
    """

    def __init__(
        self,
        checkpoint: str,
        kind: str,
        *,
        seq_len: int = 512,
        temperature: float = 1.0,
        threads: int = 1,
        dtype: str = "auto",
        token_budget: int = TOKEN_BUDGET,
        logits_chunk: int = LOGITS_CHUNK,
        attn_implementation: str = "auto",
        engine: str = "transformers",
        vllm: Mapping[str, Any] | None = None,
    ):
        if kind not in ("reference", "reward", "value"):
            raise ValueError(f"scorer kind must be 'reference', 'reward' or 'value', got {kind!r}")
        torch.set_num_threads(threads)
        self.kind, self.seq_len, self.temperature = kind, seq_len, temperature
        self.token_budget, self.logits_chunk = token_budget, logits_chunk
        checkpoint = local_checkpoint(checkpoint)
        self.tok = load_tokenizer(checkpoint)
        device, dtype_ = _inference(dtype)
        attn = attn_implementation
        if kind == "reference":
            self.model: torch.nn.Module = load_causal_lm(checkpoint, dtype_, attn)
        elif kind == "reward":  # an ensemble's members all, scoring with their mean
            self.model = load_reward_model(checkpoint, dtype_, attn)
        else:
            self.model = TokenValues(load_scalar_model(checkpoint, dtype_, attn))
        self.model.eval().to(device)
        self.version = 0

    def receive(self, channel: sync.Channel, layout: sync.Layout, rank: int, version: int) -> int:
        if self.kind != "value":
            raise ValueError("only the value scorer takes published weights; the others are frozen")
        self.version = -1
        sync.receive_into(channel, self.model, layout, rank, device_of(self.model))
        self.version = version
        return version

    @torch.no_grad()
    def values(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> tuple[int, list[list[float]]]:
        """(value weights version, per-token values of each response)."""
        if self.kind != "value":
            raise ValueError("values needs a value scorer")
        out: list[list[float]] = [[] for _ in prompt_ids]
        widths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        for group in micro_batches(widths, self.token_budget):
            packed = pack([prompt_ids[i] for i in group], [response_ids[i] for i in group])
            packed = packed.to(device_of(self.model))
            for i, row in zip(group, unalign(self.model(packed), packed.response_mask), strict=True):
                out[i] = row
        return self.version, out

    def ref_logprobs(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        if self.kind != "reference":
            raise ValueError("ref_logprobs needs a reference scorer")
        return sequence_logprobs(
            self.model, prompt_ids, response_ids, self.temperature, self.token_budget, self.logits_chunk
        )

    def rewards(self, prompts: Sequence[Sequence[Mapping[str, str]]], answers: Sequence[str]) -> list[float]:
        if self.kind != "reward":
            raise ValueError("rewards needs a reward scorer")
        return reward_scores(self.model, self.tok, prompts, answers, self.seq_len, self.token_budget).tolist()


Scorer: Any = ray.remote(max_restarts=3, max_task_retries=2)(ScorerModel)


@ray.remote(max_restarts=3, max_task_retries=2)
class Scorers:
    """Several scorers in one process (``ppo.placement: colocated``): on a small machine one Python, torch and
    Ray runtime instead of one per model, and the models take turns on its cores instead of competing for them."""

    def __init__(self, members: Mapping[str, Mapping[str, Any]]):
        self.members = {name: ScorerModel(**kwargs) for name, kwargs in members.items()}

    def call(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.members[name], method)(*args, **kwargs)


class Member:
    """One scorer of a ``Scorers`` actor, called as a ``Scorer`` actor is: ``member.rewards.remote(...)``."""

    def __init__(self, actor: Any, name: str):
        self.actor, self.name = actor, name

    def __getattr__(self, method: str) -> Any:
        actor, name = self.actor, self.name

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                return actor.call.remote(name, method, *args, **kwargs)

        return _Method


def actor_options(num_cpus: float, num_gpus: float = 0.0, spread: bool = False) -> dict[str, Any]:
    """Ray options of a rollout worker or scorer: fractional CPU, GPU only when asked for, and Ray's SPREAD
    scheduling with ``spread`` (over as many nodes as there are)."""
    return (
        {"num_cpus": num_cpus}
        | ({"num_gpus": num_gpus} if num_gpus else {})
        | ({"scheduling_strategy": "SPREAD"} if spread else {})
    )


def start_workers(
    checkpoint: str,
    count: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    num_cpus: float,
    num_gpus: float = 0.0,
    inference: Mapping[str, Any] | None = None,
    lora: Mapping[str, Any] | None = None,
    spread: bool = False,
    can_sleep: bool = False,
) -> list[Any]:
    """``count`` rollout workers holding ``checkpoint``, with one sampling setup; ``inference`` is a job's
    ``InferenceConfig`` as a dict (precision, token budget, engine); ``lora``: a LoRA policy's adapter settings
    (the workers hold the adapters on the checkpoint, see ``RolloutWorker``)."""
    if (inference or {}).get("engine") == "vllm":
        from paddock.rollout.vllm_engine import check_installed, check_settings

        vllm = (inference or {}).get("vllm") or {}
        tp = int(vllm.get("tensor_parallel", 1))
        if tp > 1 and num_gpus:
            if num_gpus != 1:
                raise ValueError(
                    f"gpus_per_actor: a rollout worker whose engine spans {tp} GPUs (inference.vllm.tensor_parallel) "
                    f"takes them whole; give 1 (GPU per vLLM worker), got {num_gpus:g}"
                )
            num_gpus = tp  # vLLM's workers start beside the actor, one on each of its GPUs: one node
        check_installed()
        check_settings(checkpoint, vllm)
    return [
        RolloutWorker.options(**actor_options(num_cpus, num_gpus, spread)).remote(  # type: ignore[attr-defined]
            checkpoint,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            lora=lora,
            can_sleep=can_sleep,
            **(inference or {}),
        )
        for _ in range(count)
    ]


def workers_from(
    checkpoint: str, cfg: Any, inference: Any = None, lora: Any = None, can_sleep: bool = False
) -> list[Any]:
    """Rollout workers as a sampling section says (``SamplingConfig`` or ``PPOConfig``) and the job's
    ``InferenceConfig`` (and ``LoraSettings`` for a LoRA policy's workers); ``can_sleep``: PPO's engines that
    give up their device memory while the learners train."""
    return start_workers(
        checkpoint,
        cfg.rollout_workers,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        inference=inference.model_dump() if inference is not None else None,
        lora=lora.model_dump() if lora is not None else None,
        spread=getattr(cfg, "spread", False),
        can_sleep=can_sleep,
    )


def held_weights(workers: Sequence[Any], timeout_s: float) -> tuple[int, str]:
    """(policy version, weights digest) that every worker holds; raises if they differ."""
    calls = {f"rollout worker {i}": w.weights.remote() for i, w in enumerate(workers)}
    held = set(gather(calls, timeout_s, "reporting the weights they hold"))
    if len(held) != 1:
        raise StaleWeightsError(f"rollout workers hold different weights: {sorted(held)}")
    return held.pop()


def combined_scores(
    rm_helpfulness: Any,
    rm_safety: Any,
    turns: Sequence[Sequence[Mapping[str, str]]],
    answers: Sequence[str],
    is_safety: Sequence[bool],
    timeout_s: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both reward scorers on the same answers (in parallel) and the Llama 2 combination. Three (batch,) tensors."""
    calls = {
        "helpfulness reward scorer": rm_helpfulness.rewards.remote(turns, list(answers)),
        "safety reward scorer": rm_safety.rewards.remote(turns, list(answers)),
    }
    h, s = gather(calls, timeout_s, f"scoring {len(answers)} answers")
    r_h, r_s = torch.tensor(h), torch.tensor(s)
    return r_h, r_s, combine_rewards(r_h, r_s, torch.tensor([bool(x) for x in is_safety]))
