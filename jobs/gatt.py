"""Ghost Attention: python jobs/gatt.py --config jobs/configs/tiny/gatt.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import GAttJob
from paddock.synth import gatt

if __name__ == "__main__":
    sys.exit(run_stage(GAttJob, gatt.run, __doc__))
