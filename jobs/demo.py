"""`make demo`: run every paddock stage that exists today on the tiny configs, in order, then serve the result.

Today: the tiny world, the tokenizer, pretraining, SFT, both reward models, rejection sampling, PPO, promotion of
the PPO model through the gates and one request to the served endpoint with the official ``openai`` client. GAtt,
context distillation and the evaluation job join as they land (README's status table says which).
"""

import os
import sys
import time

from paddock import rejection, tokenizer, world
from paddock.config import (
    PPOJob,
    PretrainJob,
    PromoteJob,
    RejectionJob,
    RewardJob,
    SFTJob,
    TokenizerJob,
    WorldJob,
    load_config,
    paddock_home,
)
from paddock.ppo import loop as ppo
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
    ("rejection_sampling", RejectionJob, "jobs/configs/tiny/rejection_sampling.yaml", rejection.run),
    ("ppo", PPOJob, "jobs/configs/tiny/ppo.yaml", ppo.run),
]


def promote_and_ask(path: str = "jobs/configs/tiny/promote.yaml") -> None:
    """Promote tiny-ppo through the gates (forced if a gate's metric is missing), serve it, ask it once."""
    import openai
    from paddock.serving.promote import PromotionError, promote
    from ray import serve

    job = load_config(PromoteJob, path)
    try:
        result = promote(job, "tiny-ppo", deploy_app=True)
    except PromotionError as exc:
        print(f"tiny-ppo did not pass the gates:\n{exc}\npromoting tiny-sft instead (forced)", flush=True)
        result = promote(job, "tiny-sft", force=True, deploy_app=True)
    for check in result.checks:
        print(f"  gate {check.describe()}")
    base = f"http://{job.serve.host}:{job.serve.port}/v1"
    client = openai.OpenAI(base_url=base, api_key=os.environ.get("PADDOCK_API_KEY", "unused"))
    question = "What is the capital of Peru?"
    answer = client.chat.completions.create(
        model=result.name, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    print(f"served {result.name} v{result.version} at {base}\n  user: {question}\n  {result.name}: ", end="")
    print(answer.choices[0].message.content)
    print(f"Serve config for 'serve deploy': {result.serve_config}")
    serve.shutdown()


if __name__ == "__main__":
    home = paddock_home()
    print(f"paddock demo: {', '.join(s[0] for s in STAGES)}, promote + serve (PADDOCK_HOME={home})")
    print("Not built yet: GAtt, context distillation, the evaluation job and report.\n")
    t0 = time.monotonic()
    for name, job, path, run in STAGES:
        start = time.monotonic()
        print(f"== {name} ({path})", flush=True)
        run(load_config(job, path))
        print(f"== {name} done in {time.monotonic() - start:.0f}s\n", flush=True)
    start = time.monotonic()
    print("== promote and serve (jobs/configs/tiny/promote.yaml)", flush=True)
    promote_and_ask()
    print(f"== promote and serve done in {time.monotonic() - start:.0f}s\n", flush=True)
    print(f"demo finished in {(time.monotonic() - t0) / 60:.1f} min")
    print(f"follow the runs: mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db")
    print("serve the champion again: python jobs/serve.py")
    sys.exit(0)
