"""Evaluate a registered model on held-out data: python jobs/evaluate.py --config jobs/configs/tiny/evaluate.yaml"""

import sys

from paddock import evaluate
from paddock.cli import run_stage
from paddock.config import EvaluateJob

if __name__ == "__main__":
    sys.exit(run_stage(EvaluateJob, evaluate.run, __doc__))
