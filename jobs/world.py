"""Write the tiny assistant world's datasets: python jobs/world.py --config jobs/configs/tiny/world.yaml"""

import sys

from paddock import world
from paddock.cli import run_stage
from paddock.config import WorldJob

if __name__ == "__main__":
    sys.exit(run_stage(WorldJob, world.run, __doc__))
