"""Preference collection from the current policy, labelled and mixed for the reward models:
python jobs/collect_preferences.py --config jobs/configs/tiny/collect_preferences.yaml"""

import sys

from paddock.cli import run_stage
from paddock.config import CollectJob
from paddock.rlhf import preferences

if __name__ == "__main__":
    sys.exit(run_stage(CollectJob, preferences.run, __doc__))
