"""The integration tier's shared chain: pretraining -> SFT -> helpfulness and safety RMs, trained once.

Every stage runs for real (2 Ray Train workers, ZeRO-2, MLflow under a temporary PADDOCK_HOME) and registers
tiny-base, tiny-sft, tiny-rm-helpfulness and tiny-rm-safety there; the supervised tests check the stages, and
the RLHF tests start rejection sampling and PPO from them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from chain import REPO, overrides
from mlflow_server import PASSWORD, USER, Server, free_port


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("paddock_home")
    old = os.environ.get("PADDOCK_HOME")
    os.environ["PADDOCK_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PADDOCK_HOME", None)
    else:
        os.environ["PADDOCK_HOME"] = old


@pytest.fixture(scope="session")
def chain(home: Path, world_dir: Path, tokenizer_dir: Path, ray_cluster):
    from paddock.config import PretrainJob, RewardJob, SFTJob, load_config
    from paddock.train.stage import run_supervised

    o = overrides(world_dir, tokenizer_dir)
    configs = REPO / "jobs" / "configs" / "tiny"
    pre = run_supervised(load_config(PretrainJob, configs / "pretrain.yaml", o["pretrain"]), "pretrain")
    sft = run_supervised(load_config(SFTJob, configs / "sft.yaml", o["sft"]), "sft")
    rm_h = run_supervised(
        load_config(RewardJob, configs / "reward_helpfulness.yaml", o["rm_h"]), "reward_helpfulness"
    )
    rm_s = run_supervised(load_config(RewardJob, configs / "reward_safety.yaml", o["rm_s"]), "reward_safety")
    return {"pretrain": pre, "sft": sft, "rm_h": rm_h, "rm_s": rm_s}


@pytest.fixture
def server(tmp_path: Path, monkeypatch):
    """A real ``mlflow server`` (``mlflow_server.Server``) that this process and its children log to."""
    server = Server(tmp_path, free_port())
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    yield server
    # mlflow keeps the tracking and registry URIs that tracking.configure() last set in globals: give the session's
    # store back to the tests that follow
    from paddock import tracking

    monkeypatch.undo()
    tracking.configure()
    server.stop()
