"""The rollout worker's host mirror in shared memory (``paddock.rollout.vllm_engine.share_mirror``), the way a
tensor-parallel vLLM engine's workers use it: another process maps it by its spec, receives a publication over gloo
with ``sync.arriving`` and writes it in, and the worker's own model sees the new weights. No vLLM needed."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from paddock.models import build_causal_lm
from paddock.ppo import sync
from paddock.rollout.vllm_engine import cpu_binding, mirror_views, release_mirror, share_mirror

BUCKET = 16 * 1024  # many buckets, so that a layer's tensors straddle them


def test_a_shared_mirror_holds_the_model_in_one_file_its_parameters_are_views_of():
    model = build_causal_lm("tiny", seed=0)
    want = {k: t.clone() for k, t in model.state_dict().items()}
    spec, flat = share_mirror(model)
    try:
        # the file has no name from the start: only this process's descriptor reaches it
        assert not glob.glob(f"/dev/shm/paddock-mirror-{os.getpid()}-*") and os.path.exists(spec["path"])
        assert spec["numel"] == flat.numel() == sum(t.numel() for t in want.values())
        lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        for k, t in model.state_dict().items():
            assert torch.equal(t, want[k]) and lo <= t.data_ptr() < hi, k
        # The model still trains and runs as before: its parameters are views, not copies.
        x = torch.tensor([[1, 2, 3]])
        assert model(x).logits.shape == (1, 3, model.config.vocab_size)
        # Another model of the same shapes fills the same memory again.
        other = build_causal_lm("tiny", seed=1)
        again, flat2 = share_mirror(other, (spec, flat))
        assert flat2 is flat and again["path"] == spec["path"]
        assert torch.equal(mirror_views(spec)["lm_head.weight"], other.state_dict()["lm_head.weight"])
        with pytest.raises(ValueError, match=r"the mirror holds"):
            share_mirror(build_causal_lm("tiny", vocab_size=300, seed=0), (spec, flat))
    finally:
        release_mirror(spec)
    assert not os.path.exists(spec["path"])  # the descriptor closed: the memory goes with the last mapping


def test_tied_weights_take_one_place_in_the_mirror():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    spec, _ = share_mirror(model)
    try:
        assert spec["numel"] == 40 and spec["entries"]["embed.weight"] == spec["entries"]["head.weight"]
        mirror_views(spec)["head.weight"].fill_(3.0)  # as a vLLM worker writes it
        assert model.embed.weight.eq(3.0).all() and model.head.weight is model.embed.weight
    finally:
        release_mirror(spec)


def _member(rank: int, port: int, spec: dict, out: str) -> None:
    """Rank 0 publishes the tiny model of seed 7; rank 1 stands for the first vLLM worker of an engine: it maps the
    mirror, receives the buckets with ``sync.arriving`` and writes each into it, keeping every tensor it was given
    to the end (vLLM's loader keeps a layer's until the layer is complete)."""
    torch.set_num_threads(1)
    channel = sync.Channel("127.0.0.1", port, "gloo", "float32", timeout_s=30.0).sub("pub1/policy", 2)
    source = build_causal_lm("tiny", seed=7)
    lay = sync.module_layout(source, BUCKET, torch.float32)
    if rank == 0:
        sync.send_module(channel, source, lay, 0, torch.device("cpu"))
        return
    mirror = mirror_views(spec)
    kept = []
    for name, t in sync.arriving(channel.join(1), lay, torch.float32, torch.device("cpu")):
        mirror[name].copy_(t)
        kept.append((name, t))
    want = source.state_dict()
    result = {
        "buckets": len(lay),
        "tensors": len(kept),
        "kept_intact": all(torch.equal(t, want[name]) for name, t in kept),
    }
    Path(out, "1.json").write_text(json.dumps(result))


def test_a_publication_received_in_another_process_lands_in_the_workers_model(tmp_path: Path):
    model = build_causal_lm("tiny", seed=0)
    spec, _ = share_mirror(model)
    try:
        store = sync.rendezvous("127.0.0.1", 60.0)
        mp.spawn(_member, args=(store.port, spec, str(tmp_path)), nprocs=2)
        got = json.loads((tmp_path / "1.json").read_text())
        assert got["buckets"] > 20 and got["tensors"] == len(model.state_dict())
        assert got["kept_intact"]  # no bucket's memory was reused under a tensor still held
        want = build_causal_lm("tiny", seed=7).state_dict()
        assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    finally:
        release_mirror(spec)


@pytest.mark.parametrize(
    ("cpus", "workers", "binding"),
    [({0, 1}, 2, "0|1"), ({0, 1, 2, 3}, 2, "0,1|2,3"), ({4, 5, 6, 7, 8}, 2, "4,5|6,7"), ({3}, 2, "3|3")],
)
def test_vllm_cpu_workers_are_bound_to_runs_of_this_processs_cores(monkeypatch, cpus, workers, binding):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    assert cpu_binding(workers) == binding
