"""PPO learners that give up the device between updates (``ppo.learner_offload``) train exactly as learners that
keep it: two gloo ranks (torch.multiprocessing, no Ray) run the learners' own code, ZeRO-2, one learner pair with
the states moved to host memory and back around every update and one without, on the same experience rows.

On a CPU the round trip stays in host memory; what it checks is that every state (Adam moments, master weights,
gradients, the weights the forward pass reads) comes back whole and in place: the GPU run differs only in where
the bytes wait.
"""

from __future__ import annotations

import json
from pathlib import Path

import gloo_ranks
import pytest
import torch
import torch.multiprocessing as mp
from paddock.models import build_causal_lm

pytestmark = pytest.mark.slow

ITERATIONS = 3


def _rows(iteration: int) -> list[dict]:
    """16 experience rows of random prompts and answers with random advantages (an rloo batch's shape)."""
    g = torch.Generator().manual_seed(100 + iteration)
    rows = []
    for _ in range(16):
        prompt = torch.randint(3, 4000, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        n = int(torch.randint(2, 10, (1,), generator=g))
        response = torch.randint(3, 4000, (n,), generator=g).tolist()
        adv = float(torch.randn(1, generator=g))
        rows.append(
            {
                "prompt_ids": prompt,
                "response_ids": response,
                "behaviour_logprobs": (-8.3 + 0.1 * torch.randn(n, generator=g)).tolist(),
                "values": [],
                "advantages": [adv] * n,
                "returns": [adv] * n,
            }
        )
    return rows


def _rank(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    from paddock.config import OptimConfig, PPOConfig, TrainConfig
    from paddock.ppo import sync
    from paddock.ppo.learner import Learner, LearnerSpec

    tc = TrainConfig(zero_stage=2, micro_batch_size=4, num_workers=world)
    gloo_ranks.join(rank, world, port, tc)
    ppo = PPOConfig(
        iterations=ITERATIONS, batch_prompts=8, samples_per_prompt=2, advantage="rloo", mini_batch=8
    )
    optim = OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0)
    channel = sync.Channel("127.0.0.1", 0, "gloo", "float32", 60.0)

    def learner(offload: bool) -> Learner:
        spec = LearnerSpec(
            ppo=ppo,
            optim=optim,
            value_optim=optim,
            train=tc,
            policy=ckpt,
            value=None,
            hub="hub",
            buffer="buffer",
            namespace="test",
            seed=0,
            channel=channel,
            offload=offload,
        )
        return Learner(spec, rank, world)

    kept, moved = learner(False), learner(True)
    seconds, states = [], []
    for it in range(ITERATIONS):
        rows = _rows(it)
        kept.train_iteration([dict(r) for r in rows], it)
        woke = moved.wake()
        moved.train_iteration([dict(r) for r in rows], it)
        seconds.append(woke + moved.rest())
        states.append(sorted(s.name for s in moved.policy.optimizer.offloaded_states))
    moved.wake()
    if rank == 0:
        a, b = kept.policy.module.state_dict(), moved.policy.module.state_dict()
        start = build_causal_lm("tiny", seed=0).state_dict()
        moments = [
            torch.equal(x, y)
            for sa, sb in zip(
                kept.policy.optimizer.optimizer.state.values(),
                moved.policy.optimizer.optimizer.state.values(),
                strict=True,
            )
            for x, y in ((sa["exp_avg"], sb["exp_avg"]), (sa["exp_avg_sq"], sb["exp_avg_sq"]))
        ]
        result = {
            "same_weights": all(torch.equal(a[k], b[k]) for k in a),
            "trained": any(not torch.equal(a[k], start[k]) for k in a),
            "same_moments": bool(moments) and all(moments),
            "offloaded": states,
            "resting_after_wake": moved.resting,
            "rest_s": seconds,
        }
        Path(out).write_text(json.dumps(result))


@pytest.fixture(scope="module")
def offload(tmp_path_factory: pytest.TempPathFactory, tok):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("offload")
    ckpt = root / "model"
    build_causal_lm("tiny", seed=0).save_pretrained(str(ckpt), safe_serialization=True)
    tok.save_pretrained(str(ckpt))
    out = root / "result.json"
    mp.spawn(_rank, args=(2, gloo_ranks.free_port(), str(ckpt), str(out)), nprocs=2)
    return json.loads(out.read_text())


def test_learners_resting_between_updates_train_exactly_as_learners_that_stay(offload):
    assert offload["trained"]
    assert offload["same_weights"] and offload["same_moments"]


def test_every_state_leaves_the_device_while_the_learners_rest(offload):
    everything = sorted(["hp_params", "lp_params", "lp_grads", "optim_states"])
    assert offload["offloaded"] == [everything] * ITERATIONS
    assert not offload["resting_after_wake"]
    assert all(s > 0 for s in offload["rest_s"])
