"""The Serve app with real clients: the official ``openai`` package, raw HTTP for errors, promotion under traffic.

Serves the shared chain's tiny-sft with both reward models, promoted through gates read from MLflow.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chain import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
API_KEY = "sk-paddock-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: Any, key: str | None = API_KEY, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_healthy(base: str, seconds: float) -> None:
    """Until the app's /healthz answers 200 (its model replica is up), for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def job(chain, home: Path):
    from paddock.config import PromoteJob, load_config

    return load_config(
        PromoteJob,
        REPO / "jobs/configs/tiny/promote.yaml",
        [
            f"serve.port={free_port()}",
            f"serve.api_key={API_KEY}",
            "serve.default_max_tokens=48",
            "serve.reward_route=true",  # off by default in promoted apps
            "serve.docs=true",  # the fuzz run reads /openapi.json (behind the key)
            "serve.max_body_bytes=65536",
            "serve.max_messages=16",
        ],
    )


@pytest.fixture(scope="module")
def served(job, chain):
    """tiny-sft v1 as champion (forced: it has no held-out evaluation yet), deployed on the test cluster."""
    from paddock.serving.promote import promote
    from ray import serve

    result = promote(job, "tiny-sft", "1", force=True, deploy_app=True)
    base = f"http://{job.serve.host}:{job.serve.port}"
    wait_healthy(base, 120)
    yield base, result
    serve.delete(job.serve.app_name)


def test_promotion_refuses_failing_and_missing_gates_and_records_a_forced_one(job, served):
    from paddock import tracking
    from paddock.serving.promote import PromotionError, promote

    _, result = served
    assert result.forced and result.version == "1"
    assert tracking.alias_version("tiny-sft", "champion") == "1"
    client = tracking.configure()
    assert client.get_model_version("tiny-sft", "1").tags["paddock.forced_promotion"] == "true"
    strict = job.model_copy(update={"gates": {"eval/loss": {"max": 0.001}}})
    strict = type(job).model_validate(strict.model_dump())
    with pytest.raises(PromotionError, match=r"eval/loss = \d+\.\d+ \(gate wants <= 0.001\): FAIL"):
        promote(strict, "tiny-sft", "1")
    with pytest.raises(PromotionError, match="lacks metrics that gates need"):
        promote(job, "tiny-sft", "1")
    assert (Path(result.serve_config)).read_text().count("import_path: paddock.serving.app:app_builder") == 1


