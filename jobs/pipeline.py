"""The whole Llama 2 pipeline, resumable: python jobs/pipeline.py --config jobs/configs/tiny/pipeline.yaml"""

import sys

from paddock import pipeline
from paddock.cli import run_stage
from paddock.config import PipelineJob

if __name__ == "__main__":
    sys.exit(run_stage(PipelineJob, pipeline.run, __doc__))
