"""The continuous-batching transformers engine on the tiny model (CPU, in-process)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmray_workloads.serve.engine import (
    EngineError,
    EngineOverloadedError,
    GenerationChunk,
    SamplingParams,
    TransformersEngine,
    left_pad,
    plan_prefill,
)

pytestmark = pytest.mark.unit


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids == [[5, 6, 7], [0, 0, 8]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize(
    ("remaining", "budget", "counts"),
    [
        ([10, 10, 10], 100, [10, 10, 10]),
        ([10, 10, 10], 20, [10, 10]),
        ([5, 50, 5], 60, [5, 5, 5]),  # width follows the oldest prompt; longer ones take a chunk
        ([200, 3], 100, [100]),  # a long prompt is chunked; nothing else fits beside it
        ([], 100, []),
    ],
)
def test_plan_prefill(remaining: list[int], budget: int, counts: list[int]) -> None:
    assert plan_prefill(remaining, budget) == counts


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_workloads.tiny import build_tiny_model

    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp("engine") / "tiny")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


@pytest.fixture
def engine(loaded: tuple[Any, Any, Path]) -> Iterator[TransformersEngine]:
    model, tokenizer, _ = loaded
    eng = TransformersEngine(model, tokenizer, max_num_seqs=8, batch_wait_s=0.002)
    yield eng
    eng.shutdown()


async def collect(stream: AsyncIterator[GenerationChunk] | Any) -> tuple[str, GenerationChunk]:
    text, last = "", None
    async for chunk in stream:
        text, last = text + chunk.text, chunk
    assert last is not None
    return text, last


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def reference(loaded: tuple[Any, Any, Path], prompt: str, n: int) -> str:
    model, tokenizer, _ = loaded
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


async def test_staggered_concurrent_requests_match_sequential_generate(
    engine: TransformersEngine, loaded: tuple[Any, Any, Path]
) -> None:
    """Sequences joining a running batch (different lengths, different times) decode exactly as alone."""
    prompts = ["hello world", "The river does not hurry, yet everything", "a", "once upon a time there"]

    async def run(i: int, prompt: str) -> str:
        await asyncio.sleep(0.01 * i)
        text, last = await collect(engine.submit(engine.encode(prompt), greedy(10 + 3 * i)))
        assert (last.finish_reason, last.completion_tokens) == ("length", 10 + 3 * i)
        return text

    results = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
    assert results == [reference(loaded, p, 10 + 3 * i) for i, p in enumerate(prompts)]


async def test_seeded_sampling_is_reproducible_across_batches(engine: TransformersEngine) -> None:
    ids = engine.encode("seeded")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
    alone, _ = await collect(engine.submit(ids, params))
    crowd = [engine.submit(engine.encode(f"noise {i}"), SamplingParams(max_tokens=12)) for i in range(3)]
    together = await asyncio.gather(collect(engine.submit(ids, params)), *(collect(s) for s in crowd))
    assert together[0][0] == alone


async def test_non_streaming_sequences_arrive_as_one_chunk(engine: TransformersEngine) -> None:
    ids = engine.encode("quiet")
    streamed, _ = await collect(engine.submit(ids, greedy(9)))
    chunks = [chunk async for chunk in engine.submit(ids, greedy(9), stream=False)]
    assert len(chunks) == 1
    assert (chunks[0].text, chunks[0].finish_reason, chunks[0].completion_tokens) == (streamed, "length", 9)


async def test_stop_string_ends_generation(engine: TransformersEngine) -> None:
    ids = engine.encode("abc")
    full, _ = await collect(engine.submit(ids, greedy(20)))
    stop = full[4:7]
    text, last = await collect(engine.submit(ids, greedy(20, stop=(stop,))))
    assert last.finish_reason == "stop"
    assert text == full[: full.index(stop)]


async def test_context_window_ends_with_length(loaded: tuple[Any, Any, Path]) -> None:
    model, tokenizer, _ = loaded
    eng = TransformersEngine(model, tokenizer, max_model_len=12)
    try:
        ids = eng.encode("one two three")
        _, last = await collect(eng.submit(ids, greedy(100)))
        assert last.finish_reason == "length"
        assert last.completion_tokens == 12 - len(ids)
    finally:
        eng.shutdown()


async def test_cancel_frees_the_row(engine: TransformersEngine) -> None:
    stream = engine.submit(engine.encode("go"), greedy(400))
    async for _ in stream:
        break
    stream.cancel()
    for _ in range(200):
        if engine.stats()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats() == {"running": 0, "waiting": 0, "cancelled": 1}
    text, _ = await collect(engine.submit(engine.encode("after"), greedy(3)))
    assert isinstance(text, str)


async def test_pending_is_bounded(loaded: tuple[Any, Any, Path]) -> None:
    model, tokenizer, _ = loaded
    eng = TransformersEngine(model, tokenizer, max_num_seqs=1, max_pending=2)
    try:
        streams = [eng.submit([1, 2], greedy(50)) for _ in range(2)]
        with pytest.raises(EngineOverloadedError):
            eng.submit([1, 2], greedy(5))
        for stream in streams:
            stream.cancel()
    finally:
        eng.shutdown()


class _FailOnce:
    """Model proxy whose next forward raises (e.g. CUDA OOM) once."""

    def __init__(self, model: Any) -> None:
        self._model, self.fail = model, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            self.fail = False
            raise RuntimeError("simulated device failure")
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


async def test_a_failing_forward_fails_the_request_not_the_engine(engine: TransformersEngine) -> None:
    engine.model = _FailOnce(engine.model)
    with pytest.raises(EngineError, match="simulated device failure"):
        await collect(engine.submit(engine.encode("boom"), greedy(5)))
    engine.check_health()
    _, last = await collect(engine.submit(engine.encode("fine"), greedy(5)))
    assert last.completion_tokens == 5


async def test_chat_template_is_applied(engine: TransformersEngine) -> None:
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    rendered = engine.tokenizer.decode(ids)
    assert rendered.startswith("<s><|user|>\nhi</s>") and rendered.endswith("<|assistant|>\n")


async def test_chunks_that_piled_up_are_merged(engine: TransformersEngine) -> None:
    """A consumer that falls behind gets fewer, larger chunks with the same text and counts."""
    ids = engine.encode("lagging")
    expected, _ = await collect(engine.submit(ids, greedy(20)))
    stream = engine.submit(ids, greedy(20))
    for _ in range(200):  # let the engine finish before reading anything
        if engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0:
            break
        await asyncio.sleep(0.01)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 1
    assert (chunks[0].text, chunks[0].finish_reason, chunks[0].completion_tokens) == (expected, "length", 20)
