"""The continuous-batching transformers engine on the tiny model (CPU, in-process)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
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
    plan_prefill,
    resolve_max_model_len,
)
from tests.waiting import async_wait_for

pytestmark = pytest.mark.unit


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


# ---- cache layout and chunked prefill ------------------------------------------------------------


class _Recorder:
    """Model proxy that records each forward's input shape and can raise on demand."""

    def __init__(self, model: Any, fail: Any = None) -> None:
        self._model, self.fail, self.shapes = model, fail, []
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.shapes.append(tuple(kwargs["input_ids"].shape))
        if self.fail is not None and self.fail(kwargs, self.calls):
            raise RuntimeError("simulated device failure")
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


LONG_PROMPT = " ".join(["the river does not hurry yet everything is accomplished"] * 8)
TIMEOUT = 60


async def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    loaded: tuple[Any, Any, Path],
) -> None:
    """A long prompt never takes more than one chunk per pass; running streams decode in between."""
    model, tokenizer, _ = loaded
    eng = TransformersEngine(model, tokenizer, max_num_seqs=8, batch_wait_s=0.0, prefill_chunk_tokens=16)
    recorder = _Recorder(model)
    eng.model = recorder
    try:
        short = eng.submit(eng.encode("hello world"), greedy(40))
        first = await asyncio.wait_for(short.__anext__(), TIMEOUT)
        ids = eng.encode(LONG_PROMPT)
        assert len(ids) > 48
        long_text, _ = await asyncio.wait_for(collect(eng.submit(ids, greedy(8))), TIMEOUT)
        short_text, _ = await asyncio.wait_for(collect(short), TIMEOUT)
    finally:
        eng.shutdown()
    assert long_text == reference(loaded, LONG_PROMPT, 8)
    assert first.text + short_text == reference(loaded, "hello world", 40)
    assert max(b * t for b, t in recorder.shapes) <= 16
    chunks = [i for i, (_, t) in enumerate(recorder.shapes) if t > 1]
    assert len(chunks) >= len(ids) // 16
    between = [recorder.shapes[a + 1 : b] for a, b in itertools.pairwise(chunks[1:])]
    assert all(any(t == 1 for _, t in gap) for gap in between), "decode steps run between chunks"


async def test_admitting_and_finishing_do_not_copy_the_cache(engine: TransformersEngine) -> None:
    long = engine.submit(engine.encode("a long one"), greedy(150))
    await asyncio.wait_for(long.__anext__(), TIMEOUT)
    keys = engine._cache.layers[0].keys
    before = keys.data_ptr()
    for prompt in ("short one", "short two", "three"):
        await asyncio.wait_for(collect(engine.submit(engine.encode(prompt), greedy(5))), TIMEOUT)

    async def only_the_long_one() -> bool:
        return engine.stats()["running"] == 1

    await async_wait_for(only_the_long_one, timeout=TIMEOUT, what="the short ones evicted", interval=0.005)
    assert engine._cache.layers[0].keys.data_ptr() == before
    long.cancel()


# ---- failure isolation ---------------------------------------------------------------------------

POISON = 1000  # a token id the test prompts never contain


def _poisoned_prefill(kwargs: dict[str, Any], _: int) -> bool:
    ids = kwargs["input_ids"]
    return bool(ids.shape[1] > 1 and (ids == POISON).any())


async def test_a_failing_join_fails_only_the_joining_sequence(
    engine: TransformersEngine, loaded: tuple[Any, Any, Path]
) -> None:
    """A prompt whose prefill fails, prefilled together with another while a batch runs."""
    engine.model = _Recorder(engine.model, _poisoned_prefill)
    running = engine.submit(engine.encode("once upon a time there"), greedy(30))
    first = await asyncio.wait_for(running.__anext__(), TIMEOUT)
    poison = engine.submit([*engine.encode("bad"), POISON], greedy(5))
    joiner = engine.submit(engine.encode("hello world"), greedy(12))
    with pytest.raises(EngineError, match="simulated device failure"):
        await asyncio.wait_for(collect(poison), TIMEOUT)
    joined, _ = await asyncio.wait_for(collect(joiner), TIMEOUT)
    rest, _ = await asyncio.wait_for(collect(running), TIMEOUT)
    assert joined == reference(loaded, "hello world", 12)
    assert first.text + rest == reference(loaded, "once upon a time there", 30)
    engine.check_health()


