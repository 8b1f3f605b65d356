"""Weight publication against a raw copy of the same bytes in the same process group.

A sender and ``--receivers`` receivers (one process each, gloo on loopback, as PPO's learner rank 0 and its
rollout workers on one machine) join one group. Per repetition, after a barrier:

- ``sync``: ``paddock.ppo.sync``'s publication path, the sender reading the model's state (``gathered_state``)
  into flat buckets in the wire precision and broadcasting them double-buffered, each receiver copying every
  bucket into its own model as it arrives;
- ``raw``: one broadcast of a single flat tensor of the same byte count, received into a preallocated tensor
  and not copied anywhere;
- ``adapters``: what a LoRA policy publishes (``--lora-r``, every projection, as ``lora`` on a PPO job): its
  adapters alone (``gathered_state(..., keep=lora.is_adapter)``), into receivers that hold the same base under
  adapters of their own, through the same publication path.

Both are timed at the sender from the barrier to a second barrier that every receiver enters once it is done,
so a row's ``vs_raw`` (sync_s / raw_s, medians) is what bucketing, casting and loading cost on top of moving the
bytes; ``adapters_vs_sync`` (adapters_s / sync_s) is what a LoRA publication costs against the whole model's.
``join_s`` is what a publication's group costs to set up (paddock makes one per publication).

    python benchmarks/weight_sync.py [--shapes tiny small] [--receivers 2] [--repeats 5] [--lora-r 16]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

# The models here are smaller than one bucket of PPO's default (ppo.publish_bucket_mb, 256 MiB, sized for NCCL on
# GPUs, where copies are cheap); at 1 MiB, as the tiny CPU configs set, the embeddings travel alone and straight
# into the receivers' parameters, and the rest streams in buckets whose copies overlap the transfer.
BUCKET_MB = 1


def member(
    rank: int, port: int, shape: str, size: int, repeats: int, bucket_mb: int, lora_r: int, out: str
) -> None:
    import torch
    from paddock import lora
    from paddock.config import LoraSettings
    from paddock.models import build_causal_lm
    from paddock.ppo import sync
    from paddock.train.engine import gathered_state

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model = build_causal_lm(shape, seed=rank)
    wire = torch.float32
    lay = sync.module_layout(model, bucket_mb * 2**20, wire)
    total = sync.nbytes(lay, wire)
    torch.manual_seed(rank)
    adapted = lora.wrap(
        build_causal_lm(shape, seed=0), LoraSettings(r=lora_r, alpha=2 * lora_r, dropout=0.0), scalar=False
    )
    lay_a = sync.layout(lora.adapter_shapes(adapted), bucket_mb * 2**20, wire)
    base = sync.Channel("127.0.0.1", port, "gloo", "float32", timeout_s=120.0)
    ping = torch.zeros(1)
    flat = torch.empty(total // 4, dtype=wire)
    rows: dict[str, list[float]] = {"sync_s": [], "raw_s": [], "adapters_s": [], "join_s": []}
    for r in range(repeats + 1):  # the first one warms up (imports, allocations) and is not kept
        t0 = time.perf_counter()
        group = base.sub(f"{shape}/pub{r}", size).join(rank)
        rows["join_s"].append(time.perf_counter() - t0)
        for kind in ("sync", "raw", "adapters"):
            group.allreduce(ping).wait()
            t0 = time.perf_counter()
            if kind == "sync" and rank == 0:
                tensors = gathered_state(model, 0, to_host=False)
                sync.send(group, sync.flat_buckets(lay, tensors, wire, cpu, stable=True))
            elif kind == "sync":
                sync.receive_model(group, model, lay, wire, cpu)
            elif kind == "adapters" and rank == 0:
                tensors = gathered_state(adapted, 0, to_host=False, keep=lora.is_adapter)
                sync.send(group, sync.flat_buckets(lay_a, tensors, wire, cpu, stable=True))
            elif kind == "adapters":
                sync.receive_model(group, adapted, lay_a, wire, cpu)
            else:
                group.broadcast(flat, 0).wait()
            group.allreduce(ping).wait()
            if r:
                rows[f"{kind}_s"].append(time.perf_counter() - t0)
        if not r:
            rows["join_s"].clear()
        del group
    if rank == 0:
        adapter_bytes = sync.nbytes(lay_a, wire)
        Path(out).write_text(
            json.dumps({"bytes": total, "adapter_bytes": adapter_bytes, "buckets": len(lay), **rows})
        )


def run(shape: str, receivers: int, repeats: int, bucket_mb: int, lora_r: int, tmp: Path) -> dict[str, Any]:
    import torch.multiprocessing as mp
    from paddock.ppo import sync

    store = sync.rendezvous("127.0.0.1", 120.0)
    out = tmp / f"{shape}.json"
    mp.spawn(
        member,
        args=(store.port, shape, receivers + 1, repeats, bucket_mb, lora_r, str(out)),
        nprocs=receivers + 1,
    )
    r = json.loads(out.read_text())
    sync_s, raw_s = statistics.median(r["sync_s"]), statistics.median(r["raw_s"])
    adapters_s = statistics.median(r["adapters_s"])
    return {
        "shape": shape,
        "receivers": receivers,
        "mib": r["bytes"] / 2**20,
        "buckets": r["buckets"],
        "sync_s": sync_s,
        "raw_s": raw_s,
        "vs_raw": sync_s / raw_s,
        "join_s": statistics.median(r["join_s"]),
        "sync_gb_per_s": r["bytes"] / 1e9 / sync_s,
        "lora_r": lora_r,
        "adapters_mib": r["adapter_bytes"] / 2**20,
        "adapters_s": adapters_s,
        "adapters_vs_sync": adapters_s / sync_s,
    }


def main() -> None:
    import tempfile

    from _world import write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=BUCKET_MB)
    ap.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA adapters in the adapters row")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run(s, args.receivers, args.repeats, args.bucket_mb, args.lora_r, Path(tmp)) for s in args.shapes
        ]
    for row in rows:
        print(
            f"{row['shape']}: {row['mib']:.1f} MiB in {row['buckets']} buckets to {row['receivers']} receivers: "
            f"sync {row['sync_s'] * 1e3:.1f} ms, raw broadcast {row['raw_s'] * 1e3:.1f} ms "
            f"({row['vs_raw']:.2f}x; goal at most 2x), group set-up {row['join_s'] * 1e3:.1f} ms; LoRA r "
            f"{row['lora_r']} adapters alone: {row['adapters_mib']:.2f} MiB in {row['adapters_s'] * 1e3:.1f} ms "
            f"({row['adapters_vs_sync']:.2f}x the whole model's publication)"
        )
    meta = {
        "backend": "gloo (loopback)",
        "wire": "fp32",
        "bucket_mb": args.bucket_mb,
        "repeats": args.repeats,
    }
    print(write_result(args.out, "weight_sync", meta, rows))


if __name__ == "__main__":
    main()
