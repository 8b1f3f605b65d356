"""Safety context distillation: python jobs/context_distillation.py --config jobs/configs/tiny/context_distillation.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import DistillJob
from paddock.synth import distill

if __name__ == "__main__":
    sys.exit(run_stage(DistillJob, distill.run, __doc__))
