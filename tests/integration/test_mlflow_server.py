"""A stage against a real ``mlflow server`` (SQLite backend, artifacts served by the server, basic auth on), the
server stopped and started again mid-stage: training goes on, and the run ends with every step's metrics.

The upstream model is registered on the server and reaches SFT through it (the server's artifact proxy into the
model cache), not through a path shared with the session's own store."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from chain import REPO, overrides

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_sft_through_a_server_that_goes_away_mid_stage_loses_no_metric(
    chain, server, world_dir, tokenizer_dir, capsys
):
    import requests
    from paddock import tracking
    from paddock.config import SFTJob, load_config
    from paddock.train.stage import run_supervised

    # locked: a request without the password is refused
    assert requests.get(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1").status_code == 401
    with tracking.stage_run("paddock-tiny", "upload", {}) as upload:  # the user's base model, on the server
        base_uri = upload.log_model(chain["pretrain"].checkpoint_dir, "srv-base")
    assert base_uri == "models:/srv-base/1"

    client = tracking.configure()
    outage: dict[str, float] = {}

    def take_the_server_away() -> None:
        """Once the stage has logged a step: stop the server for 8 s, then start it again on the same store."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = client.search_runs(
                [tracking.experiment_id("paddock-tiny")], "tags.`paddock.registered_name` = 'srv-sft'"
            )
            if runs and "train/loss" in runs[0].data.metrics:
                outage["step"] = max(
                    m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")
                )
                break
            time.sleep(0.5)
        server.stop()
        time.sleep(8)
        server.start()
        outage["back"] = 1.0

    watcher = threading.Thread(target=take_the_server_away, daemon=True)
    watcher.start()
    sets = [
        *overrides(world_dir, tokenizer_dir)["sft"],
        f"model.init_from={base_uri}",
        "train.num_workers=0",  # in the driver: the outage is the driver's to ride out, and no worker start-up
        "train.grad_accum=2",
        "train.max_steps=40",
        "train.eval_every=20",
        "registry_prefix=srv",
    ]
    result = run_supervised(load_config(SFTJob, REPO / "jobs/configs/tiny/sft.yaml", sets), "sft")
    watcher.join(timeout=300)
    out = capsys.readouterr().out
    assert outage.get("back") == 1.0 and outage["step"] < 40, outage  # it went away mid-stage
    assert "does not answer" in out and "answers again after" in out, out[-3000:]

    client = tracking.configure()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/loss")}
    trained = {int(m["step"]): m["train/loss"] for m in result.history if "train/loss" in m}
    assert sorted(trained) == list(range(1, 41))
    assert logged == pytest.approx(trained)  # every step, none twice, the values measured
    assert result.model_uri == "models:/srv-sft/1"
    # the base reached SFT through the server's artifact proxy, into the model cache
    assert (Path(os.environ["PADDOCK_HOME"]) / "models" / "srv-base" / "v1" / "MLmodel").is_file()
    assert any((server.root / "artifacts").rglob("model.safetensors"))
