"""The Ray Train + DeepSpeed plumbing that the supervised loop and the PPO learners share.

- ``setup_worker``: torch threads and the CPU collective settings of a worker process;
- ``partitioned``: the context in which models are created, so that under ZeRO-3 every parameter is
  partitioned across the ranks as it is created (``deepspeed.zero.Init`` through transformers' DeepSpeed
  integration, for fresh models and ``from_pretrained`` alike) instead of being built whole on every rank;
- ``initialize``: a DeepSpeed engine with paddock's AdamW and schedule;
- ``gathered_state``: the module's weights, one submodule's parameters gathered at a time (a decoder layer
  under ZeRO-3, never the whole model), copied to the host in their own dtype at rank 0;
- ``state_shapes``: the names and full shapes of that state without gathering it (what weight publication,
  ``paddock.ppo.sync``, tells its receivers before it streams);
- ``export_hf``: those weights written as a Hugging Face safetensors checkpoint;
- ``torch_trainer``: the driver side, one ``TorchTrainer`` for any of these worker functions;
- ``write_manifest`` / ``checkpoint_problem`` / ``resume_candidates``: resume points that say whether they are
  whole, and the older ones to fall back to when the newest is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from paddock.config import OptimConfig, TrainConfig
from paddock.train.optim import adamw, deepspeed_config, scheduler, skip_cpu_shm_comm_op

# transformers reads the active ZeRO-3 configuration through a weak reference: it lives here while models
# are created (``partitioned``).
_zero3_config: Any = None


def setup_worker(tc: TrainConfig, local: bool = False) -> None:
    """torch threads of a CPU worker (the machine's own in local mode unless set) and no shared-memory op build."""
    if tc.use_gpu:
        return
    if tc.threads_per_worker or not local:
        torch.set_num_threads(tc.threads_per_worker or max(1, int(tc.cpus_per_worker)))
    skip_cpu_shm_comm_op()


@contextmanager
def partitioned(tc: TrainConfig, optim: OptimConfig, world: int) -> Iterator[None]:
    """Models created inside are partitioned at creation under ZeRO-3 (no-op at stages 0-2).

    transformers' ``from_pretrained`` and ``_from_config`` enter ``deepspeed.zero.Init`` when a ZeRO-3
    configuration is active, and load a checkpoint one module at a time into the partitions."""
    global _zero3_config
    if tc.zero_stage != 3:
        yield
        return
    import deepspeed
    import torch.distributed as tdist
    from transformers.integrations import HfDeepSpeedConfig

    if tdist.is_initialized() and not deepspeed.comm.is_initialized():
        # zero.Init sizes its batch check by DeepSpeed's own view of the group, which is one rank until DeepSpeed
        # adopts the group Ray Train made (deepspeed.initialize would, but only after the models are created)
        deepspeed.init_distributed(dist_backend=tdist.get_backend())
    previous = _zero3_config
    _zero3_config = HfDeepSpeedConfig(deepspeed_config(tc, optim, world))
    try:
        yield
    finally:
        _zero3_config = previous
        if previous is None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


def initialize(
    model: torch.nn.Module, optim: OptimConfig, tc: TrainConfig, world: int, total_steps: int
) -> tuple[Any, Any]:
    """(DeepSpeed engine, LR scheduler) of ``model`` with paddock's AdamW and warmup + cosine schedule."""
    import deepspeed

    opt = adamw(model, optim)
    engine, _, _, lr_sched = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=scheduler(opt, optim, total_steps),
        config=deepspeed_config(tc, optim, world),
    )
    return engine, lr_sched


