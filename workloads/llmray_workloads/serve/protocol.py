"""The OpenAI wire protocol: request validation, errors, response objects and SSE framing.

All functions here are pure. Requests are parsed strictly (a string where a number belongs is a
400, not silently coerced) and every failure becomes :class:`ApiError`, rendered in OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape. Responses are built from the ``openai``
package's own pydantic types so their shape is exactly what the official client parses.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as chat_types
from openai.types.chat import chat_completion_chunk as chunk_types
from openai.types.shared import ErrorObject
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_CHOICES = 8
"""Most sequences (prompts x n) one request may ask for."""
MAX_STOP = 4
MAX_STOP_CHARS = 256


@dataclass
class ApiError(Exception):
    """An error answer: HTTP status plus OpenAI's error fields (and optional extra headers)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] | None = None

    def body(self) -> dict[str, Any]:
        error = ErrorObject(message=self.message, type=self.type, param=self.param, code=self.code)
        return {"error": error.model_dump(mode="json", include={"message", "type", "param", "code"})}

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, what: str) -> ApiError:
    return bad_request(f"{what} is not supported by this server", param, "unsupported_parameter")


# ---- requests --------------------------------------------------------------------------------


class _Request(BaseModel):
    """Strict parsing; unknown fields are ignored as OpenAI-compatible servers commonly do."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = None


Stop = str | list[str] | None


class _SamplingFields(_Request):
    model: str = Field(..., min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    """vLLM extension: keep generating past the end-of-sequence token (benchmarks)."""

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Stop) -> Stop:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_CHARS} characters")
        return value


RequestT = TypeVar("RequestT", bound="_Request")

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("token prompts must not be empty")
        return value


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


def _reject_nan(token: str) -> float:
    raise ValueError(f"{token} is not valid JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 for anything else, including NaN/Infinity)."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw, parse_constant=_reject_nan)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return data


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not _is_union_tag(item):
            parts.append(f".{item}" if parts else item)
    return "".join(parts)


def _is_union_tag(item: str) -> bool:
    scalar = {"str", "int", "float", "bool"}
    return item in scalar or item.startswith(("list[", "dict[", "function-", "TextPart", "StreamOptions"))


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts',
    "stop": f"must be a string or a list of at most {MAX_STOP} strings",
}


def validation_error(exc: ValidationError) -> ApiError:
    """The first pydantic error as an OpenAI 400 naming the offending parameter."""
    first = exc.errors(include_url=False)[0]
    loc = tuple(first.get("loc", ()))
    param = _loc(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    named = [item for item in loc if isinstance(item, str) and not _is_union_tag(item)]
    if named and named[-1] in _UNION_HINTS and first.get("type") != "value_error":
        message = _UNION_HINTS[named[-1]]
    return bad_request(f"{param}: {message}" if param else message, param, "invalid_value")


def parse_request(cls: type[RequestT], raw: bytes) -> RequestT:
    """Parse and validate a request body of type ``cls`` (raises :class:`ApiError`)."""
    data = parse_json_object(raw)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_completion_features(req: CompletionRequest) -> None:
    """Refuse parameters this server does not implement instead of silently ignoring them."""
    if req.echo:
        raise unsupported("echo", "echo")
    if req.logprobs:
        raise unsupported("logprobs", "logprobs")
    if req.suffix:
        raise unsupported("suffix", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise unsupported("best_of", "best_of different from n")
    _check_common(req)


def check_chat_features(req: ChatRequest) -> None:
    """Refuse chat parameters this server does not implement."""
    if req.logprobs or req.top_logprobs:
        raise unsupported("logprobs", "logprobs")
    if req.tools:
        raise unsupported("tools", "tool calling")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "structured output")
    _check_common(req)


def _check_common(req: _SamplingFields) -> None:
    if req.presence_penalty or req.frequency_penalty:
        raise unsupported("presence_penalty" if req.presence_penalty else "frequency_penalty", "penalties")
    if req.logit_bias:
        raise unsupported("logit_bias", "logit_bias")


def completion_prompts(prompt: PromptInput) -> list[str | list[int]]:
    """The prompt field as a list of prompts, each text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [[int(p) for p in prompt if isinstance(p, int)]]
    return [p for p in prompt if isinstance(p, str | list)]


def stop_list(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """Messages as the chat template expects them (text content only)."""
    return [{"role": m.role, "content": m.text()} for m in req.messages]


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, *, max_model_len: int, limit: int, param: str
) -> int:
    """How many tokens to generate, or a 400 naming the limit that was exceeded."""
    room = max_model_len - prompt_tokens
    if requested is None:
        return max(1, min(limit, room))
    if requested > limit:
        raise bad_request(
            f"{param}={requested} exceeds this deployment's limit of {limit} (spec.limits.maxTokens)",
            param,
            "max_tokens_exceeded",
        )
    if requested > room:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_tokens} tokens and {param}={requested}",
            param,
            "context_length_exceeded",
        )
    return requested


