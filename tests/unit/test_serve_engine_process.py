"""The transformers engine in its own process (what a Serve replica runs): the same answers, the same
errors, cancellation across the pipe, and a dead child failing requests and health instead of hanging."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmray_workloads.serve.config import EngineSettings
from llmray_workloads.serve.engine import EngineError, EngineOverloadedError, UnknownAdapterError
from llmray_workloads.serve.engine_process import ProcessEngine, _error
from tests.unit.test_serve_engine import adapter_reference, collect, greedy, make_adapter, reference
from tests.waiting import async_wait_for

pytestmark = pytest.mark.unit

TIMEOUT = 60.0
PROMPTS = ["Ray is", "The quick brown fox", "Once upon a time in a small village", "a"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The tiny model here too: the reference HF ``generate`` runs in the test process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_workloads.tiny import build_tiny_model

    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp("engine-process") / "tiny")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


def start(path: Path, **settings: Any) -> ProcessEngine:
    base = {"model_source": str(path), "dtype": "float32", "torch_threads": 1, "batch_wait_timeout_ms": 2}
    max_pending = settings.pop("max_pending", 6)
    return ProcessEngine.load(EngineSettings(**(base | settings)), max_pending=max_pending)


@pytest.fixture(scope="module")
def engine(loaded: tuple[Any, Any, Path]) -> Iterator[ProcessEngine]:
    eng = start(loaded[2], max_num_seqs=4)
    yield eng
    eng.shutdown()


async def idle(engine: ProcessEngine) -> None:
    async def drained() -> bool | None:
        return (engine.stats().get("running") == 0 and not engine._open) or None

    await async_wait_for(drained, timeout=TIMEOUT, what="the engine process to be idle")


async def test_concurrent_requests_match_generate_and_the_child_counts_them(
    engine: ProcessEngine, loaded: tuple[Any, Any, Path]
) -> None:
    """Streamed and non-streamed requests, batched in the child, equal HF ``generate`` of the same model."""
    assert engine.encode("Ray is") == loaded[1]("Ray is")["input_ids"]
    assert (engine.max_model_len, engine.vocab_size) == (512, loaded[0].config.vocab_size)
    engine.counters.drain()
    streams = [engine.submit(engine.encode(p), greedy(12), stream=i % 2 == 0) for i, p in enumerate(PROMPTS)]
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT)
    assert [text for text, _ in results] == [reference(loaded, p, 12) for p in PROMPTS]
    assert all(last.finish_reason == "length" and last.completion_tokens == 12 for _, last in results)
    assert sum(engine.counters.drain().tokens.values()) == 12 * len(PROMPTS)
    await idle(engine)


async def test_cancelled_and_dropped_streams_stop_in_the_child(engine: ProcessEngine) -> None:
    before = engine.stats()["cancelled"]
    kept = engine.submit(engine.encode("go"), greedy(400))
    async for _ in kept:
        break
    kept.cancel()
    dropped = engine.submit(engine.encode("go on"), greedy(400))
    async for _ in dropped:
        break
    del dropped  # a client that went away: the stream's finalizer cancels it
    gc.collect()
    await idle(engine)
    assert engine.stats()["running"] == 0 and engine.stats()["cancelled"] >= before
    text, last = await asyncio.wait_for(collect(engine.submit(engine.encode("after"), greedy(3))), TIMEOUT)
    assert last.completion_tokens == 3 and isinstance(text, str)


async def test_overload_and_bad_requests_are_refused_at_submit(engine: ProcessEngine) -> None:
    held = [engine.submit(engine.encode("hold"), greedy(400)) for _ in range(engine.max_pending)]
    with pytest.raises(EngineOverloadedError):
        engine.submit(engine.encode("one too many"), greedy(4))
    for stream in held:
        stream.cancel()
    with pytest.raises(EngineError, match="empty prompt"):
        engine.submit([], greedy(4))
    with pytest.raises(UnknownAdapterError):
        engine.submit(engine.encode("x"), greedy(4, adapter="nobody"))
    await idle(engine)


async def test_adapters_are_loaded_and_removed_in_the_child(
    engine: ProcessEngine, loaded: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    _, tokenizer, base_path = loaded
    a = make_adapter(base_path, tmp_path / "a", 1)
    errors = await asyncio.to_thread(engine.set_adapters, {"a": str(a), "gone": str(tmp_path / "nowhere")})
    assert set(errors) == {"gone"} and engine.adapters() == ["a"]
    text, _ = await asyncio.wait_for(
        collect(engine.submit(engine.encode("Ray is"), greedy(8, adapter="a"))), TIMEOUT
    )
    assert text == adapter_reference(base_path, tokenizer, a, "Ray is", 8)
    assert await asyncio.to_thread(engine.set_adapters, {}) == {}
    assert engine.adapters() == []
    with pytest.raises(UnknownAdapterError):
        engine.submit(engine.encode("Ray is"), greedy(4, adapter="a"))


def test_failed_calls_keep_their_kind() -> None:
    """A ValueError in the child (bad input: the API's 400) stays one; anything else is an EngineError."""
    assert type(_error("value", "no chat template")) is ValueError
    assert type(_error("engine", "boom")) is EngineError


async def test_a_dead_engine_process_fails_open_requests_and_health(loaded: tuple[Any, Any, Path]) -> None:
    eng = start(loaded[2], max_num_seqs=2)
    try:
        eng.check_health()
        running = eng.submit(eng.encode("go"), greedy(400))
        async for _ in running:
            break
        os.kill(eng._process.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="engine process"):
            await asyncio.wait_for(collect(running), TIMEOUT)
        with pytest.raises(EngineError, match="engine process"):
            eng.check_health()
        with pytest.raises(EngineError):
            eng.submit([1, 2], greedy(2))
    finally:
        eng.shutdown()


def test_removed_or_changed_adapters_are_unlisted_before_the_child_is_asked() -> None:
    """While the child loads (minutes, for downloads), requests for an adapter being removed or
    replaced already get the 404, never a request the child then refuses mid-stream."""
    eng = object.__new__(ProcessEngine)
    eng._listed, eng._sources = ["a", "b", "c"], {"a": "s3://a", "b": "s3://b", "c": "s3://c"}
    seen: list[list[str]] = []

    def call(name: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(list(eng._listed))
        return {} if name == "set_adapters" else ["a", "d"]

    eng._call = call  # type: ignore[method-assign]
    assert eng.set_adapters({"a": "s3://a", "c": "s3://c2", "d": "s3://d"}) == {}
    assert seen[0] == ["a"]  # b removed, c replaced: unlisted during the load
    assert eng.adapters() == ["a", "d"] and eng._sources == {"a": "s3://a", "d": "s3://d"}
