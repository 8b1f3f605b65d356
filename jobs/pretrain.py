"""Pretrain a Llama 2-shaped model: python jobs/pretrain.py --config jobs/configs/tiny/pretrain.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import PretrainJob
from paddock.train.stage import run_supervised

if __name__ == "__main__":
    sys.exit(run_stage(PretrainJob, lambda job: run_supervised(job, "pretrain"), __doc__))
