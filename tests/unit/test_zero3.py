"""ZeRO-3 on two gloo ranks: models are created partitioned, and weights leave the ranks one layer at a time.

Two processes (torch.multiprocessing, no Ray) run the same code as the learners (``paddock.train.engine``); rank 0
writes what it measured to a JSON file that the test reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import gloo_ranks
import pytest
import torch
import torch.multiprocessing as mp
from paddock.models import build_causal_lm, checkpoint_digest
from paddock.tokenizer import tokenizer_files

pytestmark = pytest.mark.slow

BUCKET = 64 * 1024  # bytes: small enough that the tiny model's weights fill many buckets


def _rank(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from paddock.config import OptimConfig, TrainConfig
    from paddock.models import load_causal_lm
    from paddock.train import engine
    from paddock.train.optim import adamw

    tc = TrainConfig(zero_stage=3, micro_batch_size=2, num_workers=world)
    gloo_ranks.join(rank, world, port, tc)
    optim = OptimConfig(lr=1e-3, warmup_steps=1)
    with engine.partitioned(tc, optim, world):
        model = load_causal_lm(ckpt)
        fresh = build_causal_lm("tiny", seed=1)
    params = list(model.parameters())
    result: dict = {
        "held_whole": sum(p.numel() for p in params),  # full tensors materialised on this rank
        "partition": sum(p.ds_tensor.numel() for p in params),
        "full": sum(p.ds_numel for p in params),
    }
    # While the state is gathered, at most one submodule's parameters are whole at a time.
    most_whole = 0
    state = {}
    for name, t in engine.gathered_state(model, rank):
        whole = sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)
        most_whole = max(most_whole, whole)
        state[name] = t
    if rank == 0:
        largest = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in model.modules())
        reference = load_causal_lm(ckpt).state_dict()
        result |= {
            "most_whole": most_whole,
            "largest_module": largest,
            "same_state": set(state) == set(reference)
            and all(torch.equal(state[k], reference[k]) for k in reference),
        }
    # Publication: the layout comes from the partitioned model without gathering it; the buckets are filled one
    # gathered layer at a time (every rank iterates) and loaded into an unpartitioned copy.
    from paddock.ppo import sync

    lay = sync.module_layout(model, BUCKET, torch.float32)
    tensors = engine.gathered_state(model, rank, to_host=False)
    copy = load_causal_lm(ckpt) if rank == 0 else None
    if copy is not None:
        flats = sync.flat_buckets(lay, tensors, torch.float32, torch.device("cpu"))
        total = sync.load_into(copy, sync.unflatten(lay, flats))
    for _ in tensors:
        pass
    fresh_state = engine.full_state(fresh, rank)
    decay_groups = [len(g["params"]) for g in adamw(model, optim).param_groups]
    eng, _ = engine.initialize(model, optim, tc, world, total_steps=4)
    ids = torch.randint(3, 4000, (2, 32), generator=torch.Generator().manual_seed(rank))
    loss = eng(input_ids=ids, labels=ids).loss
    eng.backward(loss)
    eng.step()
    export = Path(out).parent / "export"
    engine.export_hf(eng.module, export, tokenizer_files(ckpt), rank)
    result |= _lora_under_zero3(rank, world, ckpt, Path(out).parent, tc, optim)
    if copy is not None:
        assert fresh_state is not None
        result |= {
            "buckets": len(lay),
            "bucket_total": total,
            "layout_whole": lay == sync.module_layout(load_causal_lm(ckpt), BUCKET, torch.float32),
            "buckets_same": all(torch.equal(copy.state_dict()[k], reference[k]) for k in reference),
            "fresh_embed_std": fresh_state["model.embed_tokens.weight"].std().item(),
            "decay_groups": decay_groups,
            "matrices": sum(1 for p in load_causal_lm(ckpt).parameters() if p.dim() >= 2),
            "loss": loss.item(),
        }
        Path(out).write_text(json.dumps(result))


def _lora_under_zero3(rank: int, world: int, ckpt: str, root: Path, tc, optim) -> dict:  # type: ignore[no-untyped-def]
    """A LoRA policy on a partitioned base: one step, the adapters gathered alone (what PPO publishes), and the
    merged export folded layer by layer as the weights are gathered."""
    from paddock import lora
    from paddock.config import LoraSettings
    from paddock.models import load_causal_lm
    from paddock.train import engine

    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    with engine.partitioned(tc, optim, world):
        base = load_causal_lm(ckpt)
    torch.manual_seed(0)
    model = lora.wrap(base, settings, scalar=False)
    eng, _ = engine.initialize(model, optim, tc, world, total_steps=4)
    ids = torch.randint(3, 4000, (2, 32), generator=torch.Generator().manual_seed(10 + rank))
    eng.backward(eng(input_ids=ids, labels=ids).loss)
    eng.step()
    shapes = lora.adapter_shapes(eng.module)
    adapters = dict(engine.gathered_state(eng.module, rank, keep=lora.is_adapter))
    engine.export_hf(eng.module, root / "lora-export", tokenizer_files(ckpt), rank)
    if rank != 0:
        return {}
    # base + the gathered adapters, unpartitioned, against the merged export reloaded as a plain model
    check = lora.wrap(load_causal_lm(ckpt), settings, scalar=False).eval()
    state = check.state_dict()
    for name, t in adapters.items():
        state[name].copy_(t)
    plain = load_causal_lm(root / "lora-export").eval()
    probe = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        gap = (check(input_ids=probe).logits - plain(input_ids=probe).logits).abs().max().item()
    start, trained = load_causal_lm(ckpt).state_dict(), plain.state_dict()
    return {
        "lora_shapes": [[n, list(s)] for n, s in shapes],
        "lora_gathered": sorted(adapters),
        "lora_b_moved": sum(1 for n, t in adapters.items() if ".lora_B." in n and t.abs().sum() > 0),
        "lora_gap": gap,
        "lora_moved": sorted(n for n in start if not torch.equal(start[n], trained[n])),
    }


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory, tok) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("zero3")
    ckpt = root / "model"
    build_causal_lm("tiny", seed=0).save_pretrained(str(ckpt), safe_serialization=True)
    tok.save_pretrained(str(ckpt))  # the export writes the tokenizer too
    out = root / "result.json"
    mp.spawn(_rank, args=(2, gloo_ranks.free_port(), str(ckpt), str(out)), nprocs=2)
    return json.loads(out.read_text()), root


def test_zero3_creates_models_partitioned(zero3):
    r, _ = zero3
    assert r["held_whole"] == 0  # no parameter exists whole on a rank after loading
    assert r["full"] == 1_827_968  # the tiny model
    assert r["full"] / 2 <= r["partition"] <= r["full"] / 2 + 4096  # half each, plus alignment padding
    assert 0.015 < r["fresh_embed_std"] < 0.025  # a fresh model gets Llama's N(0, 0.02) init, not torch's


def test_gathering_holds_one_layer_at_a_time_and_gives_the_exact_weights(zero3):
    r, _ = zero3
    assert r["same_state"]
    # the largest submodule of the tiny model is its embedding (4000 x 128, 28% of it)
    assert 0 < r["most_whole"] <= r["largest_module"] < r["full"] / 3


def test_publication_streams_the_partitioned_weights_exactly(zero3):
    r, _ = zero3
    assert r["layout_whole"]  # full shapes (ds_shape), as an unpartitioned model's
    assert r["buckets"] > 10 and r["bucket_total"] == r["full"] * 4
    assert r["buckets_same"]


def test_weight_decay_reaches_partitioned_matrices(zero3):
    r, _ = zero3
    assert r["decay_groups"] == [r["matrices"], 2 * 4 + 1]  # matrices decay; 9 RMSNorm gains do not


def test_export_writes_the_trained_weights_as_safetensors(zero3):
    r, root = zero3
    export = root / "export"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert checkpoint_digest(export) != checkpoint_digest(root / "model")  # one step was taken
    assert 7.5 < r["loss"] < 9.0  # ln(4000) = 8.29 for an untrained model


def test_lora_trains_on_a_partitioned_base_and_exports_merged(zero3):
    """LoRA under ZeRO-3: the adapters gather alone (PPO's publication: 2 per adapted projection, their full
    shapes), and the export folds each adapter into its base weight as the layers are gathered: the plain
    checkpoint gives base + adapters' logits, and only the adapted projections differ from the start."""
    r, _ = zero3
    names = [n for n, _ in r["lora_shapes"]]
    assert sorted(names) == r["lora_gathered"]
    assert len(names) == 4 * 7 * 2  # four layers, the 7 default projections (attention and MLP), A and B
    assert all(s[0] == 4 or s[1] == 4 for _, s in r["lora_shapes"])  # rank 4: (4, 128) and (out, 4)
    assert r["lora_b_moved"] == 28  # B starts at zero; one step moved every one
    assert r["lora_gap"] < 1e-5
    assert len(r["lora_moved"]) == 28 and all(n.endswith("_proj.weight") for n in r["lora_moved"])