async def test_a_failing_decode_row_fails_only_its_sequence(
    engine: TransformersEngine, loaded: tuple[Any, Any, Path]
) -> None:
    """A decode step that raises whenever one sequence (the only one at position P) is in it."""
    long_ids = engine.encode(LONG_PROMPT)
    poison_at = len(long_ids) + 3

    def fail(kwargs: dict[str, Any], _: int) -> bool:
        return bool(kwargs["input_ids"].shape[1] == 1 and (kwargs["position_ids"] == poison_at).any())

    engine.model = _Recorder(engine.model, fail)
    prompts = ["hello world", "a", "once upon a time there"]
    doomed = engine.submit(long_ids, greedy(20))
    others = [engine.submit(engine.encode(p), greedy(15)) for p in prompts]
    with pytest.raises(EngineError, match="simulated device failure"):
        await asyncio.wait_for(collect(doomed), TIMEOUT)
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in others)), TIMEOUT)
    assert [text for text, _ in results] == [reference(loaded, p, 15) for p in prompts]
    engine.check_health()


async def test_a_transient_step_failure_is_retried_and_fails_nobody(
    engine: TransformersEngine, loaded: tuple[Any, Any, Path]
) -> None:
    def once(kwargs: dict[str, Any], calls: int) -> bool:
        return calls == 6

    recorder = _Recorder(engine.model, once)
    engine.model = recorder
    prompts = ["hello world", "a", "once upon a time there", "abc"]
    streams = [engine.submit(engine.encode(p), greedy(10)) for p in prompts]
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT)
    assert [text for text, _ in results] == [reference(loaded, p, 10) for p in prompts]
    assert recorder.calls > 6


async def test_sticky_failures_fail_every_request_and_then_health(engine: TransformersEngine) -> None:
    """Every forward raises (a lost device): no request hangs, and the replica reports unhealthy."""
    recorder = _Recorder(engine.model, lambda kwargs, calls: True)
    engine.model = recorder
    for round_ in range(engine.max_failed_steps):
        streams = [engine.submit(engine.encode(f"try {round_} {i}"), greedy(5)) for i in range(3)]
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(collect(s) for s in streams), return_exceptions=True), TIMEOUT
        )
        assert all(isinstance(o, EngineError) for o in outcomes)
    with pytest.raises(EngineError, match="steps all failed"):
        engine.check_health()
    recorder.fail = None  # the device came back: a success makes the replica healthy again
    _, last = await asyncio.wait_for(collect(engine.submit(engine.encode("fine"), greedy(3))), TIMEOUT)
    assert last.completion_tokens == 3
    engine.check_health()


async def test_an_engine_bug_outside_the_model_fails_requests_not_hangs(engine: TransformersEngine) -> None:
    original = engine._accept
    calls = {"n": 0}

    def broken(seqs: Any, tokens: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("bug")
        original(seqs, tokens)

    engine._accept = broken  # type: ignore[method-assign]
    streams = [engine.submit(engine.encode(f"bug {i}"), greedy(8)) for i in range(3)]
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(collect(s) for s in streams), return_exceptions=True), TIMEOUT
    )
    assert all(isinstance(o, EngineError | tuple) for o in outcomes)
    assert any(isinstance(o, EngineError) for o in outcomes)
    _, last = await asyncio.wait_for(collect(engine.submit(engine.encode("after"), greedy(3))), TIMEOUT)
    assert last.completion_tokens == 3


