"""OpenAI wire protocol: strict request validation, error shape, response types, SSE framing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmray_workloads.serve import protocol as p

pytestmark = pytest.mark.unit


def raw(**fields: Any) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def error_of(cls: type[p._Request], body: bytes) -> p.ApiError:
    with pytest.raises(p.ApiError) as info:
        p.parse_request(cls, body)
    return info.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (raw(prompt="x", max_tokens="5"), "max_tokens"),
        (raw(prompt="x", max_tokens=1.5), "max_tokens"),
        (raw(prompt="x", max_tokens=0), "max_tokens"),
        (raw(prompt="x", temperature=True), "temperature"),
        (raw(prompt="x", temperature=2.5), "temperature"),
        (raw(prompt="x", top_p=0), "top_p"),
        (raw(prompt="x", n=0), "n"),
        (raw(prompt="x", n=p.MAX_CHOICES + 1), "n"),
        (raw(prompt="x", seed=1.5), "seed"),
        (raw(prompt="x", stream=1), "stream"),
        (raw(prompt="x", stop=["a"] * 5), "stop"),
        (raw(prompt="x", stop=[""]), "stop"),
        (raw(prompt="x", stop=3), "stop"),
        (raw(prompt="x", stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
        (raw(prompt=5), "prompt"),
        (raw(prompt=["a", 1]), "prompt"),
        (raw(prompt=[]), "prompt"),
        (raw(prompt=[[]]), "prompt"),
        (raw(), "prompt"),
        (json.dumps({"prompt": "x"}).encode(), "model"),
        (raw(model="", prompt="x"), "model"),
    ],
)
def test_completion_request_errors_name_the_param(body: bytes, param: str) -> None:
    error = error_of(p.CompletionRequest, body)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert error.message.startswith(param)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "user"}, 5], "messages[1]"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 7}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
        ([{"content": "x"}], "messages[0].role"),
    ],
)
def test_chat_request_errors_name_the_param(messages: Any, param: str) -> None:
    error = error_of(p.ChatRequest, raw(messages=messages))
    assert (error.status, error.param) == (400, param)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"{",
        b"[1]",
        b'"x"',
        b"null",
        b"\xff\xfe",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b"[" * 100_000,
    ],
)
def test_bodies_that_are_not_json_objects(body: bytes) -> None:
    error = error_of(p.CompletionRequest, body)
    assert (error.status, error.code) == (400, "invalid_json")


def test_valid_requests_parse() -> None:
    req = p.parse_request(p.CompletionRequest, raw(prompt=[[1, 2], [3]], temperature=1, n=2, extra_field=1))
    assert p.completion_prompts(req.prompt) == [[1, 2], [3]]
    assert req.temperature == 1.0
    chat = p.parse_request(
        p.ChatRequest,
        raw(
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]
        ),
    )
    assert p.chat_messages(chat) == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompts(prompt: p.PromptInput, prompts: list[Any]) -> None:
    assert p.completion_prompts(prompt) == prompts


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
    ],
)
def test_unimplemented_features_are_refused_not_ignored(fields: dict[str, Any], param: str) -> None:
    req = p.parse_request(p.CompletionRequest, raw(prompt="x", **fields))
    with pytest.raises(p.ApiError) as info:
        p.check_completion_features(req)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "unsupported_parameter")


def test_neutral_values_of_unimplemented_features_are_fine() -> None:
    req = p.parse_request(p.CompletionRequest, raw(prompt="x", echo=False, presence_penalty=0, best_of=1))
    p.check_completion_features(req)
    chat = p.parse_request(
        p.ChatRequest, raw(messages=[{"role": "user", "content": "x"}], response_format={"type": "text"})
    )
    p.check_chat_features(chat)


def test_max_tokens_resolution() -> None:
    assert p.resolve_max_tokens(None, 10, max_model_len=100, limit=50, param="max_tokens") == 50
    assert p.resolve_max_tokens(None, 80, max_model_len=100, limit=50, param="max_tokens") == 20
    assert p.resolve_max_tokens(7, 10, max_model_len=100, limit=50, param="max_tokens") == 7
    with pytest.raises(p.ApiError, match="maxTokens") as over:
        p.resolve_max_tokens(51, 10, max_model_len=100, limit=50, param="max_tokens")
    assert over.value.code == "max_tokens_exceeded"
    with pytest.raises(p.ApiError, match="maximum context length is 100") as ctx:
        p.resolve_max_tokens(30, 80, max_model_len=100, limit=50, param="max_completion_tokens")
    assert (ctx.value.code, ctx.value.param) == ("context_length_exceeded", "max_completion_tokens")


def test_prompt_token_checks() -> None:
    p.check_prompt_tokens(10, limit=10, max_model_len=100, param="prompt")
    for count, match in [(0, "empty"), (11, "limit of 10"), (100, "maximum context length")]:
        with pytest.raises(p.ApiError, match=match):
            p.check_prompt_tokens(
                count, limit=10 if count != 100 else 1000, max_model_len=100, param="prompt"
            )
    with pytest.raises(p.ApiError, match="outside"):
        p.check_token_ids([0, 5, 9], vocab_size=9, param="prompt")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer wrong", "Basic secret", "secret", "Bearer secretx"]
)
def test_api_key_rejections(header: str | None) -> None:
    with pytest.raises(p.ApiError) as info:
        p.check_api_key(header, "secret")
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")
    assert info.value.headers == {"WWW-Authenticate": "Bearer"}


def test_api_key_accepts_bearer_and_open_endpoint() -> None:
    p.check_api_key("Bearer secret", "secret")
    p.check_api_key("bearer  secret ", "secret")
    p.check_api_key(None, None)


def test_error_body_shape() -> None:
    body = p.overloaded(2, "busy").body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert p.overloaded(2, "busy").headers == {"Retry-After": "2"}
    p.check_model("m", "m")
    with pytest.raises(p.ApiError) as info:
        p.check_model("x", "m")
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")


def test_responses_parse_back_as_openai_types() -> None:
    counts = p.usage(3, 4)
    assert counts.total_tokens == 7
    completion = p.completion("cmpl-1", 1, "m", [("hi", "stop"), ("yo", "length")], counts)
    parsed = Completion.model_validate(p.dump(completion))
    assert [c.text for c in parsed.choices] == ["hi", "yo"]
    assert p.dump(completion)["choices"][0]["logprobs"] is None
    chat = ChatCompletion.model_validate(p.dump(p.chat_completion("c-1", 1, "m", [("hey", "stop")], counts)))
    assert chat.choices[0].message.content == "hey"
    assert p.model_list([p.model_card("m", 5)]) == {
        "object": "list",
        "data": [{"id": "m", "created": 5, "object": "model", "owned_by": "llmray"}],
    }


def test_stream_chunks() -> None:
    first = p.dump(p.chat_chunk("c", 1, "m", 0, content="", role=True))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = p.dump(p.chat_chunk("c", 1, "m", 0, finish_reason="stop"))
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    ChatCompletionChunk.model_validate(last)
    middle = p.dump(p.completion_chunk("c", 1, "m", 2, "tok", None))
    assert middle["choices"] == [{"index": 2, "text": "tok", "finish_reason": None, "logprobs": None}]
    assert "usage" not in middle
    usage = p.dump(p.chat_usage_chunk("c", 1, "m", p.usage(1, 2)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_sse_framing() -> None:
    event = p.sse_event({"text": "line1\nline2", "emoji": "é"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert event.count(b"\n") == 2  # newlines inside JSON strings are escaped
    assert json.loads(event[len(b"data: ") :]) == {"text": "line1\nline2", "emoji": "é"}
    assert p.SSE_DONE == b"data: [DONE]\n\n"
    error = json.loads(p.sse_error(p.bad_request("nope"))[len(b"data: ") :])
    assert error["error"]["message"] == "nope"
