"""Supervised fine-tuning in the Llama 2 chat format: python jobs/sft.py --config jobs/configs/tiny/sft.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import SFTJob
from paddock.train.stage import run_supervised

if __name__ == "__main__":
    sys.exit(run_stage(SFTJob, lambda job: run_supervised(job, "sft"), __doc__))
