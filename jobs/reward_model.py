"""Train a reward model: python jobs/reward_model.py --config jobs/configs/tiny/reward_helpfulness.yaml
(or reward_safety.yaml, or --set reward.kind=safety)."""

import sys

from paddock.cli import run_stage
from paddock.config import RewardJob
from paddock.train.stage import run_supervised

if __name__ == "__main__":
    sys.exit(run_stage(RewardJob, lambda job: run_supervised(job, f"reward_{job.reward.kind}"), __doc__))
