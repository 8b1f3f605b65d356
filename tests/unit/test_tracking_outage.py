"""A stage's MLflow run through a server outage, a stop and a killed predecessor (paddock.tracking).

The outage is a port with nothing behind it, then a listener on it; the store behind the client is a stand-in that
records every batch, so the order, steps and timestamps that reach the server are checked exactly."""

from __future__ import annotations

import json
import socket

import pytest
from paddock import atomic, tracking


class Recorder:
    """MLflow client stand-in: keeps what ``log_batch`` got."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def log_batch(self, run_id: str, metrics: list) -> None:
        self.batches.append(list(metrics))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_wait_for_an_absent_server_and_go_out_in_order_when_it_answers(monkeypatch, capsys, tmp_path):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(tracking.StageRun, "RETRY_S", 0.0)
    client = Recorder()
    run = tracking.StageRun("0" * 32, client)  # type: ignore[arg-type]
    run.log_metrics({"train/loss": 2.5, "step": 1}, step=1)
    run.log_metrics({"train/loss": 2.25, "train/lr": 1e-4}, step=2)
    run.log_metrics({"train/loss": float("nan")}, step=3)  # NaN is dropped, as before
    assert client.batches == [] and run.outages == 1
    assert [(m.key, m.value, m.step) for m in run.outbox] == [
        ("train/loss", 2.5, 1),
        ("train/loss", 2.25, 2),
        ("train/lr", 1e-4, 2),
    ]
    out = capsys.readouterr().out
    assert out.count("does not answer") == 1 and "training goes on" in out  # said once, not per step
    stamps = [m.timestamp for m in run.outbox]
    with socket.socket() as server:  # the server is back
        server.bind(("127.0.0.1", port))
        server.listen()
        run.log_metrics({"train/loss": 2.0}, step=4)
    [sent] = client.batches
    assert [(m.key, m.value, m.step) for m in sent] == [
        ("train/loss", 2.5, 1),
        ("train/loss", 2.25, 2),
        ("train/lr", 1e-4, 2),
        ("train/loss", 2.0, 4),
    ]
    assert [m.timestamp for m in sent[:3]] == stamps  # logged when measured, not when sent
    assert run.outbox == [] and run.away_since is None
    assert "answers again after" in capsys.readouterr().out


def test_a_server_gone_for_good_keeps_the_metrics_on_disk_and_names_them(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    monkeypatch.setenv("PADDOCK_MLFLOW_OUTAGE_S", "0.3")
    monkeypatch.setattr(tracking.StageRun, "RETRY_S", 0.1)
    run = tracking.StageRun("1" * 32, Recorder())  # type: ignore[arg-type]
    run.log_metrics({"ppo/kl": 0.5}, step=7)
    with pytest.raises(tracking.TrackingUnavailable) as err:
        run.wait_for_server("registering tiny-ppo")
    unsent = tmp_path / "unsent" / f"{'1' * 32}.jsonl"
    assert str(unsent) in str(err.value) and "registering tiny-ppo cannot go on" in str(err.value)
    assert run.outbox == []  # moved to the file: a second failure does not write them twice
    [line] = unsent.read_text().splitlines()
    assert {k: v for k, v in json.loads(line).items() if k != "timestamp"} == {
        "key": "ppo/kl",
        "value": 0.5,
        "step": 7,
    }


def test_a_stopped_stage_ends_killed_a_failed_one_failed(monkeypatch, tmp_path):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ended = {}
    for name, exc in [
        ("stopped", tracking.Stopped("SIGTERM received")),
        ("exited", SystemExit(15)),  # what ray.init()'s own SIGTERM handler raises in a driver
        ("failed", ValueError("bad batch")),
    ]:
        with pytest.raises(type(exc)), tracking.stage_run("outage-test", name, {"x": 1}) as run:
            run.log_metrics({"train/loss": 1.0}, step=1)
            raise exc
        got = run.client.get_run(run.run_id)
        ended[name] = (got.info.status, got.data.tags["paddock.error"], got.data.metrics["train/loss"])
    assert ended == {
        "stopped": ("KILLED", "Stopped: SIGTERM received", 1.0),
        "exited": ("KILLED", "SystemExit: 15", 1.0),
        "failed": ("FAILED", "ValueError: bad batch", 1.0),
    }


def test_the_next_start_closes_the_run_a_killed_holder_left_running(monkeypatch, tmp_path):
    monkeypatch.setenv("PADDOCK_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "runs" / "tiny-sft"
    client = tracking.configure()
    experiment = tracking.experiment_id("outage-test")
    stale = client.create_run(experiment, run_name="sft").info.run_id  # its process was SIGKILLed
    with atomic.locked(work, "sft") as lock:
        lock.note(f"sft, MLflow run {stale}")
    with atomic.locked(work, "sft") as lock, tracking.stage_run("outage-test", "sft", {}) as run:
        tracking.claim(lock, "sft", run)
        assert (work / ".paddock.lock").read_text().startswith(f"sft, MLflow run {run.run_id}")
    old = client.get_run(stale)
    assert old.info.status == "KILLED"
    assert old.data.tags["paddock.error"] == "its sft process died during the run"
    assert client.get_run(run.run_id).info.status == "FINISHED"
    # a finished predecessor is left as it was
    with atomic.locked(work, "sft") as lock, tracking.stage_run("outage-test", "sft", {}) as again:
        tracking.claim(lock, "sft", again)
    assert client.get_run(run.run_id).info.status == "FINISHED"
