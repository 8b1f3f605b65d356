"""Hyperparameter sweep of a stage with Ray Tune ASHA: python jobs/sweep.py --config jobs/configs/tiny/sweep_sft.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import SweepJob
from paddock.train.sweep import run_sweep

if __name__ == "__main__":
    sys.exit(run_stage(SweepJob, run_sweep, __doc__))
