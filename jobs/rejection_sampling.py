"""Rejection-sampling fine-tuning: python jobs/rejection_sampling.py --config jobs/configs/tiny/rejection_sampling.yaml"""

import sys

from paddock import rejection
from paddock.cli import run_stage
from paddock.config import RejectionJob

if __name__ == "__main__":
    sys.exit(run_stage(RejectionJob, rejection.run, __doc__))
