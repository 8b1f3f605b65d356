"""Weight publication over a torch.distributed group made for it (ARCHITECTURE.md, "Distributed PPO").

After each iteration the learners' rank 0 streams the policy to every rollout worker, and the value model to the
value scorer, over process groups that exist only for that publication: gloo on CPU, NCCL on GPU. The driver
hosts one ``TCPStore`` for the run where the groups meet (its address reaches the learners in their spec and the
receivers in the publication); each publication's groups carry its version in their prefix, so a rollout worker
restarted since the last one simply joins the next. A worker that lost its weights between publications gets
them from a peer that holds the same version, over a group of two made the same way.

The weights travel as flat buckets of about ``bucket_bytes`` in the inference precision. Under ZeRO-3 the sender
gathers one module at a time (``engine.gathered_state``) and a bucket is broadcast while the next is filled;
receivers copy each bucket into their parameters as it arrives (while the next one arrives), so nobody holds a
second whole model. A tensor of a whole bucket or more travels alone: broadcast from the sender's parameter itself
when nothing moves it during the stream, received straight into the receiver's when the precisions match. The order
and shapes of the tensors (the ``Layout``) come from the module without gathering it and travel with the
publication; a receiver refuses a layout that names keys its model lacks or misses keys it has.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from paddock.train.engine import gathered_state, is_partitioned, state_shapes

# (name, shape) of every tensor, cut into buckets: what a receiver allocates before a broadcast.
Layout = list[list[tuple[str, tuple[int, ...]]]]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass(frozen=True)
class Channel:
    """Where one group meets and what flows in it: a receiver needs nothing else to join."""

    host: str
    port: int
    backend: str  # "gloo" or "nccl"
    dtype: str  # of the flat buckets on the wire: the inference precision
    timeout_s: float
    prefix: str = ""  # unique per group, e.g. "pub7/policy"; empty for the run's rendezvous itself
    size: int = 0  # the sender (rank 0) and the receivers
    # When the sender stops waiting for its receivers (``time.time()``; None: unknown, each waits ``timeout_s``)
    closes_at: float | None = None

    def sub(self, prefix: str, size: int, closes_at: float | None = None) -> Channel:
        """One group of the run's rendezvous."""
        return dataclasses.replace(self, prefix=prefix, size=size, closes_at=closes_at)

    def join(self, rank: int) -> Any:
        """This process's handle on the group (blocks until all ``size`` members have joined, or times out).

        A receiver joining after ``closes_at`` fails at once (its sender gave up: a call queued behind another, a
        driver busy elsewhere, a task Ray retried on a restarted actor), and one joining before waits no longer
        than that: nobody waits in a group that can no longer complete."""
        if not self.prefix or self.size < 2:
            raise ValueError(f"a weight-sync group needs a prefix and two members or more: {self}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {self.backend!r}")
        wait_s = self.timeout_s
        if self.closes_at is not None:
            wait_s = min(wait_s, self.closes_at - time.time())
            if wait_s <= 0:
                raise TimeoutError(
                    f"weight-sync group {self.prefix} closed {-wait_s:.0f} s before rank {rank} came: its sender "
                    "stopped waiting for receivers (ppo.weight_sync_timeout_s)"
                )
        timeout = datetime.timedelta(seconds=wait_s)
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(self.prefix, store)
        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(prefixed, rank, self.size, options)
        return dist.ProcessGroupGloo(prefixed, rank, self.size, timeout)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def buffer_device(self, device: torch.device) -> torch.device:
        """Where flat buckets live: on the device for NCCL, on the host for gloo."""
        return device if self.backend == "nccl" else torch.device("cpu")