async def test_shutdown_resolves_every_waiting_request(loaded: tuple[Any, Any, Path]) -> None:
    model, tokenizer, _ = loaded
    eng = TransformersEngine(model, tokenizer, max_num_seqs=1, batch_wait_s=0.0)
    streams = [eng.submit(eng.encode(f"wait {i}"), greedy(300)) for i in range(4)]
    await asyncio.wait_for(streams[0].__anext__(), TIMEOUT)
    await asyncio.to_thread(eng.shutdown)
    for stream in streams:
        with pytest.raises(EngineError, match="shutting down"):
            await asyncio.wait_for(collect(stream), TIMEOUT)
    with pytest.raises(EngineError):
        eng.submit([1, 2], greedy(1))


def test_max_model_len_above_the_model_limit_is_refused(loaded: tuple[Any, Any, Path]) -> None:
    model, tokenizer, _ = loaded
    limit = model.config.max_position_embeddings
    with pytest.raises(
        EngineError, match=f"maxModelLen {limit + 1} exceeds .*max_position_embeddings \\({limit}\\)"
    ):
        TransformersEngine(model, tokenizer, max_model_len=limit + 1)
    assert resolve_max_model_len(None, model.config) == limit
    assert resolve_max_model_len(limit // 2, model.config) == limit // 2


async def test_short_prompts_are_not_queued_behind_a_long_prompts_chunks(
    loaded: tuple[Any, Any, Path],
) -> None:
    model, tokenizer, _ = loaded
    eng = TransformersEngine(model, tokenizer, max_num_seqs=8, batch_wait_s=0.0, prefill_chunk_tokens=16)
    finished: list[str] = []

    async def run(name: str, ids: list[int]) -> str:
        text, _ = await collect(eng.submit(ids, greedy(2)))
        finished.append(name)
        return text

    try:
        long_ids, short_ids = eng.encode(LONG_PROMPT), eng.encode("hello world")
        texts = await asyncio.wait_for(
            asyncio.gather(run("long", long_ids), run("short", short_ids)), TIMEOUT
        )
    finally:
        eng.shutdown()
    assert finished == ["short", "long"]
    assert texts == [reference(loaded, LONG_PROMPT, 2), reference(loaded, "hello world", 2)]


async def test_sliding_window_model_matches_generate(loaded: tuple[Any, Any, Path]) -> None:
    """All-sliding-window attention (Mistral-style): the engine's masks apply the window like HF's."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer, _ = loaded
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MistralForCausalLM(config).eval()
    eng = TransformersEngine(model, tokenizer, max_num_seqs=4, batch_wait_s=0.0, prefill_chunk_tokens=8)
    prompts = ["once upon a time there was a river", "hello world"]
    try:
        streams = [eng.submit(eng.encode(p), greedy(12)) for p in prompts]
        texts = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT)
    finally:
        eng.shutdown()
    assert [t for t, _ in texts] == [reference((model, tokenizer, Path()), p, 12) for p in prompts]


async def test_a_lora_adapter_folder_is_served_merged_into_its_base(
    loaded: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    """A LoRA job's output (an adapter, not merged on export) loads as base + adapter, folded once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmray_workloads.serve.config import EngineSettings
    from llmray_workloads.serve.engine import adapter_base

    _, tokenizer, base_path = loaded
    base = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero adapter, so serving the bare base would answer differently
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # no tokenizer: the engine falls back to the base's
    merged = peft_model.merge_and_unload().eval()
    assert adapter_base(str(adapter)) == str(base_path) and adapter_base(str(base_path)) is None

    eng = TransformersEngine.load(EngineSettings(model_source=str(adapter), dtype="float32"))
    try:
        text, _ = await asyncio.wait_for(
            collect(eng.submit(tokenizer("Ray is")["input_ids"], greedy(8))), TIMEOUT
        )
    finally:
        eng.shutdown()
    assert text == reference((merged, tokenizer, base_path), "Ray is", 8)
    assert text != reference(loaded, "Ray is", 8)


def make_adapter(base_path: Path, out: Path, seed: int, rank: int = 4) -> Path:
    from llmray_workloads.tiny import build_tiny_adapter

    return build_tiny_adapter(base_path, out, seed=seed, rank=rank)


def adapter_reference(base_path: Path, tokenizer: Any, adapter: Path, prompt: str, n: int) -> str:
    """HF ``generate`` of a fresh peft model with ``adapter`` active."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


async def test_mixed_adapter_batch_matches_each_adapters_generate(
    loaded: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    """Sequences of two adapters and of the base, in one batch, each equal HF generate of its model."""
    from transformers import AutoModelForCausalLM

    _, tokenizer, base_path = loaded
    paths = {name: make_adapter(base_path, tmp_path / name, seed) for name, seed in [("a", 1), ("b", 2)]}
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    eng = TransformersEngine(model, tokenizer, max_num_seqs=8, batch_wait_s=0.05)
    prompts = [("Ray is", "a"), ("once upon a time", "b"), ("Ray is", None), ("hello", "a"), ("hello", "b")]
    try:
        assert eng.set_adapters({k: str(v) for k, v in paths.items()}) == {}
        assert eng.adapters() == ["a", "b"]
        streams = [eng.submit(eng.encode(text), greedy(10, adapter=name)) for text, name in prompts]
        assert eng.stats()["waiting"] + eng.stats()["running"] == len(prompts)  # submitted as one burst
        texts = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT)
    finally:
        eng.shutdown()
    want = [
        adapter_reference(base_path, tokenizer, paths[name], text, 10)
        if name
        else reference(loaded, text, 10)
        for text, name in prompts
    ]
    assert [t for t, _ in texts] == want
    assert want[0] != want[2]  # the adapter changes the answer, so the check means something


async def test_adapters_are_added_and_removed_live(loaded: tuple[Any, Any, Path], tmp_path: Path) -> None:
    """Removing an adapter unlists it at once (UnknownAdapterError) but lets its running stream
    finish; a broken or too-large adapter is reported and does not stop the others."""
    from transformers import AutoModelForCausalLM

    from llmray_workloads.serve.engine import UnknownAdapterError

    _, tokenizer, base_path = loaded
    a = make_adapter(base_path, tmp_path / "a", 1)
    wide = make_adapter(base_path, tmp_path / "wide", 3, rank=32)
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    eng = TransformersEngine(model, tokenizer, max_num_seqs=4, batch_wait_s=0.0, max_lora_rank=16)
    try:
        errors = eng.set_adapters({"a": str(a), "gone": str(tmp_path / "nowhere"), "wide": str(wide)})
        assert set(errors) == {"gone", "wide"} and "maxLoraRank" in errors["wide"]
        assert eng.adapters() == ["a"]
        running = eng.submit(eng.encode("Ray is"), greedy(40, adapter="a"))
        eng.set_adapters({})
        assert eng.adapters() == []
        with pytest.raises(UnknownAdapterError):
            eng.submit(eng.encode("Ray is"), greedy(4, adapter="a"))
        _, last = await asyncio.wait_for(collect(running), TIMEOUT)
        assert last.completion_tokens == 40

        async def unloaded() -> bool | None:
            return eng._peft is None or None

        await async_wait_for(unloaded, timeout=TIMEOUT, what="the removed adapter to be freed")
        base_text, _ = await asyncio.wait_for(collect(eng.submit(eng.encode("Ray is"), greedy(8))), TIMEOUT)
    finally:
        eng.shutdown()
    assert base_text == reference(loaded, "Ray is", 8)


async def test_engine_counts_first_tokens_decode_steps_and_tokens(engine: TransformersEngine) -> None:
    engine.counters.drain()
    await asyncio.gather(*(collect(engine.submit(engine.encode(p), greedy(5))) for p in ("a b", "c d e")))
    sample = engine.counters.drain()
    assert len(sample.ttft) == 2 and all(a is None and 0 < t < 30 for a, t in sample.ttft)
    assert sample.tokens == Counter({None: 10})  # 1 from each prefill + 4 decode steps x 2 sequences
    assert len(sample.itl) >= 3 and all(
        a is None and t > 0 for a, t in sample.itl
    )  # one per decode step after the first
    assert engine.current_load()[:2] == (0, 0)
