import itertools
import math

import pytest
from paddock.config import OptimConfig, TrainConfig
from paddock.train.optim import deepspeed_config, lr_multiplier, warmup_steps


def test_warmup_then_cosine_to_ten_percent():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert lr_multiplier(0, total, cfg) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_multiplier(4, total, cfg) == pytest.approx(0.5)
    assert lr_multiplier(9, total, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, total, cfg) == pytest.approx(1.0)  # decay starts at the peak
    # Halfway through the decay the cosine is at its midpoint: 0.1 + 0.9 * 0.5 = 0.55
    assert lr_multiplier(10 + 99 // 2, total, cfg) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    )
    assert lr_multiplier(109, total, cfg) == pytest.approx(0.1)  # the last step is at 10% of the peak
    values = [lr_multiplier(s, total, cfg) for s in range(10, total)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_reward_model_warmup_is_three_percent_but_at_least_five():
    cfg = OptimConfig(warmup_ratio=0.03, min_warmup_steps=5)
    assert warmup_steps(cfg, 1000) == 30
    assert warmup_steps(cfg, 100) == 5
    assert warmup_steps(OptimConfig(warmup_steps=2000), 50) == 50


def test_constant_schedule_after_warmup():
    cfg = OptimConfig(schedule="constant", warmup_steps=2)
    assert [lr_multiplier(s, 10, cfg) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_bad_betas_fail_validation():
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.5))


def test_deepspeed_config_follows_paddock_config():
    train = TrainConfig(micro_batch_size=4, grad_accum=3, zero_stage=3, offload=True, use_gpu=True)
    ds = deepspeed_config(train, OptimConfig(grad_clip=0.5), world_size=8)
    assert ds["train_batch_size"] == 4 * 3 * 8 and ds["gradient_accumulation_steps"] == 3
    assert (
        ds["zero_optimization"]["stage"] == 3
        and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.5
    cpu = deepspeed_config(TrainConfig(zero_stage=2), OptimConfig(), world_size=2)
    assert cpu["bf16"]["enabled"] is False and "offload_optimizer" not in cpu["zero_optimization"]