def rendezvous(host: str, timeout_s: float) -> Any:
    """The run's store (the driver keeps it for the run); its port is picked free."""
    return dist.TCPStore(
        host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def layout(shapes: Iterable[tuple[str, tuple[int, ...]]], bucket_bytes: int, dtype: torch.dtype) -> Layout:
    """Cut (name, shape) pairs, in order, into buckets of about ``bucket_bytes``. A tensor of at least that size
    travels alone, straight from the sender's parameter into the receivers' where the precisions match."""
    size = torch.empty((), dtype=dtype).element_size()
    buckets: Layout = [[]]
    filled = 0
    for name, shape in shapes:
        n = _numel(shape) * size
        if buckets[-1] and (filled >= bucket_bytes or n >= bucket_bytes):
            buckets.append([])
            filled = 0
        buckets[-1].append((name, tuple(shape)))
        filled += n
    return [b for b in buckets if b]


def module_layout(module: torch.nn.Module, bucket_bytes: int, dtype: torch.dtype) -> Layout:
    """The layout in which ``engine.gathered_state`` yields ``module``'s state (full shapes, also under ZeRO-3)."""
    return layout(state_shapes(module), bucket_bytes, dtype)


def nbytes(lay: Layout, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(_numel(shape) for bucket in lay for _, shape in bucket) * size


def flat_buckets(
    lay: Layout,
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    stable: bool = False,
) -> Iterator[torch.Tensor]:
    """Copy ``tensors`` (in layout order) into one flat ``dtype`` tensor per bucket. Two buffers take turns: a
    yielded bucket's memory is filled again two buckets later (one in flight while the next fills).

    With ``stable`` (the tensors stay valid and unchanged until the stream ends: not ZeRO-3's gathered ones), a
    bucket of one tensor already in ``dtype`` on ``device`` is that tensor itself, not a copy."""
    buffers: list[torch.Tensor] = [torch.empty(0, dtype=dtype, device=device)] * 2
    turn = 0
    for bucket in lay:
        picked = [_next_in_layout(tensors, name, shape) for name, shape in bucket]
        if stable and len(picked) == 1 and _fits(picked[0], dtype, device):
            yield picked[0].view(-1)
            continue
        numel = sum(t.numel() for t in picked)
        if buffers[turn].numel() < numel:  # its last bucket went two copies ago: done
            buffers[turn] = torch.empty(numel, dtype=dtype, device=device)
        flat = buffers[turn][:numel]
        turn ^= 1
        offset = 0
        for t in picked:
            n = t.numel()
            flat[offset : offset + n].copy_(t.reshape(-1))
            offset += n
        yield flat


def _next_in_layout(
    tensors: Iterator[tuple[str, torch.Tensor]], name: str, shape: tuple[int, ...]
) -> torch.Tensor:
    got, t = next(tensors)
    if got != name or tuple(t.shape) != shape:
        raise ValueError(f"weights out of layout: expected {name} {shape}, got {got} {tuple(t.shape)}")
    return t


def _fits(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    return t.dtype == dtype and t.device == device and t.is_contiguous()


def unflatten(lay: Layout, flats: Iterable[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) of every tensor of each bucket as it arrives; a view is valid until the next bucket."""
    for bucket, flat in zip(lay, flats, strict=True):
        offset = 0
        for name, shape in bucket:
            n = _numel(shape)
            yield name, flat[offset : offset + n].view(shape)
            offset += n


def check_layout(model: torch.nn.Module, lay: Layout, keep: Callable[[str], bool] | None = None) -> None:
    """Refuse weights that do not fit ``model`` before any byte moves: foreign, missing or reshaped keys.
    ``keep``: the entries of ``model`` that publications carry (a LoRA policy's adapters), all by default."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if keep is None or keep(k)}
    sent = {name: shape for bucket in lay for name, shape in bucket}
    unexpected = sorted(set(sent) - set(own))
    if unexpected:
        raise KeyError(f"published weights hold keys this model lacks: {unexpected[:5]}")
    missing = sorted(set(own) - set(sent))
    if missing:
        raise KeyError(f"published weights miss {len(missing)} keys of this model: {missing[:5]}")
    reshaped = [k for k in sent if sent[k] != own[k]]
    if reshaped:
        k = reshaped[0]
        raise ValueError(f"published weights have {k} as {sent[k]}, this model as {own[k]}")


@torch.no_grad()
def load_into(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy received tensors into ``model``'s own (casting to its dtype). Returns bytes received."""
    state = model.state_dict()
    total = 0
    for name, t in tensors:
        state[name].copy_(t)
        total += t.numel() * t.element_size()
    return total


def send(group: Any, flats: Iterator[torch.Tensor]) -> int:
    """Broadcast each flat bucket from rank 0, the next one filling while the last is in flight. Returns bytes."""
    pending = None
    total = 0
    for flat in flats:
        if pending is not None:
            pending.wait()
        pending = group.broadcast(flat, 0)
        total += flat.numel() * flat.element_size()
    if pending is not None:
        pending.wait()
    return total


@torch.no_grad()
def receive_model(
    group: Any, model: torch.nn.Module, lay: Layout, dtype: torch.dtype, device: torch.device
) -> int:
    """Receive every bucket of ``lay`` from rank 0 into ``model``. Returns bytes."""
    for _ in landed(group, model, lay, dtype, device):
        pass
    return nbytes(lay, dtype)


def landed(
    group: Any, model: torch.nn.Module, lay: Layout, dtype: torch.dtype, device: torch.device
) -> Iterator[list[str]]:
    """Receive the buckets of ``lay`` from rank 0 into ``model``, yielding each bucket's names once its tensors
    hold the new values (an engine behind ``model`` can load them while the next bucket arrives).

    A bucket of one tensor that ``model`` holds in ``dtype`` on ``device`` arrives straight in the parameter;
    others arrive in a flat buffer and are copied in (casting) while the next bucket is already arriving."""
    state = model.state_dict()
    pending: tuple[Any, list[tuple[str, tuple[int, ...]]], torch.Tensor | None] | None = None

    def finish(work: Any, bucket: list[tuple[str, tuple[int, ...]]], flat: torch.Tensor | None) -> list[str]:
        work.wait()
        with torch.no_grad():
            if flat is not None:
                for name, view in unflatten([bucket], [flat]):
                    state[name].copy_(view)
        return [name for name, _ in bucket]

    for bucket in lay:
        numel = sum(_numel(shape) for _, shape in bucket)
        own = state[bucket[0][0]]
        if len(bucket) == 1 and _fits(own, dtype, device):
            work, flat = group.broadcast(own.detach().view(-1), 0), None
        else:
            flat = torch.empty(numel, dtype=dtype, device=device)
            work = group.broadcast(flat, 0)
        if pending is not None:
            yield finish(*pending)
        pending = (work, bucket, flat)
    if pending is not None:
        yield finish(*pending)


def arriving(
    group: Any, lay: Layout, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of ``lay`` as its bucket lands from rank 0, the next bucket already arriving
    meanwhile. Each bucket lands in a buffer of its own, which lives as long as a consumer holds a view of it (vLLM's
    loader keeps a layer's tensors until the layer is complete, which can be buckets later)."""
    pending: tuple[Any, list[tuple[str, tuple[int, ...]]], torch.Tensor] | None = None
    for bucket in [*lay, None]:
        posted = None
        if bucket is not None:
            flat = torch.empty(sum(_numel(shape) for _, shape in bucket), dtype=dtype, device=device)
            posted = (group.broadcast(flat, 0), bucket, flat)
        if pending is not None:
            work, done, landed_flat = pending
            work.wait()
            yield from unflatten([done], [landed_flat])
        pending = posted


def send_module(
    channel: Channel,
    module: torch.nn.Module,
    lay: Layout,
    rank: int,
    device: torch.device,
    state: Iterator[tuple[str, torch.Tensor]] | None = None,
) -> int:
    """The learners' side: every rank gathers (ZeRO-3) in lockstep, rank 0 streams. Returns bytes sent at rank 0.
    ``state``: what to send instead of the module's whole gathered state, a stream that every rank iterates (a
    LoRA policy's adapters, or its merged weights: ``paddock.lora``), in ``lay``'s order.

    A failure of the group (a receiver gone) stops the stream but not the gather, so that the other ranks are
    not left waiting; it is raised at rank 0 once the gather is done."""
    tensors = gathered_state(module, rank, to_host=False) if state is None else state
    if rank != 0:
        for _ in tensors:
            pass
        return 0
    group = None
    stable = not is_partitioned(module)  # ZeRO-3's gathered tensors live only until the gather moves on
    try:
        group = channel.join(0)
        flats = flat_buckets(lay, tensors, channel.torch_dtype, channel.buffer_device(device), stable)
        return send(group, flats)
    finally:
        for _ in tensors:  # drain the gather whatever happened above
            pass
        del group


def send_held(channel: Channel, model: torch.nn.Module, lay: Layout, device: torch.device) -> int:
    """A receiver's weights, passed on to a peer that lost them (rank 0 of a group of two)."""
    state = model.state_dict()
    group = channel.join(0)
    names = ((name, state[name]) for bucket in lay for name, _ in bucket)
    return send(
        group, flat_buckets(lay, names, channel.torch_dtype, channel.buffer_device(device), stable=True)
    )


def receive_into(
    channel: Channel,
    model: torch.nn.Module,
    lay: Layout,
    rank: int,
    device: torch.device,
    keep: Callable[[str], bool] | None = None,
) -> int:
    """Join ``channel`` as ``rank`` and load every bucket into ``model`` as it arrives (``keep``: as
    ``check_layout``). Returns bytes."""
    check_layout(model, lay, keep)
    group = channel.join(rank)
    return receive_model(group, model, lay, channel.torch_dtype, channel.buffer_device(device))


def stream_into(
    channel: Channel, model: torch.nn.Module, lay: Layout, rank: int, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """``receive_into`` as a stream: (name, tensor of ``model``) for every tensor, bucket by bucket as each lands,
    for an engine that loads from ``model`` while the next bucket arrives. The layout is checked and the group
    joined on the first ``next``."""
    check_layout(model, lay)
    group = channel.join(rank)
    state = model.state_dict()
    for names in landed(group, model, lay, channel.torch_dtype, channel.buffer_device(device)):
        for name in names:
            yield name, state[name]


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
