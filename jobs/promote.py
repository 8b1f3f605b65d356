"""Promote a registered model to champion through the evaluation gates, and update Serve.

python jobs/promote.py --model tiny-ppo [--version N | --version latest | --alias A] [--force] [--rollback]
"""

import sys

from paddock.serving.cli import promote_main

if __name__ == "__main__":
    sys.exit(promote_main())