def is_partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _state_entries(
    module: torch.nn.Module,
) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]]:
    """(prefix, own parameters, persistent buffers) of each submodule holding state, in state-dict order."""
    for prefix, sub in module.named_modules():
        params = [(n, p) for n, p in sub._parameters.items() if p is not None]
        buffers = [
            (n, b)
            for n, b in sub._buffers.items()
            if b is not None and n not in sub._non_persistent_buffers_set
        ]
        if params or buffers:
            yield prefix, params, buffers


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def state_shapes(module: torch.nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of every entry of ``gathered_state``, in its order, without gathering anything."""
    for prefix, params, buffers in _state_entries(module):
        for name, t in [*params, *buffers]:
            yield _key(prefix, name), tuple(getattr(t, "ds_shape", t.shape))


def gathered_state(
    module: torch.nn.Module, rank: int, to_host: bool = True, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every entry of ``module.state_dict()`` as (name, tensor) at rank 0, in state-dict order.

    Under ZeRO-3 each submodule's own parameters are gathered in turn (every rank must iterate this to the end,
    in lockstep), so a device holds at most one layer's full weights beyond its partition. Tensors keep their
    dtype and are copied to the host; with ``to_host=False`` they stay where they are, valid only until the
    next item (a gathered parameter is released then). Other ranks yield nothing. ``keep``: only the entries whose
    names it accepts (nothing else is gathered), as a LoRA policy publishes its adapters alone."""
    import deepspeed

    zero3 = is_partitioned(module)
    for prefix, params, buffers in _state_entries(module):
        if keep is not None:
            params = [(n, p) for n, p in params if keep(_key(prefix, n))]
            buffers = [(n, b) for n, b in buffers if keep(_key(prefix, n))]
            if not params and not buffers:
                continue
        own = [p for _, p in params]
        gather = (
            deepspeed.zero.GatheredParameters(own, modifier_rank=None) if zero3 and own else nullcontext()
        )
        with gather:
            if rank != 0:
                continue
            for name, t in [*params, *buffers]:
                t = t.detach()
                yield _key(prefix, name), t.to("cpu", copy=True) if to_host else t


def full_state(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The state dict on the host at rank 0 (None elsewhere), gathered one submodule at a time."""
    state = dict(gathered_state(module, rank))
    return state if rank == 0 else None


def export_hf(module: torch.nn.Module, out_dir: Path, tokenizer: Mapping[str, str], rank: int) -> None:
    """Save ``module`` as a Hugging Face safetensors checkpoint with its tokenizer (``tokenizer.tokenizer_files``:
    the driver's tokenizer travels as bytes, no path of its disk is read here), rank 0 writing; every rank
    must call it under ZeRO-3. Weights are gathered one submodule at a time and saved in their training dtype.
    LoRA adapters are folded into their base weights as they are gathered (the model is not changed), so the
    checkpoint is a plain model."""
    from paddock import lora
    from paddock.tokenizer import write_tokenizer_files

    if isinstance(tokenizer, str | Path):
        raise TypeError(
            f"export_hf takes the tokenizer's files (tokenizer.tokenizer_files), not a path: {tokenizer}"
        )
    state = dict(lora.merged_state(module, gathered_state(module, rank)))
    if rank == 0:
        plain: Any = module.get_base_model() if lora.is_lora(module) else module  # type: ignore[operator]
        plain.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        write_tokenizer_files(tokenizer, out_dir)


def torch_trainer(
    fn: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    tc: TrainConfig,
    run_name: str,
    *,
    datasets: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """The driver side: a ``TorchTrainer`` running ``fn`` on ``tc.num_workers`` workers (0: in the driver),
    with paddock's storage, restarts and checkpoint retention."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from paddock.config import train_storage

    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})
    scaling = (
        ScalingConfig(num_workers=0)
        if tc.num_workers == 0
        else ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=tc.placement_strategy,
        )
    )
    extra: dict[str, Any] = {}
    if datasets is not None:
        extra = {"datasets": datasets, "dataset_config": DataConfig(datasets_to_split=[])}
    return TorchTrainer(
        fn,
        train_loop_config=config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=train_storage(),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=list(callbacks or []),
        ),
        **extra,
    )


# --------------------------------------------------------------------------------------------------
# Resume points: DeepSpeed checkpoints that say whether they are whole


def write_manifest(ds_dir: Path, rank: int) -> None:
    """After ``engine.save_checkpoint``: this rank's files and their sizes, written last, so that a checkpoint
    cut off while saving or copied to storage in part lacks a manifest or disagrees with one."""
    files = {
        str(p.relative_to(ds_dir)): p.stat().st_size
        for p in sorted(ds_dir.rglob("*"))
        if p.is_file() and not p.name.startswith("manifest-rank")
    }
    (ds_dir / f"manifest-rank{rank}.json").write_text(json.dumps(files))


def checkpoint_problem(ds_dir: Path, world: int) -> str | None:
    """Why the DeepSpeed checkpoint in ``ds_dir`` cannot be resumed from by ``world`` ranks, or None when every
    rank's manifest is there and every file it lists has its size (checkpoints from before manifests: when
    DeepSpeed's ``latest`` names a directory that exists)."""
    latest = ds_dir / "latest"
    if not latest.is_file():
        return "DeepSpeed's 'latest' file is missing"
    tag = latest.read_text().strip()
    if not (ds_dir / tag).is_dir():
        return f"'latest' names {tag!r}, which is not there"
    manifests = sorted(ds_dir.glob("manifest-rank*.json"))
    if not manifests:
        return None
    if len(manifests) != world:
        return f"{len(manifests)} of {world} ranks' manifests (written when a rank's save completes)"
    for m in manifests:
        try:
            files = json.loads(m.read_text())
        except json.JSONDecodeError:
            return f"{m.name} is not valid JSON"
        for name, size in files.items():
            p = ds_dir / name
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != size:
                return f"{name} has {p.stat().st_size} bytes, {size} when saved"
    return None


def resume_candidates(checkpoint: Any) -> list[Any]:
    """The checkpoint Ray Train hands a restarted run, then the older ones it keeps beside it, newest first."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted(
        (
            i.path
            for i in infos
            if i.type == pafs.FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and i.path.rstrip("/") != checkpoint.path.rstrip("/")
            and i.base_name < checkpoint.path.rstrip("/").rsplit("/", 1)[1]
        ),
        reverse=True,
    )
    return [checkpoint, *(Checkpoint(path=p, filesystem=checkpoint.filesystem) for p in older)]
