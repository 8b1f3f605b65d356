"""Weight publication over a process group (``paddock.ppo.sync``): layouts, buckets, gloo groups of processes.

The group tests run three processes (torch.multiprocessing, no Ray) around a rendezvous this test process hosts,
as the PPO driver does: a sender streaming a model to two receivers, a receiver passing its weights to a peer
that lost them, and a publication that one receiver never joins.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from paddock.models import build_causal_lm
from paddock.ppo import sync

pytestmark = pytest.mark.slow

BUCKET = 64 * 1024


def test_layout_cuts_buckets_by_bytes_in_the_wire_precision():
    shapes = [("a", (10,)), ("b", (5,)), ("c", (100,)), ("d", (1,))]
    # fp32: a is 40 bytes, under 48, so b joins it; c (400 bytes) is a bucket's worth and travels alone.
    alone = [[("a", (10,)), ("b", (5,))], [("c", (100,))], [("d", (1,))]]
    assert sync.layout(shapes, 48, torch.float32) == alone
    # bf16 halves every size; c (200 bytes) is still at least a bucket.
    assert sync.layout(shapes, 48, torch.bfloat16) == alone
    # 1000 bytes: a (40), b (20) and c (400) fill one bucket to 460; d joins them.
    assert sync.layout(shapes, 1000, torch.float32) == [
        [("a", (10,)), ("b", (5,)), ("c", (100,)), ("d", (1,))]
    ]
    assert sync.layout(shapes, 400, torch.float32) == alone
    assert sync.nbytes(sync.layout(shapes, 48, torch.float32), torch.float32) == 116 * 4


def _roundtrip(source: torch.nn.Module, target: torch.nn.Module, dtype: torch.dtype) -> int:
    from paddock.train.engine import gathered_state

    lay = sync.module_layout(source, BUCKET, dtype)
    flats = sync.flat_buckets(lay, gathered_state(source, 0, to_host=False), dtype, torch.device("cpu"))
    return sync.load_into(target, sync.unflatten(lay, flats))


def test_buckets_carry_the_exact_weights_in_the_wire_precision():
    source, target = build_causal_lm("tiny", seed=0), build_causal_lm("tiny", seed=1)
    lay = sync.module_layout(source, BUCKET, torch.float32)
    assert len(lay) > 10  # many buckets, so the double buffers are reused many times
    assert _roundtrip(source, target, torch.float32) == sync.nbytes(lay, torch.float32) == 1_827_968 * 4
    want = source.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in target.state_dict().items())
    # bf16 on the wire (the GPU inference precision): half the bytes, each weight rounded once.
    target = build_causal_lm("tiny", seed=1)
    assert _roundtrip(source, target, torch.bfloat16) == 1_827_968 * 2
    assert all(torch.equal(t, want[k].bfloat16().float()) for k, t in target.state_dict().items())
    assert not all(torch.equal(t, want[k]) for k, t in target.state_dict().items())


def test_a_tensor_of_a_whole_bucket_is_sent_from_the_parameter_itself_when_nothing_moves_it():
    from paddock.train.engine import gathered_state

    model = build_causal_lm("tiny", seed=0)
    lay = sync.module_layout(model, BUCKET, torch.float32)
    embed = model.model.embed_tokens.weight  # 2 MB: a bucket of its own
    for stable in (True, False):
        tensors = gathered_state(model, 0, to_host=False)
        for bucket, flat in zip(
            lay, sync.flat_buckets(lay, tensors, torch.float32, torch.device("cpu"), stable), strict=True
        ):
            if bucket == [("model.embed_tokens.weight", tuple(embed.shape))]:
                assert (flat.data_ptr() == embed.data_ptr()) is stable and torch.equal(flat, embed.view(-1))


def test_a_receiver_refuses_weights_of_another_shape_before_anything_moves():
    model = build_causal_lm("tiny", seed=0)
    lay = sync.module_layout(model, BUCKET, torch.float32)
    foreign = [[*lay[0], ("score.weight", (1, 128))], *lay[1:]]
    with pytest.raises(KeyError, match=r"lacks.*score\.weight"):
        sync.check_layout(model, foreign)
    with pytest.raises(KeyError, match="miss 1 keys"):
        sync.check_layout(model, [lay[0][1:], *lay[1:]])
    name, shape = lay[0][0]
    with pytest.raises(ValueError, match=f"{name}"):
        sync.check_layout(model, [[(name, (shape[0] + 1, *shape[1:])), *lay[0][1:]], *lay[1:]])


def _member(rank: int, port: int, out: str) -> None:
    """Rank 0 sends; ranks 1 and 2 receive. Three publications in turn, as the PPO driver would run them."""
    torch.set_num_threads(1)
    base = sync.Channel("127.0.0.1", port, "gloo", "float32", timeout_s=20.0)
    cpu = torch.device("cpu")
    source = build_causal_lm("tiny", seed=0)
    lay = sync.module_layout(source, BUCKET, torch.float32)
    result: dict = {}
    model = source if rank == 0 else build_causal_lm("tiny", seed=rank)
    want = source.state_dict()

    def same() -> bool:
        return all(torch.equal(t, want[k]) for k, t in model.state_dict().items())

    # 1. A publication: rank 0 streams to both receivers.
    if rank == 0:
        result["sent"] = sync.send_module(base.sub("pub1/policy", 3), source, lay, 0, cpu)
    else:
        result["before"] = same()
        result["received"] = sync.receive_into(base.sub("pub1/policy", 3), model, lay, rank, cpu)
        result["after"] = same()
    # 2. Rank 2 lost its weights (a restart): rank 1 passes on what it holds over a group of two.
    if rank == 2:
        model = build_causal_lm("tiny", seed=5)
        result["lost"] = not same()
        sync.receive_into(base.sub("pub1/repair1", 2), model, lay, 1, cpu)
        result["repaired"] = same()
    elif rank == 1:
        sync.send_held(base.sub("pub1/repair1", 2), model, lay, cpu)
    # 3. bf16 on the wire (the GPU inference precision) into fp32 receivers: each weight rounded once, copied in.
    half = sync.Channel("127.0.0.1", port, "gloo", "bfloat16", timeout_s=20.0).sub("pub2/policy", 3)
    lay16 = sync.module_layout(source, BUCKET, torch.bfloat16)
    if rank == 0:
        result["sent_bf16"] = sync.send_module(half, source, lay16, 0, cpu)
    else:
        sync.receive_into(half, model, lay16, rank, cpu)
        result["rounded"] = all(
            torch.equal(t, want[k].bfloat16().float()) for k, t in model.state_dict().items()
        )
    # 4. A publication that rank 2 never joins: the sender and the receiver that came fail at their timeout.
    if rank < 2:
        short = sync.Channel("127.0.0.1", port, "gloo", "float32", timeout_s=3.0).sub("pub3/policy", 3)
        t0 = time.monotonic()
        try:
            if rank == 0:
                sync.send_module(short, source, lay, 0, cpu)
            else:
                sync.receive_into(short, model, lay, 1, cpu)
            result["unjoined"] = "completed"
        except Exception as exc:
            result["unjoined"] = f"{type(exc).__name__}: {exc}"
        result["unjoined_s"] = time.monotonic() - t0
    # 5. Groups whose sender stops waiting at ``closes_at`` (20 s timeouts): rank 1 coming after it fails at once,
    #    and coming before it (nobody else joins) waits only until then.
    if rank == 1:
        for key, prefix, closes_in in (("closed", "pub4/policy", -5.0), ("closing", "pub5/policy", 2.0)):
            t0 = time.monotonic()
            try:
                sync.receive_into(base.sub(prefix, 3, time.time() + closes_in), model, lay, 1, cpu)
                result[key] = "completed"
            except Exception as exc:
                result[key] = f"{type(exc).__name__}: {exc}"
            result[f"{key}_s"] = time.monotonic() - t0
    Path(out, f"{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("sync")
    store = sync.rendezvous("127.0.0.1", 30.0)  # this process hosts it, as the PPO driver does
    mp.spawn(_member, args=(store.port, str(out)), nprocs=3)
    return {r: json.loads((out / f"{r}.json").read_text()) for r in range(3)}


def test_a_publication_reaches_every_receiver_exactly(members):
    nbytes = 1_827_968 * 4
    assert members[0]["sent"] == nbytes
    for r in (1, 2):
        assert (
            members[r]["before"] is False and members[r]["received"] == nbytes and members[r]["after"] is True
        )


def test_a_receiver_that_lost_its_weights_gets_them_from_a_peer(members):
    assert members[2]["lost"] is True and members[2]["repaired"] is True


def test_a_publication_in_bf16_sends_half_the_bytes_and_rounds_each_weight_once(members):
    assert members[0]["sent_bf16"] == 1_827_968 * 2
    assert members[1]["rounded"] is True and members[2]["rounded"] is True


def test_a_receiver_waits_no_longer_than_its_sender(members):
    r = members[1]
    assert r["closed"].startswith("TimeoutError: weight-sync group pub4/policy closed 5 s before rank 1"), r
    assert r["closed_s"] < 1.0, r
    assert r["closing"] != "completed" and 1.9 <= r["closing_s"] < 15, r  # not the channel's 20 s


def test_a_publication_missing_a_receiver_fails_at_its_timeout_instead_of_hanging(members):
    for r in (0, 1):  # the sender and the receiver that came: both give up once the 3 s timeout has passed
        assert members[r]["unjoined"] != "completed", members[r]
        assert 2.9 <= members[r]["unjoined_s"] < 60, members[r]
