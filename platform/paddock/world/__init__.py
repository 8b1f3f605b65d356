"""The tiny assistant world: facts, tasks, unsafe requests, GAtt instructions, verifiers, dataset writers."""

from paddock.world.generate import WorldReport, write_world
from paddock.world.styles import INSTRUCTIONS, Instruction, instruction
from paddock.world.verify import classify, follows_instruction, helpfulness, is_refusal, item_for, safety_ok

__all__ = [
    "INSTRUCTIONS",
    "Instruction",
    "WorldReport",
    "classify",
    "follows_instruction",
    "helpfulness",
    "instruction",
    "is_refusal",
    "item_for",
    "safety_ok",
    "write_world",
]


def run(job):  # type: ignore[no-untyped-def]
    """Stage entry point: write the world's datasets and print where, with row counts per split."""
    report = write_world(job.world, progress=lambda line: print(f"  wrote {line}", flush=True))
    print(f"tiny world written to {report.out_dir}")
    print(report.table())
    return report
