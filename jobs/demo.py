"""`make demo`: run every paddock stage that exists today on the tiny configs, in order.

Today: the tiny world, the tokenizer, pretraining, SFT and both reward models. Rejection sampling, PPO,
GAtt, context distillation, evaluation and serving join as they land (README's status table says which).
"""

import sys
import time

from paddock import tokenizer, world
from paddock.config import PretrainJob, RewardJob, SFTJob, TokenizerJob, WorldJob, load_config, paddock_home
from paddock.train.stage import run_supervised

STAGES = [
    ("world", WorldJob, "jobs/configs/tiny/world.yaml", world.run),
    ("tokenizer", TokenizerJob, "jobs/configs/tiny/tokenizer.yaml", tokenizer.run),
    ("pretrain", PretrainJob, "jobs/configs/tiny/pretrain.yaml", lambda job: run_supervised(job, "pretrain")),
    ("sft", SFTJob, "jobs/configs/tiny/sft.yaml", lambda job: run_supervised(job, "sft")),
    (
        "reward_helpfulness",
        RewardJob,
        "jobs/configs/tiny/reward_helpfulness.yaml",
        lambda job: run_supervised(job, "reward_helpfulness"),
    ),
    (
        "reward_safety",
        RewardJob,
        "jobs/configs/tiny/reward_safety.yaml",
        lambda job: run_supervised(job, "reward_safety"),
    ),
]

if __name__ == "__main__":
    home = paddock_home()
    print(f"paddock demo: {', '.join(s[0] for s in STAGES)} (PADDOCK_HOME={home})")
    print("Not built yet: rejection sampling, PPO, GAtt, context distillation, evaluation, serving.\n")
    t0 = time.monotonic()
    for name, job, path, run in STAGES:
        start = time.monotonic()
        print(f"== {name} ({path})", flush=True)
        run(load_config(job, path))
        print(f"== {name} done in {time.monotonic() - start:.0f}s\n", flush=True)
    print(f"demo finished in {(time.monotonic() - t0) / 60:.1f} min")
    print(f"follow the runs: mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db")
    sys.exit(0)
