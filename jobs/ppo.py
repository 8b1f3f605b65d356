"""Distributed PPO: python jobs/ppo.py --config jobs/configs/tiny/ppo.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import PPOJob
from paddock.ppo import loop

if __name__ == "__main__":
    sys.exit(run_stage(PPOJob, loop.run, __doc__))