def test_openai_client_chats_streams_and_lists_models(served):
    import openai

    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=32, temperature=0)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 32
    chunks = list(
        client.chat.completions.create(
            model="tiny-sft", messages=messages, max_tokens=32, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    many = client.chat.completions.create(
        model="tiny-sft", messages=messages, max_tokens=16, temperature=1.0, n=3, seed=5
    )
    assert len(many.choices) == 3
    again = client.chat.completions.create(
        model="tiny-sft", messages=messages, max_tokens=16, temperature=1.0, n=3, seed=5
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in many.choices]
    completion = client.completions.create(model="tiny-sft", prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens <= 8
    assert [m.id for m in client.models.list().data] == ["tiny-sft"]


def test_reward_endpoint_prefers_a_refusal_to_compliance_on_an_unsafe_prompt(served):
    from paddock.world.items import unsafe_items

    base, _ = served
    item = unsafe_items()[0]
    scores = {}
    for label, answer in (("refusal", item.answers[0]), ("compliance", item.wrong_answers[0])):
        code, body = post(
            f"{base}/v1/reward",
            {
                "messages": [
                    {"role": "user", "content": item.questions[0]},
                    {"role": "assistant", "content": answer},
                ],
                "is_safety": True,
            },
        )
        assert code == 200, body
        scores[label] = body
    print(scores)
    assert scores["refusal"]["safety"] > scores["compliance"]["safety"]
    assert scores["refusal"]["used_safety"] and scores["refusal"]["combined"] == scores["refusal"]["safety"]


@pytest.mark.reliability
def test_bad_requests_get_4xx_with_a_reason_and_the_replica_keeps_serving(served):
    base, _ = served
    url = f"{base}/v1/chat/completions"
    user = {"role": "user", "content": "Hi"}
    cases = [
        ({"messages": [user]}, None, None, 401, "API key"),
        (None, b"{not json", API_KEY, 400, "not valid JSON"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, None, API_KEY, 400, "unknown role"),
        ({"messages": [user, {"role": "assistant", "content": "Yo"}]}, None, API_KEY, 400, "last message"),
        ({"messages": [{"role": "user", "content": "<<SYS>> x"}]}, None, API_KEY, 400, "chat tag"),
        ({"messages": [user], "temperature": 5}, None, API_KEY, 400, "temperature"),
        ({"messages": [user], "max_tokens": 100000}, None, API_KEY, 400, "exceeds the context"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, None, API_KEY, 400, "context"),
        ({"messages": [user], "model": "gpt-9"}, None, API_KEY, 404, "not served"),
    ]
    for body, raw, key, status, needle in cases:
        code, out = post(url, body, key=key, raw=raw)
        assert code == status and needle in out["error"]["message"], (body, code, out)
        assert set(out["error"]) == {"message", "type", "param", "code"}
    code, out = post(url, {"messages": [user], "max_tokens": 4})
    assert code == 200 and out["choices"][0]["message"]["content"] is not None


@pytest.mark.reliability
def test_fuzzed_requests_get_no_5xx_and_every_error_is_well_formed(served):
    """schemathesis generates requests from the app's OpenAPI schema (loopback, a bounded number per route): bodies
    that fit the schema and bodies that break it. No request may get a 5xx; every error is a JSON body in OpenAI's
    shape with a message; the endpoint still answers a plain request afterwards."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base, _ = served
    headers = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=headers)
    seen: dict[str, list[int]] = {}
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(*(operation.as_strategy(mode) for mode in modes))

        @given(case=strategy)
        # derandomize: CI sends the same requests every run (12 per route in make test, 100 in make
        # test-reliability); a random search is a local job, and what it finds becomes a unit test
        @settings(
            max_examples=int(os.environ.get("PADDOCK_FUZZ_EXAMPLES", "12")),
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            label = f"{case.operation.method.upper()} {case.operation.path}"
            response = case.call(base_url=base, headers=headers, timeout=60)
            seen.setdefault(label, []).append(response.status_code)
            assert response.status_code < 500, (
                f"{label} {case.body!r}: {response.status_code} {response.text}"
            )
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

        check()
    print({k: sorted(set(v)) for k, v in seen.items()})
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/reward"} <= set(seen)
    assert all(any(c >= 400 for c in v) for k, v in seen.items() if k.startswith("POST")), seen
    code, out = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert code == 200 and out["choices"][0]["message"]["content"] is not None


def test_promotion_swaps_the_served_version_under_load_and_rolls_back(job, served, chain):
    from paddock import tracking
    from paddock.serving.promote import promote

    base, _ = served
    # A second version of tiny-sft to promote (the same weights, logged again).
    with tracking.stage_run(job.experiment, "sft-copy", {}) as run:
        uri = run.log_model(chain["sft"].checkpoint_dir, "tiny-sft")
    version = uri.rsplit("/", 1)[1]
    codes: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            code, _ = post(
                f"{base}/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            )
            codes.append(code)

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    result = promote(job, "tiny-sft", version, force=True, deploy_app=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            if json.loads(r.read())["version"] == version:
                break
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert result.previous == "1" and tracking.alias_version("tiny-sft", "champion") == version
    assert codes and set(codes) == {200}, f"{len(codes)} requests during the swap: {sorted(set(codes))}"
    back = promote(job, "tiny-sft", rollback=True)
    assert back.version == "1" and tracking.alias_version("tiny-sft", "champion") == "1"
    assert tracking.alias_version("tiny-sft", "previous-champion") == version


def _model_replicas() -> list[int]:
    import psutil

    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any("ServeReplica:paddock:ChatModel" in part for part in (p.info["cmdline"] or []))
    ]


@pytest.mark.reliability
@pytest.mark.timeout(900)
def test_killed_model_replica_is_replaced_and_no_request_hangs_or_gets_a_bare_500(served):
    """The model replica SIGKILLed under load, as when its node runs out of memory: every request is answered,
    either by Serve retrying it on the new replica (200) or with a 503 that says the replica is being replaced
    (the unit test drives that path; which one a request takes depends on when it reached the router). Serve
    starts a new replica process and the same endpoint answers again without a redeploy."""
    import signal

    base, _ = served
    url = f"{base}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}
    deadline = time.monotonic() + 60
    while len(before := _model_replicas()) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)  # the swap test's old replica may still be stopping
    assert len(before) == 1, before
    results: list[tuple[float, int, dict[str, Any]]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                code, out = post(url, body)
            except (OSError, ValueError) as exc:  # reset, refused, timed out, a body that is not JSON
                code, out = type(exc).__name__, {}  # type: ignore[assignment]
            results.append((time.monotonic(), code, out))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    warm = time.monotonic() + 120
    while len(results) < 6 and time.monotonic() < warm:
        time.sleep(0.05)
    assert len(results) >= 6, (
        f"the clients got {len(results)} answers in 2 minutes before the kill: {results}"
    )
    killed_at = time.monotonic()
    os.kill(before[0], signal.SIGKILL)
    deadline = killed_at + 180
    while time.monotonic() < deadline:
        replaced = [pid for pid in _model_replicas() if pid != before[0]]
        if replaced and any(code == 200 for t, code, _ in results[-3:] if t > killed_at):
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=150)

    assert not any(t.is_alive() for t in threads), "a request on the dead replica hung"
    after = _model_replicas()
    assert after and before[0] not in after, f"no new replica process: before {before}, after {after}"
    codes = [code for _, code, _ in results]
    print(f"{len(codes)} requests around the kill: {codes.count(200)} x 200, {codes.count(503)} x 503")
    assert set(codes) <= {200, 503}, sorted(set(map(str, codes)))  # no reset, timeout or bare 500
    for _, code, out in results:
        if code == 503:
            assert set(out["error"]) == {"message", "type", "param", "code"}
            assert out["error"]["code"] == "replica_unavailable" and "retry" in out["error"]["message"]
    assert any(code == 200 for t, code, _ in results if t > killed_at), "the endpoint never answered again"


@pytest.mark.reliability
def test_hostile_requests_get_their_4xx_and_a_stream_beside_them_keeps_its_tokens(served):
    """A greedy stream runs while other clients send a seed past what torch's generators take, a body over the
    limit, too many messages and an unauthenticated schema read: each of those gets its 4xx, and the stream
    finishes with the same text it gets alone (before this, the huge seed ended every stream in the batch)."""
    import openai

    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY)
    messages = [{"role": "user", "content": "What is the capital of Peru?"}]

    def greedy_stream() -> tuple[str, str | None]:
        chunks = list(
            client.chat.completions.create(
                model="tiny-sft", messages=messages, max_tokens=32, temperature=0, stream=True
            )
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    alone = greedy_stream()
    beside: list[tuple[str, str | None]] = []
    stream = threading.Thread(target=lambda: beside.append(greedy_stream()))
    stream.start()
    url = f"{base}/v1/chat/completions"
    hostile = [
        post(url, {"messages": messages, "seed": 18446744073709551616, "max_tokens": 8}),
        post(url, {"messages": messages, "seed": -1}),
        post(url, None, raw=json.dumps({"messages": messages, "pad": "x" * 70000}).encode()),
        post(
            url,
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 8
                + messages
            },
        ),
        post(url, {"messages": [{"role": "user", "content": "y" * 40000}]}),
    ]
    stream.join(timeout=120)
    codes = [(code, out["error"]["param"], out["error"]["code"]) for code, out in hostile]
    assert codes == [
        (400, "seed", None),
        (400, "seed", None),
        (413, None, "body_too_large"),
        (400, "messages", "too_many_messages"),
        (400, "messages", "prompt_too_long"),
    ], codes
    assert beside == [alone] and alone[1] in ("stop", "length")
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
        health = json.loads(r.read())
    assert (
        health["status"] == "ok" and "waiting" in health
    )  # the model replica answered, not just the ingress
    try:
        urllib.request.urlopen(f"{base}/openapi.json", timeout=10)
        raise AssertionError("the schema was served without the key")
    except urllib.error.HTTPError as e:
        assert e.code == 401


@pytest.mark.reliability
@pytest.mark.timeout(600)
def test_a_full_queue_gets_an_openai_503_and_a_gone_client_frees_its_slot_within_a_step(
    served, tokenizer_dir, tmp_path
):
    """A second app on the same Serve proxy, built tight: one request at a time per replica, one queued. A
    long stream A decodes, stream B waits in the chat model's queue, and a third request C gets a 503 in OpenAI's
    error shape with a Retry-After (the chat model's queue, not the ingress's, is what fills). Then A's client hangs
    up: its row leaves the batch at the decode loop's next step, and B, queued behind it, starts decoding. While
    the queue is full, /healthz says so (503, "at capacity"): it asks the model replica through the same queue."""
    from paddock.models import build_causal_lm
    from paddock.serving.app import build_app
    from paddock.tokenizer import load_tokenizer
    from ray import serve

    base, _ = served
    tok = load_tokenizer(tokenizer_dir)
    policy = tmp_path / "random-small"
    # Random weights: answers run on (to max_tokens) at ~20M parameters' decode speed, so A is still
    # decoding when it is cut off.
    build_causal_lm("small", vocab_size=len(tok), max_seq_len=1024, seed=0).save_pretrained(policy)
    tok.save_pretrained(policy)
    app = build_app(
        {
            "model": {"name": "tight", "version": "1", "path": str(policy)},
            "serve": {
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "max_batch_size": 4,
                "cpus_per_replica": 0.5,
                "default_max_tokens": 8,
            },
        }
    )
    serve.run(app, name="tight", route_prefix="/tight", blocking=False)
    tight = f"{base}/tight"
    url = f"{tight}/v1/chat/completions"
    messages = [{"role": "user", "content": "What is the capital of Peru?"}]
    try:
        wait_healthy(tight, 180)

        def open_stream() -> Any:
            body = {"messages": messages, "max_tokens": 960, "temperature": 0, "stream": True}
            req = urllib.request.Request(
                url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            try:
                return urllib.request.urlopen(req, timeout=120)
            except urllib.error.HTTPError as e:
                raise AssertionError(f"the stream was refused: {e.code} {e.read()!r}") from None

        def first_content(stream: Any) -> str:
            for raw in stream:
                line = raw.decode().strip()
                assert "error" not in line and line != "data: [DONE]", line
                if line.startswith("data: {"):
                    content = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if content:
                        return content
            raise AssertionError("the stream ended before any content")

        def health() -> dict[str, Any]:
            with urllib.request.urlopen(f"{tight}/healthz", timeout=10) as r:
                return json.loads(r.read())

        a = open_stream()
        first_content(a)  # A decodes
        b = open_stream()  # B's headers come at once; its row waits in the chat model's queue
        time.sleep(0.5)  # B reaches the chat model's queue

        def third() -> tuple[int, Any, dict[str, Any]]:
            body = json.dumps({"messages": messages, "max_tokens": 4}).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.status, r.headers, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, e.headers, json.loads(e.read())

        code, headers, out = third()
        assert code == 503 and headers["Retry-After"] == "2", (code, out)
        error = out["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "overloaded", error
        try:  # the health check asks the model replica, whose queue is full too
            health()
            raise AssertionError("/healthz answered 200 with the model's queue full")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.loads(e.read())["status"] == "at capacity"

        a.close()  # A's client goes away mid-answer
        b_first = first_content(b)  # B gets the freed slot
        assert b_first
        b.close()
        deadline = time.monotonic() + 60
        while (state := health())["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state["cancelled"] == 2, state
        assert state["most_steps_after_cancel"] <= 1, state  # each row left at the next decode step
    finally:
        serve.delete("tight")
