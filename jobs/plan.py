"""Capacity plan of a stage: python jobs/plan.py --config jobs/configs/llama2-7b/ppo.yaml --cluster clusters/aws-a100.yaml [--json]

Prints every role's count, GPUs, device and host memory and whether the cluster holds it; exits 1 when a role does
not fit (naming it, the missing GiB and the config keys that would change it), 2 on a bad config."""

import sys

from paddock.cli import run_plan

if __name__ == "__main__":
    sys.exit(run_plan(__doc__))
