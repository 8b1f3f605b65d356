"""`make demo`: the whole tiny Llama 2 pipeline on this machine (jobs/configs/tiny/pipeline.yaml).

world -> tokenizer -> pretraining -> SFT -> both reward models -> rejection sampling -> PPO -> GAtt -> context
distillation -> evaluation of every chat model -> promotion through the gates -> one request to the served model.
Embedded Ray, SQLite MLflow under PADDOCK_HOME (./.paddock). Rerun it after an interruption: it resumes.
"""

import sys

from paddock import pipeline
from paddock.cli import run_stage
from paddock.config import PipelineJob, paddock_home


def demo(job: PipelineJob) -> None:
    home = paddock_home()
    print(f"paddock demo: the tiny pipeline (PADDOCK_HOME={home})\n", flush=True)
    pipeline.run(job)
    print(f"\nreport: {home}/runs/pipeline-{job.registry_prefix}/report/report.md")
    print(f"follow the runs: mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db")
    print(f"serve the champion: python jobs/serve.py --model {job.registry_prefix}-chat")


if __name__ == "__main__":
    args = sys.argv[1:] or ["--config", "jobs/configs/tiny/pipeline.yaml"]
    sys.exit(run_stage(PipelineJob, demo, __doc__, args))
