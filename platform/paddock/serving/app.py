"""The Ray Serve application: a FastAPI ingress in front of a chat model deployment and a reward deployment.

Routes (OpenAI shapes where OpenAI has them):

- ``POST /v1/chat/completions``: Llama 2 chat format, ``n``, ``seed``, ``stop``, ``usage``, ``finish_reason``,
  server-sent events when ``stream`` is true;
- ``POST /v1/completions``: a raw prompt;
- ``GET /v1/models``: the served registered model and version;
- ``POST /v1/reward``: helpfulness and safety scores of a dialog's last answer, and the Llama 2 combination;
- ``GET /healthz``.

Requests, streaming or not, join one continuously batched decode loop (``ChatModel``). With an API key configured
(``serve.api_key`` or ``PADDOCK_API_KEY``) every ``/v1`` route wants ``Authorization: Bearer <key>``. Bad requests
get a 4xx with an OpenAI-style error body and the replica keeps serving. Requests, errors by code, tokens, time to
first token and latency are exported as Ray metrics (``paddock_serve_*``).
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' types at runtime.
import asyncio
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.metrics import Counter, Histogram

from paddock.cluster import actor_device
from paddock.serving.engine import Batch, Row, SamplingParams, TextTracker
from paddock.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    RewardRequest,
    error_body,
    openapi_body,
)

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@dataclass
class ServedModel:
    name: str  # registered name, e.g. tiny-ppo
    version: str
    path: str  # local checkpoint directory


def _threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def _dtype(name: str, device: torch.device) -> torch.dtype:
    from paddock.models import inference_dtype

    return inference_dtype(name, device.type == "cuda")


# --------------------------------------------------------------------------------------------------
# Model deployments


@dataclass
class _Entry:
    """A row waiting for or in the running batch, and where its text goes (a future, or a stream's queue)."""

    row: Row
    tracker: TextTracker
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Row] | None = None
    deltas: asyncio.Queue[dict[str, Any] | None] | None = None


