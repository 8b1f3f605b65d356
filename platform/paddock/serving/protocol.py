"""The OpenAI-compatible request shapes paddock serves, their checks, and OpenAI-style error bodies.

Requests are validated before any model sees them; every problem is a ``RequestError`` with the HTTP status,
a message that names the bad field and value, and the OpenAI error ``type``/``param``/``code``, so clients built
for OpenAI's API (the ``openai`` package among them) surface it as they would OpenAI's own errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from paddock.data.chat import ChatFormatError, check_turns

MAX_N = 8
MAX_STOP = 4
# A request's n rows draw from seeds seed .. seed + n - 1; torch generators take seeds below 2^63 here.
MAX_SEED = 2**63 - 1 - MAX_N


class RequestError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra`` documenting its JSON body. The routes parse bodies themselves (so that a bad
    one gets a 400 in OpenAI's error shape, not FastAPI's 422), which hides them from FastAPI's schema; this puts
    them back, with the model's ``$defs`` inlined (OpenAPI keeps shared schemas elsewhere)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # checked with the turn order in ChatCompletionRequest.dialog, for a message that names the turn; the enum is
    # for the schema's readers (and schemathesis)
    role: str = Field(..., json_schema_extra={"enum": ["system", "user", "assistant"]})
    content: str


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions; ranges as OpenAI documents them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(0.6, ge=0, le=2)  # Llama 2's chat default
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1)

    def dialog(self) -> tuple[str | None, list[dict[str, str]]]:
        """(system prompt, turns): an optional leading system message, then user/assistant turns ending with user."""
        msgs = list(self.messages)
        system = None
        if msgs and msgs[0].role == "system":
            system = msgs.pop(0).content
        turns = [{"role": m.role, "content": m.content} for m in msgs]
        for i, m in enumerate(msgs):
            if m.role not in ("user", "assistant", "system"):
                raise RequestError(
                    400,
                    f"messages[{i}].role: unknown role {m.role!r}; use system, user or assistant",
                    "messages",
                )
            if m.role == "system":
                raise RequestError(400, "a system message may only come first", "messages")
        if not turns:
            raise RequestError(400, "messages: no user message after the system prompt", "messages")
        if turns[-1]["role"] != "user":
            raise RequestError(400, "messages: the last message must be the user's", "messages")
        try:
            check_turns(turns, system)
        except ChatFormatError as exc:
            raise RequestError(400, f"messages: {exc}", "messages") from None
        return system, turns


class CompletionRequest(SamplingFields):
    prompt: str = Field(..., min_length=1)


class RewardRequest(BaseModel):
    """A dialog whose last message is the assistant answer to score."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(..., min_length=2)
    is_safety: bool = Field(False, description="A safety prompt: the combination takes the safety score.")

    def prompt_and_answer(self) -> tuple[list[dict[str, str]], str]:
        turns = [{"role": m.role, "content": m.content} for m in self.messages if m.role != "system"]
        if not turns or turns[-1]["role"] != "assistant":
            raise RequestError(
                400, "messages: the last message must be the assistant answer to score", "messages"
            )
        try:
            check_turns(turns)
        except ChatFormatError as exc:
            raise RequestError(400, f"messages: {exc}", "messages") from None
        return turns[:-1], turns[-1]["content"]


FinishReason = Literal["stop", "length"]
