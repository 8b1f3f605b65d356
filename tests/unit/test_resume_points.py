"""Resume points that say whether they are whole: a checkpoint cut off while saving, or with a file missing or
short, is passed over for the newest older one."""

from __future__ import annotations

import json
from pathlib import Path

from paddock.train.engine import checkpoint_problem, resume_candidates, write_manifest


def _saved(ds: Path, ranks: int = 2, step: int = 5) -> Path:
    """A checkpoint in DeepSpeed's layout, as two ranks leave it, each with its manifest."""
    tag = ds / f"step{step}"
    tag.mkdir(parents=True)
    (ds / "latest").write_text(f"step{step}")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 300)
    for r in range(ranks):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"o" * (100 + r))
    for r in range(ranks):
        write_manifest(ds, r)
    return ds


def test_a_whole_checkpoint_passes_and_each_kind_of_damage_is_named(tmp_path: Path) -> None:
    ds = _saved(tmp_path / "a" / "ds")
    assert checkpoint_problem(ds, world=2) is None
    assert json.loads((ds / "manifest-rank0.json").read_text())["step5/mp_rank_00_model_states.pt"] == 300

    short = _saved(tmp_path / "b" / "ds")
    (short / "step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 7)  # cut off
    assert (
        checkpoint_problem(short, 2)
        == "step5/zero_pp_rank_1_mp_rank_00_optim_states.pt has 7 bytes, 101 when saved"
    )

    missing = _saved(tmp_path / "c" / "ds")
    (missing / "step5" / "mp_rank_00_model_states.pt").unlink()
    assert checkpoint_problem(missing, 2) == "step5/mp_rank_00_model_states.pt is missing"

    unfinished = _saved(tmp_path / "d" / "ds")
    (unfinished / "manifest-rank1.json").unlink()  # rank 1 died before its save completed
    assert (
        checkpoint_problem(unfinished, 2) == "1 of 2 ranks' manifests (written when a rank's save completes)"
    )

    no_latest = _saved(tmp_path / "e" / "ds")
    (no_latest / "latest").unlink()
    assert checkpoint_problem(no_latest, 2) == "DeepSpeed's 'latest' file is missing"

    old_style = _saved(tmp_path / "f" / "ds")  # from before manifests: 'latest' and its directory suffice
    for m in old_style.glob("manifest-rank*.json"):
        m.unlink()
    assert checkpoint_problem(old_style, 2) is None


def test_the_fallbacks_are_the_older_checkpoints_kept_beside_it_newest_first(tmp_path: Path) -> None:
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    run = tmp_path / "tiny-sft-1a2b3c4d"
    names = [
        "checkpoint_2026-11-29_10-00-00.000001",
        "checkpoint_2026-11-29_10-05-00.000001",
        "checkpoint_2026-11-29_10-10-00.000001",
    ]
    for n in names:
        (run / n / "ds").mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    handed = Checkpoint(path=str(run / names[1]), filesystem=pafs.LocalFileSystem())
    # the newer one beside it is not a fallback: Ray Train handed over the latest it knows was reported whole
    assert [Path(c.path).name for c in resume_candidates(handed)] == [names[1], names[0]]


def test_a_final_export_is_no_resume_point(tmp_path: Path) -> None:
    """The last report's checkpoint is the Hugging Face export (no DeepSpeed state): a restart handed it falls
    back to the last training checkpoint before it instead of crashing."""
    final = tmp_path / "checkpoint_final"
    (final / "hf").mkdir(parents=True)
    (final / "state.json").write_text(json.dumps({"step": 40, "final": True}))
    assert checkpoint_problem(final / "ds", world=2) == "DeepSpeed's 'latest' file is missing"