@serve.deployment(name="ChatModel")
class ChatModel:
    """Holds the policy and one decode loop in a thread: requests join the running batch at its next step.

    Continuous batching: a new request is prefilled and merged into the batch between two decode steps (up to
    ``max_batch_size`` rows) instead of waiting for the batch in flight to finish, and leaves it when done.
    Streaming and non-streaming requests share the batch. An idle loop waits ``batch_wait_timeout_s`` after the
    first request, so that requests sent together are prefilled together.
    """

    def __init__(
        self,
        path: str,
        threads: int = 1,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.02,
        dtype: str = "auto",
        engine: str = "transformers",
        vllm: dict[str, Any] | None = None,
    ):
        from paddock.models import load_causal_lm
        from paddock.tokenizer import load_tokenizer

        _threads(threads)
        device = actor_device()
        self.tok = load_tokenizer(path)
        self.model: Any = None
        self.vllm: Any = None
        if engine == "vllm":
            from paddock.rollout.vllm_engine import serving_engine

            self.vllm = serving_engine(
                path, dtype=_dtype(dtype, device), on_gpu=device.type == "cuda", **(vllm or {})
            )
        else:
            self.model = load_causal_lm(path, _dtype(dtype, device)).eval().to(device)
        self.max_batch_size, self.wait_s = max_batch_size, batch_wait_timeout_s
        self.waiting: queue.Queue[_Entry] = queue.Queue()
        # What the decode loop reports through ping (and /healthz): its step count, rows in the running batch,
        # rows whose client went away, and the most decode steps such a row took to leave after it was cancelled.
        self.steps = self.running = self.cancelled = self.most_steps_after_cancel = 0
        self.cancelled_at: dict[int, int] = {}  # id(row) -> self.steps when its client went away
        self.thread = threading.Thread(target=self._loop, name="paddock-decode", daemon=True)
        self.thread.start()

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose decode loop died is replaced."""
        if not self.thread.is_alive():
            raise RuntimeError("the decode loop of this replica has stopped")

    def ping(self) -> dict[str, Any]:
        self.check_health()
        return {
            "waiting": self.waiting.qsize(),
            "running": self.running,
            "cancelled": self.cancelled,
            "most_steps_after_cancel": self.most_steps_after_cancel,
        }

    def _cancel(self, rows: list[Row]) -> None:
        """The rows' client went away: they leave the batch at the decode loop's next step."""
        for row in rows:
            if row.finish_reason is None and not row.cancelled:
                self.cancelled_at[id(row)] = self.steps
                row.cancelled = True

    def _freed(self, row: Row) -> None:
        """A cancelled row has left (or never joined) the batch."""
        self.cancelled += 1
        since = self.steps - self.cancelled_at.pop(id(row), self.steps)
        self.most_steps_after_cancel = max(self.most_steps_after_cancel, since)

    def _batch(self) -> Any:
        """A fresh decode batch: paddock's own (transformers) or one over the vLLM engine (``serve.engine``)."""
        if self.vllm is not None:
            from paddock.rollout.vllm_engine import VllmBatch

            return VllmBatch(self.vllm, self.tok.eos_token_id)
        return Batch(self.model, self.tok.eos_token_id)

    def _loop(self) -> None:
        batch = self._batch()
        entries: dict[int, _Entry] = {}
        while True:
            new: list[_Entry] = []
            if not batch:
                new.append(self.waiting.get())  # idle: block for the next request
                time.sleep(self.wait_s)
            while len(batch) + len(new) < self.max_batch_size:
                try:
                    new.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            for e in new:
                if e.row.cancelled:
                    self._freed(e.row)
            new = [e for e in new if not e.row.cancelled]
            if new:
                try:
                    batch.admit([e.row for e in new])
                    entries |= {id(e.row): e for e in new}
                except Exception as exc:  # a request that cannot be admitted fails alone; the batch runs on
                    logger.exception("admitting %d request(s) failed", len(new))
                    for e in new:
                        self._finish(e, exc)
            self.running = len(batch)
            if not batch:
                continue
            try:
                batch.pick()
                self.steps += 1
                for row in batch.rows:
                    if row.finish_reason in ("error", "cancelled"):
                        if row.error is not None:
                            logger.error("request row failed alone: %r", row.error)
                        if row.finish_reason == "cancelled":
                            self._freed(row)
                        self._finish(entries.pop(id(row)), row.error)
                        continue
                    self._emit(entries[id(row)])
                for row in batch.rows:
                    if row.finish_reason is not None and id(row) in entries:
                        self._finish(entries.pop(id(row)), None)
                batch.advance()
                self.running = len(batch)
            except BaseException as exc:  # a failed forward step fails the batch's requests, not the replica
                logger.exception("a decode step failed; failing the %d request(s) in the batch", len(entries))
                for e in entries.values():
                    self.cancelled_at.pop(id(e.row), None)
                    self._finish(e, exc)
                entries.clear()
                if hasattr(batch, "close"):
                    batch.close()
                batch = self._batch()

    @staticmethod
    def _emit(e: _Entry) -> None:
        delta = e.tracker.update()
        if delta and e.deltas is not None:
            e.loop.call_soon_threadsafe(e.deltas.put_nowait, {"delta": delta})

    @staticmethod
    def _finish(e: _Entry, error: BaseException | None) -> None:
        if e.deltas is not None:
            if error is not None:
                failed = {"error": f"{type(error).__name__}: {error}"[:300]}
                e.loop.call_soon_threadsafe(e.deltas.put_nowait, failed)
            elif not e.row.cancelled:
                end = {"finish_reason": e.row.finish_reason, "tokens": len(e.row.tokens)}
                e.loop.call_soon_threadsafe(e.deltas.put_nowait, end)
            e.loop.call_soon_threadsafe(e.deltas.put_nowait, None)
        elif e.done is not None:
            e.row.text = e.row.text.strip()
            done = e.done

            def settle() -> None:
                if done.done():  # cancelled: the client went away
                    return
                if error is None:
                    done.set_result(e.row)
                else:
                    done.set_exception(error)

            e.loop.call_soon_threadsafe(settle)

    def _tracker(self, row: Row) -> TextTracker:
        return TextTracker(self.tok, row, self.tok.eos_token_id)

    async def complete(self, rows: list[Row]) -> list[Row]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]
        for row, done in zip(rows, futures, strict=True):
            self.waiting.put(_Entry(row, self._tracker(row), loop, done=done))
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:  # the client went away: free the rows' slots at the next step
            self._cancel(rows)
            raise

    async def stream(self, row: Row) -> AsyncIterator[dict[str, Any]]:
        """Yields ``{"delta": text}`` as tokens arrive, then ``{"finish_reason": ..., "tokens": n}``, or
        ``{"error": why}`` when this request failed. A stream closed early (its client went away) cancels its row."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.waiting.put(_Entry(row, self._tracker(row), loop, deltas=deltas))
        try:
            while (item := await deltas.get()) is not None:
                yield item
        finally:
            self._cancel([row])  # no-op once the row has finished


@serve.deployment(name="RewardModels")
class RewardModels:
    """The helpfulness and safety reward models, and the Llama 2 combination of their scores."""

    def __init__(
        self, helpfulness: str, safety: str, seq_len: int = 512, threads: int = 1, dtype: str = "auto"
    ):
        from paddock.models import load_reward_model
        from paddock.tokenizer import load_tokenizer

        _threads(threads)
        device = actor_device()
        self.rm_h = load_reward_model(helpfulness, _dtype(dtype, device)).eval().to(device)
        self.rm_s = load_reward_model(safety, _dtype(dtype, device)).eval().to(device)
        self.tok = load_tokenizer(helpfulness)
        self.seq_len = seq_len

    def score(self, turns: list[dict[str, str]], answer: str, is_safety: bool) -> dict[str, float]:
        from paddock.rlhf.ppo import SAFETY_GATE, combine_rewards
        from paddock.rollout.core import reward_scores

        h = reward_scores(self.rm_h, self.tok, [turns], [answer], self.seq_len)
        s = reward_scores(self.rm_s, self.tok, [turns], [answer], self.seq_len)
        c = combine_rewards(h, s, torch.tensor([is_safety]), SAFETY_GATE)
        gate = bool(is_safety or s.item() < SAFETY_GATE)
        return {"helpfulness": h.item(), "safety": s.item(), "combined": c.item(), "used_safety": gate}


# --------------------------------------------------------------------------------------------------
# The ingress


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "paddock_serve_requests",
            "HTTP requests by route and status code.",
            tag_keys=("route", "code"),  # type: ignore[arg-type]  # Ray's hint says tuple[str]
        )
        self.errors = Counter("paddock_serve_errors", "Error responses by status code.", tag_keys=("code",))
        self.tokens = Counter("paddock_serve_tokens_generated", "Completion tokens generated.")
        self.streams = Counter(
            "paddock_serve_streams",
            "Streamed responses by how they ended: finished, error or cancelled (the client went away).",
            tag_keys=("outcome",),
        )
        self.ttft = Histogram(
            "paddock_serve_time_to_first_token_s", "Seconds to the first streamed token.", LATENCY_BUCKETS
        )
        self.latency = Histogram(
            "paddock_serve_latency_s", "Request latency in seconds.", LATENCY_BUCKETS, tag_keys=("route",)
        )

    def observe(self, route: str, code: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "code": str(code)})
        if code >= 400:
            self.errors.inc(tags={"code": str(code)})
        self.latency.observe(seconds, tags={"route": route})


# The schema and docs are Ingress routes (behind serve.docs and the key), not FastAPI's own open ones.
app = FastAPI(
    title="paddock",
    description="OpenAI-compatible chat and reward endpoints for paddock models.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def _key_matches(header: str, key: str) -> bool:
    """Constant-time comparison of an Authorization header with ``Bearer <key>``."""
    return hmac.compare_digest(header.encode(), f"Bearer {key}".encode())


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(
        413, f"the request body is {size} bytes; this endpoint takes at most {limit}", code="body_too_large"
    )


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        chat: Any,
        rewards: Any | None,
        model: dict[str, str],
        api_key: str | None = None,
        default_max_tokens: int = 256,
        limits: dict[str, Any] | None = None,  # a ServeConfig's fields: body, message and prompt caps, docs
    ):
        from transformers import AutoConfig

        from paddock.tokenizer import load_tokenizer

        self.chat, self.rewards = chat, rewards
        self.model = ServedModel(**model)
        self.tok = load_tokenizer(self.model.path)
        config = AutoConfig.from_pretrained(self.model.path, local_files_only=True)
        self.context = int(config.max_position_embeddings)
        self.api_key = api_key or os.environ.get("PADDOCK_API_KEY") or None
        self.default_max_tokens = default_max_tokens
        from paddock.config import ServeConfig

        self.limits = ServeConfig.model_validate(limits or {})
        self.reward_key = (
            self.limits.reward_api_key or os.environ.get("PADDOCK_REWARD_API_KEY") or self.api_key
        )
        self.metrics = Metrics()

    # -- plumbing ----------------------------------------------------------------------------------

    def _authorize(self, request: Request, key: str | None = None) -> None:
        key = key or self.api_key
        if key is None:
            return
        if not _key_matches(request.headers.get("authorization", ""), key):
            raise RequestError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                type_="authentication_error",
            )

    async def _body(self, request: Request, model: type[Any]) -> Any:
        from pydantic import ValidationError

        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        raw = b""
        async for part in request.stream():  # read no further than the limit, whatever the header said
            raw += part
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
        try:
            data = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(
                400, f"the request body is not valid JSON: {exc}", code="invalid_json"
            ) from None
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            given = f", got {first['input']!r}" if first["type"] != "missing" else ""
            message = f"{param}: {first['msg'].removeprefix('Value error, ')}{given}"
            raise RequestError(400, message, param=param) from None

    def _check_size(self, texts: list[str], param: str) -> None:
        """Message count and characters, before anything is tokenised."""
        if param == "messages" and len(texts) > self.limits.max_messages:
            raise RequestError(
                400,
                f"messages: {len(texts)} messages; this endpoint takes at most {self.limits.max_messages}",
                param=param,
                code="too_many_messages",
            )
        chars = sum(len(t) for t in texts)
        if chars > self.limits.max_prompt_chars:
            raise RequestError(
                400,
                f"{param}: {chars} characters; this endpoint takes at most {self.limits.max_prompt_chars}",
                param=param,
                code="prompt_too_long",
            )

    def _check_model(self, requested: str | None) -> None:
        if requested and requested not in (self.model.name, f"{self.model.name}/{self.model.version}"):
            raise RequestError(
                404,
                f"model {requested!r} is not served here; this endpoint serves {self.model.name!r}",
                param="model",
                code="model_not_found",
            )

    def _rows(self, prompt_ids: list[int], req: Any) -> list[Row]:
        max_tokens = req.max_tokens or min(self.default_max_tokens, self.context - len(prompt_ids))
        if len(prompt_ids) >= self.context:
            raise RequestError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.context}",
                param="messages",
                code="context_length_exceeded",
            )
        if len(prompt_ids) + max_tokens > self.context:
            raise RequestError(
                400,
                f"max_tokens {max_tokens} + prompt {len(prompt_ids)} tokens exceeds the context of {self.context}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if req.n > 1 and req.stream:
            raise RequestError(400, "n > 1 is not supported with stream", param="n")
        rows = []
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i
            params = SamplingParams(max_tokens, req.temperature, req.top_p, seed, req.stop_tuple())
            rows.append(Row(list(prompt_ids), params))
        return rows

    async def _handle(self, route: str, request: Request, work: Any, key: str | None = None) -> Any:
        from ray.serve.exceptions import BackPressureError

        start = time.perf_counter()
        try:
            self._authorize(request, key)
            response = await work()
            code = getattr(response, "status_code", 200)
        except RequestError as exc:
            response, code = _error(exc), exc.status
        except BackPressureError:  # the model deployment's queue is full
            response = JSONResponse(
                error_body(
                    "the model is at capacity (its request queue is full); retry shortly",
                    "server_error",
                    code="overloaded",
                ),
                status_code=503,
                headers={"Retry-After": "2"},
            )
            code = 503
        except RayActorError as exc:  # the model replica died (or is dying); Serve starts another
            response = JSONResponse(
                error_body(
                    f"the model replica is unavailable ({type(exc).__name__}); Serve is replacing it, retry shortly",
                    "server_error",
                    code="replica_unavailable",
                ),
                status_code=503,
                headers={"Retry-After": "5"},
            )
            code = 503
        # a bug: say so in a line (the traceback goes to the replica's log), keep serving
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps what the model replica raised
            logger.exception("%s failed", route)
            detail = (str(cause).strip().splitlines() or [""])[-1][:300]
            response = JSONResponse(
                error_body(f"internal error: {type(cause).__name__}: {detail}", "server_error"),
                status_code=500,
            )
            code = 500
        self.metrics.observe(route, code, time.perf_counter() - start)
        return response

    def _usage(self, prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- routes ------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> Any:
        """Healthy when a model replica answers (within 5 s): the ingress alone is not the service."""
        from ray.serve.exceptions import BackPressureError

        try:
            state = await asyncio.wait_for(self.chat.ping.remote(), timeout=5)
        except BackPressureError:  # healthy, and full: a balancer should send the next request elsewhere
            return JSONResponse(
                {
                    "status": "at capacity",
                    "model": self.model.name,
                    "reason": "the model's request queue is full",
                },
                status_code=503,
                headers={"Retry-After": "2"},
            )
        except Exception as exc:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "model": self.model.name,
                    "reason": f"{type(exc).__name__}: {exc}"[:300],
                },
                status_code=503,
                headers={"Retry-After": "5"},
            )
        return {"status": "ok", "model": self.model.name, "version": self.model.version, **state}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(self, request: Request) -> Any:
        """The OpenAPI schema, when ``serve.docs`` is on (behind the API key)."""

        async def work() -> Any:
            self._docs_on()
            return JSONResponse(app.openapi())

        return await self._handle("/openapi.json", request, work)

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        from fastapi.openapi.docs import get_swagger_ui_html

        async def work() -> Any:
            self._docs_on()
            return get_swagger_ui_html(openapi_url="/openapi.json", title="paddock")

        return await self._handle("/docs", request, work)

    def _docs_on(self) -> None:
        if not self.limits.docs:
            raise RequestError(
                404, "the schema and docs are not served here (serve.docs is off)", code="not_found"
            )

    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        async def work() -> Any:
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.model.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "paddock",
                        "version": self.model.version,
                    }
                ],
            }

        return await self._handle("/v1/models", request, work)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Any:
        from paddock.data.chat import ChatFormatError
        from paddock.data.tokenize import encode_prompt

        async def work() -> Any:
            req = await self._body(request, ChatCompletionRequest)
            self._check_size([m.content for m in req.messages], "messages")
            self._check_model(req.model)
            system, turns = req.dialog()
            try:
                prompt_ids = encode_prompt(self.tok, turns, system)
            except ChatFormatError as exc:  # text holding the chat template's special tokens
                raise RequestError(400, f"messages: {exc}", "messages") from None
            return await self._answer(req, prompt_ids, chat=True)

        return await self._handle("/v1/chat/completions", request, work)

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        async def work() -> Any:
            req = await self._body(request, CompletionRequest)
            self._check_size([req.prompt], "prompt")
            self._check_model(req.model)
            from paddock.data.chat import TAGS
            from paddock.data.tokenize import special_texts

            if any(tag in req.prompt for tag in (*TAGS, *special_texts(self.tok))):
                raise RequestError(
                    400,
                    "prompt: contains a chat tag or special token; use /v1/chat/completions",
                    param="prompt",
                )
            prompt_ids = [self.tok.bos_token_id, *self.tok.encode(req.prompt, add_special_tokens=False)]
            return await self._answer(req, prompt_ids, chat=False)

        return await self._handle("/v1/completions", request, work)

    async def _answer(self, req: Any, prompt_ids: list[int], chat: bool) -> Any:
        """A chat or text completion: streamed, or all ``n`` choices decoded in one batch."""
        rows = self._rows(prompt_ids, req)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return self._stream(rid, "chat.completion.chunk" if chat else "text_completion", rows[0])
        done = await self.chat.complete.remote(rows)
        completion = sum(len(r.tokens) for r in done)
        self.metrics.tokens.inc(completion)
        choices = [
            {"index": i, "finish_reason": r.finish_reason}
            | (
                {"message": {"role": "assistant", "content": r.text}}
                if chat
                else {"text": r.text, "logprobs": None}
            )
            for i, r in enumerate(done)
        ]
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model.name,
            "choices": choices,
            "usage": self._usage(len(prompt_ids), completion),
        }

    def _stream(self, rid: str, kind: str, row: Row) -> StreamingResponse:
        created = int(time.time())
        chat = kind == "chat.completion.chunk"
        handle = self.chat.options(stream=True)
        metrics = self.metrics

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": delta or ""} if first else {}
                if delta and not first:
                    d = {"content": delta}
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": self.model.name,
                "choices": [choice],
            }
            return f"data: {json.dumps(body)}\n\n"

        def failed(message: str) -> str:
            # OpenAI's streaming error shape: an error event, and no [DONE] (the answer is not complete)
            return f"data: {json.dumps(error_body(message, 'server_error', code='generation_failed'))}\n\n"

        async def events() -> AsyncIterator[str]:
            start = time.perf_counter()
            outcome = "cancelled"  # unless it ends below: the client went away
            try:
                if chat:
                    yield chunk(None, None, first=True)
                got_first = False
                async for item in handle.stream.remote(row):
                    if "delta" in item:
                        if not got_first:
                            metrics.ttft.observe(time.perf_counter() - start)
                            got_first = True
                        yield chunk(item["delta"], None)
                    elif "error" in item:
                        outcome = "error"
                        logger.error("stream %s failed: %s", rid, item["error"])
                        yield failed(f"generation failed: {item['error']}")
                        return
                    else:
                        metrics.tokens.inc(item["tokens"])
                        yield chunk(None, item["finish_reason"])
                outcome = "finished"
                yield "data: [DONE]\n\n"
            except Exception as exc:  # the model replica died or refused mid-stream
                outcome = "error"
                logger.exception("stream %s failed", rid)
                yield failed(f"generation failed: {type(exc).__name__}: {exc}"[:300])
            finally:
                metrics.streams.inc(tags={"outcome": outcome})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/reward", openapi_extra=openapi_body(RewardRequest))
    async def reward(self, request: Request) -> Any:
        async def work() -> Any:
            if self.rewards is None:
                raise RequestError(
                    404,
                    "no reward models are served by this endpoint (serve.reward_route is off)",
                    code="not_served",
                )
            req = await self._body(request, RewardRequest)
            self._check_size([m.content for m in req.messages], "messages")
            prompt, answer = req.prompt_and_answer()
            scores = await self.rewards.score.remote(prompt, answer, req.is_safety)
            return {"object": "reward", "model": self.model.name, **scores}

        return await self._handle("/v1/reward", request, work, key=self.reward_key)


# --------------------------------------------------------------------------------------------------
# Building the application


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application from plain arguments (what ``serve deploy`` passes to ``app_builder``).

    ``args``: ``model`` {name, version, path}; optional ``reward_helpfulness`` and ``reward_safety`` paths;
    ``serve``: a ``paddock.config.ServeConfig`` as a dict.
    """
    from paddock.config import ServeConfig

    cfg = ServeConfig.model_validate(args.get("serve", {}))
    check_exposure(cfg)
    model = dict(args["model"])
    if not Path(model.get("path") or "").is_dir():
        if not model.get("uri"):
            raise FileNotFoundError(f"served model directory {model.get('path')!r} does not exist")
        from paddock import tracking

        model["path"] = str(tracking.resolve_model(model["uri"]))
    # A vLLM engine over several GPUs (tensor parallelism) starts one process on each of its replica's GPUs.
    tp = cfg.vllm.tensor_parallel if cfg.engine == "vllm" else 1
    actor = {"num_cpus": cfg.cpus_per_replica} | (
        {"num_gpus": cfg.gpus_per_replica * tp} if cfg.gpus_per_replica else {}
    )
    autoscaling = {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
    }
    chat = ChatModel.options(  # type: ignore[attr-defined]
        ray_actor_options=actor,
        autoscaling_config=autoscaling,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
    ).bind(
        model["path"],
        cfg.threads,
        cfg.max_batch_size,
        cfg.batch_wait_timeout_s,
        cfg.dtype,
        cfg.engine,
        cfg.vllm.model_dump(),
    )
    rewards = None
    if cfg.reward_route and args.get("reward_helpfulness") and args.get("reward_safety"):
        rewards = RewardModels.options(  # type: ignore[attr-defined]
            ray_actor_options={"num_cpus": cfg.cpus_per_replica / 2}
        ).bind(args["reward_helpfulness"], args["reward_safety"], cfg.reward_seq_len, cfg.threads, cfg.dtype)
    return Ingress.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=ingress_capacity(cfg),
        max_queued_requests=cfg.max_queued_requests,
    ).bind(
        chat,
        rewards,
        {"name": model["name"], "version": str(model["version"]), "path": model["path"]},
        cfg.api_key,
        cfg.default_max_tokens,
        cfg.model_dump(mode="json"),
    )


def ingress_capacity(cfg: Any) -> int:
    """Requests the ingress replica handles at once: every chat replica's ongoing requests, the chat model's
    queue and room for the routes that do not decode. So a full server is the chat model's full queue, which the
    ingress answers with a 503 in OpenAI's error shape and a Retry-After; the ingress's own queue (Serve's plain
    503) fills only beyond that."""
    return cfg.max_ongoing_requests * max(1, cfg.max_replicas) + cfg.max_queued_requests + 16


class ExposureError(ValueError):
    """A Serve app that would listen beyond this machine with no API key."""


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: Any) -> None:
    """Fail closed: a non-loopback bind needs an API key (``serve.api_key`` or PADDOCK_API_KEY)."""
    if is_loopback(cfg.host) or cfg.api_key or os.environ.get("PADDOCK_API_KEY"):
        return
    raise ExposureError(
        f"serve.host is {cfg.host!r}, reachable beyond this machine, and no API key is set: export "
        "PADDOCK_API_KEY=<a long random string> (or set serve.api_key), or bind 127.0.0.1"
    )


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path: paddock.serving.app:app_builder`` in a Serve config file."""
    return build_app(args)