def check_prompt_tokens(count: int, *, limit: int, max_model_len: int, param: str) -> None:
    """A 400 for an empty prompt or one longer than ``limit`` / the context window."""
    if count == 0:
        raise bad_request(f"{param} is empty", param, "empty_prompt")
    if count > limit:
        raise bad_request(
            f"the prompt has {count} tokens, more than this deployment's limit of {limit} "
            "(spec.limits.maxPromptTokens)",
            param,
            "context_length_exceeded",
        )
    if count >= max_model_len:
        raise bad_request(
            f"the prompt has {count} tokens; this model's maximum context length is {max_model_len}",
            param,
            "context_length_exceeded",
        )


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if any(i < 0 or i >= vocab_size for i in ids):
        raise bad_request(f"{param} contains token ids outside [0, {vocab_size})", param, "invalid_value")


# ---- responses -------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def model_card(model_id: str, created: int) -> Model:
    return Model(id=model_id, created=created, object="model", owned_by="llmray")


def model_list(cards: list[Model]) -> dict[str, Any]:
    return {"object": "list", "data": [dump(card) for card in cards]}


def completion(
    request_id: str,
    created: int,
    model: str,
    texts: list[tuple[str, FinishReason]],
    counts: CompletionUsage,
) -> Completion:
    choices = [
        CompletionChoice(index=i, text=text, finish_reason=reason, logprobs=None)
        for i, (text, reason) in enumerate(texts)
    ]
    return Completion(
        id=request_id, object="text_completion", created=created, model=model, choices=choices, usage=counts
    )


def completion_chunk(
    request_id: str, created: int, model: str, index: int, text: str, finish_reason: FinishReason | None
) -> Completion:
    """One streamed completion event.

    Built with ``model_construct``: mid-stream events carry ``finish_reason: null``, which the wire
    format uses (and the official client accepts) but the non-streaming type declares required.
    """
    choice = CompletionChoice.model_construct(
        index=index, text=text, finish_reason=cast(Any, finish_reason), logprobs=None
    )
    return Completion.model_construct(
        id=request_id, object="text_completion", created=created, model=model, choices=[choice]
    )


def completion_usage_chunk(request_id: str, created: int, model: str, counts: CompletionUsage) -> Completion:
    return Completion.model_construct(
        id=request_id, object="text_completion", created=created, model=model, choices=[], usage=counts
    )


def chat_completion(
    request_id: str,
    created: int,
    model: str,
    texts: list[tuple[str, FinishReason]],
    counts: CompletionUsage,
) -> ChatCompletion:
    choices = [
        chat_types.Choice(
            index=i,
            message=ChatCompletionMessage(role="assistant", content=text),
            finish_reason=reason,
            logprobs=None,
        )
        for i, (text, reason) in enumerate(texts)
    ]
    return ChatCompletion(
        id=request_id, object="chat.completion", created=created, model=model, choices=choices, usage=counts
    )


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    index: int,
    *,
    content: str | None = None,
    role: bool = False,
    finish_reason: FinishReason | None = None,
) -> ChatCompletionChunk:
    delta = chunk_types.ChoiceDelta(**({"role": "assistant"} if role else {}), content=content)
    if content is None and not role:
        delta = chunk_types.ChoiceDelta()
    choice = chunk_types.Choice(index=index, delta=delta, finish_reason=finish_reason, logprobs=None)
    return ChatCompletionChunk(
        id=request_id, object="chat.completion.chunk", created=created, model=model, choices=[choice]
    )


def chat_usage_chunk(
    request_id: str, created: int, model: str, counts: CompletionUsage
) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=request_id, object="chat.completion.chunk", created=created, model=model, choices=[], usage=counts
    )


def dump(obj: BaseModel) -> dict[str, Any]:
    """A response object as JSON-ready data: explicitly set fields only (``None`` kept where set)."""
    return obj.model_dump(mode="json", exclude_unset=True, warnings=False)


# ---- server-sent events ----------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: BaseModel | Mapping[str, Any]) -> bytes:
    """One SSE ``data:`` event (JSON has no raw newlines, so one line is always enough)."""
    data = dump(payload) if isinstance(payload, BaseModel) else dict(payload)
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def sse_error(error: ApiError) -> bytes:
    """An error reported inside a stream that already started (the status line is already sent)."""
    return sse_event(error.body())


# ---- authentication --------------------------------------------------------------------------


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """401 unless ``authorization`` is ``Bearer <api_key>`` (constant-time compare); open if no key."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
            "invalid_request_error",
            None,
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ApiError(
            404,
            f"The model `{requested}` does not exist.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


def overloaded(retry_after_s: int, what: str) -> ApiError:
    """503 with ``Retry-After``: the replica is at capacity; the client should back off and retry."""
    return ApiError(
        503,
        f"The server is overloaded ({what}); retry after {retry_after_s}s.",
        "server_error",
        None,
        "overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )
