"""`make demo`: the whole tiny Llama 2 pipeline on this machine (jobs/configs/tiny/pipeline.yaml).

world -> tokenizer -> pretraining -> SFT -> both reward models -> rejection sampling -> PPO -> GAtt -> context
distillation -> evaluation of every chat model -> promotion through the gates -> one request to the served model.
Embedded Ray, SQLite MLflow under PADDOCK_HOME (./.paddock). Rerun it after an interruption: it resumes.
"""

import sys

from paddock import pipeline
from paddock.cli import run_stage
from paddock.config import PipelineJob

if __name__ == "__main__":
    sys.exit(
        run_stage(
            PipelineJob,
            pipeline.run,
            __doc__,
            sys.argv[1:] or ["--config", "jobs/configs/tiny/pipeline.yaml"],
        )
    )
