"""The Serve model replica SIGKILLed under load, as when its node runs out of memory.

Clients keep sending chat completions. Requests that were on the dead replica fail with a 503 whose body says
the replica is being replaced (never a hang, never a bare 500); Serve starts a new replica process and the same
endpoint answers again without being redeployed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chain import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]
API_KEY = "sk-paddock-reliability"
REPLICA = "ServeReplica:paddock:ChatModel"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(base: str) -> tuple[int, dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def replicas() -> list[int]:
    import psutil

    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(REPLICA in part for part in (p.info["cmdline"] or []))
    ]


@pytest.fixture(scope="module")
def served(chain, home: Path):
    from paddock.config import PromoteJob, load_config
    from paddock.serving.promote import promote
    from ray import serve

    job = load_config(
        PromoteJob,
        REPO / "jobs/configs/tiny/promote.yaml",
        [f"serve.port={free_port()}", f"serve.api_key={API_KEY}"],
    )
    promote(job, "tiny-sft", "1", force=True, deploy_app=True)
    base = f"http://{job.serve.host}:{job.serve.port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and chat(base)[0] != 200:
        time.sleep(0.5)
    yield base
    serve.shutdown()


def test_killed_model_replica_is_replaced_and_its_requests_get_a_503_with_the_reason(served):
    base = served
    before = replicas()
    assert len(before) == 1, before
    results: list[tuple[float, int, dict[str, Any]]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            code, body = chat(base)
            results.append((time.monotonic(), code, body))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    while len(results) < 6:
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.kill(before[0], signal.SIGKILL)
    deadline = killed_at + 180
    while time.monotonic() < deadline:
        fresh = [r for r in results if r[0] > killed_at]
        after = [pid for pid in replicas() if pid != before[0]]
        if after and any(code == 200 for _, code, _ in fresh[-3:]):
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=150)

    after = replicas()
    assert after and before[0] not in after, f"no new replica process: before {before}, after {after}"
    codes = [code for _, code, _ in results]
    print(f"{len(codes)} requests: {codes.count(200)} x 200, {codes.count(503)} x 503")
    assert set(codes) <= {200, 503}, sorted(set(codes))
    for _, code, body in results:
        if code == 503:
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == "replica_unavailable" and "retry" in body["error"]["message"]
    assert any(code == 200 for t, code, _ in results if t > killed_at), "the endpoint never answered again"
