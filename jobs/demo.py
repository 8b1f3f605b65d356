"""`make demo`: the whole tiny Llama 2 pipeline on this machine (jobs/configs/tiny/pipeline.yaml).

world -> tokenizer -> pretraining -> SFT -> two preference rounds (each: pairs from the latest model labelled by
the world's verifiers, both reward models retrained, the monitor, rejection sampling, PPO, tiny-rlhf-v<k>) -> GAtt ->
context distillation -> evaluation of every chat model -> promotion through the gates (ground truth no worse than
SFT's) -> held-out questions to the served model, each answer with the verifier's verdict.
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
