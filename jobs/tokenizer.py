"""Train (or import) the tokenizer: python jobs/tokenizer.py --config jobs/configs/tiny/tokenizer.yaml"""

import sys

from paddock import tokenizer
from paddock.cli import run_stage
from paddock.config import TokenizerJob

if __name__ == "__main__":
    sys.exit(run_stage(TokenizerJob, tokenizer.run, __doc__))
