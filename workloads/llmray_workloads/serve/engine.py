"""Generation engines behind the OpenAI API: a protocol plus a continuous-batching transformers engine.

The transformers engine runs one background thread that owns the model. Each iteration it admits
waiting sequences (prefilled together, left-padded), merges their KV cache into the running batch
and advances every running sequence by one token. Sequences join and leave between any two decode
steps, so a short request never waits for a long one, and concurrency turns into batch size
instead of queueing. Requests talk to the thread through a condition-guarded deque (in) and their
own asyncio queue (out); cancelling a stream frees its batch row at the next step.

Memory per replica is bounded: at most ``max_num_seqs`` sequences run and at most ``max_pending``
sequences exist at all; beyond that :class:`EngineOverloadedError` is raised (HTTP 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .text import IncrementalText

if TYPE_CHECKING:
    import torch

    from .config import EngineSettings

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
PREFILL_TOKEN_BUDGET = 16_384
"""Most prompt tokens (padded) prefilled in one forward pass; bigger admissions are split."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation parameters (already validated and clamped by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationChunk:
    """New text of one sequence; the last chunk carries ``finish_reason``."""

    text: str
    finish_reason: FinishReason | None
    completion_tokens: int


class EngineError(RuntimeError):
    """Generation failed inside the engine (the request fails; the replica keeps serving)."""


class EngineOverloadedError(EngineError):
    """Too many sequences pending on this replica; the client should retry later."""


class GenerationStream(Protocol):
    """Chunks of one sequence; ``cancel()`` frees its slot (idempotent, safe after the end)."""

    def __aiter__(self) -> AsyncIterator[GenerationChunk]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    """What the HTTP layer needs from an engine."""

    max_model_len: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, stream: bool = True
    ) -> GenerationStream: ...

    def check_health(self) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def shutdown(self) -> None: ...


_ids = itertools.count()
_Queue = asyncio.Queue[GenerationChunk | BaseException]


@dataclass(eq=False)
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    text: IncrementalText
    push: Callable[[GenerationChunk | BaseException], None]
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))
    gap: float = float("inf")
    """Seconds since the previous submission on this engine (burst detection)."""
    stream: bool = True
    """False: deliver one chunk with all the text at the end (far fewer event-loop wakeups)."""
    pending: str = ""
    generated: int = 0
    last_token: int = -1
    finished: bool = False
    cancelled: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + self.generated


class _Stream:
    """Async iterator over one sequence's chunks, fed from the engine thread.

    Chunks that piled up while the consumer was busy (a slow client, a loaded proxy) are merged
    into one, so a lagging stream sends fewer, larger events instead of falling further behind.
    """

    def __init__(self, seq: _Sequence, queue: _Queue, wake: Callable[[], None]) -> None:
        self._seq, self._queue, self._wake = seq, queue, wake
        self._done = False
        self._held: BaseException | None = None

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        item = self._held or await self._queue.get()
        self._held = None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        while item.finish_reason is None and not self._queue.empty():
            more = self._queue.get_nowait()
            if isinstance(more, BaseException):
                self._held = more  # deliver what we have first, then the error
                break
            item = GenerationChunk(item.text + more.text, more.finish_reason, more.completion_tokens)
        if item.finish_reason is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        if not self._seq.finished and not self._seq.cancelled:
            self._seq.cancelled = True
            self._wake()

    def __del__(self) -> None:
        self._seq.cancelled = True


def _threadsafe_push(
    loop: asyncio.AbstractEventLoop, queue: _Queue, seq_ref: list[_Sequence]
) -> Callable[[GenerationChunk | BaseException], None]:
    def push(item: GenerationChunk | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            seq_ref[0].cancelled = True

    return push


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad token rows to one length; return (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return ids, mask


def prefill_chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Split admissions (by index) into groups whose padded size ``n * max_len`` fits ``budget``."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in enumerate(lengths):
        wider = max(longest, length)
        if current and wider * (len(current) + 1) > budget:
            groups.append(current)
            current, wider = [], length
        current.append(index)
        longest = wider
    if current:
        groups.append(current)
    return groups


class TransformersEngine:
    """Continuous batching over a Hugging Face causal LM with a left-padded dynamic KV cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        decode_tokenizer: Any | None = None,
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        batch_wait_s: float = 0.01,
        max_pending: int | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self._decoder = decode_tokenizer or tokenizer
        self.device = next(model.parameters()).device
        config = model.config
        self.max_model_len = int(max_model_len or getattr(config, "max_position_embeddings", None) or 2048)
        self.vocab_size = int(config.vocab_size)
        self.max_num_seqs = max_num_seqs
        self.batch_wait_s = batch_wait_s
        self.max_pending = max_pending or 4 * max_num_seqs
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._can_merge = True
        self._last_arrival = 0.0
        self._stopping = False
        self._cancelled_total = 0
        self._thread = threading.Thread(target=self._loop, name="llmray-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, settings: EngineSettings, max_pending: int | None = None) -> TransformersEngine:
        """Load model and tokenizer from ``settings.model_source`` onto the configured device."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if settings.torch_threads and settings.device == "cpu":
            torch.set_num_threads(settings.torch_threads)
        device = settings.device
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("the replica was given a GPU but torch sees no CUDA device")
        dtype = _torch_dtype(settings.dtype, device)
        model: Any = AutoModelForCausalLM.from_pretrained(settings.model_source, dtype=dtype)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(settings.model_source)
        decode_tokenizer = AutoTokenizer.from_pretrained(settings.model_source)
        return cls(
            model,
            tokenizer,
            decode_tokenizer,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            batch_wait_s=settings.batch_wait_timeout_ms / 1000,
            max_pending=max_pending,
        )

    # ---- API side (event loop thread) -------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> GenerationStream:
        """Queue one sequence; raise :class:`EngineOverloadedError` when the replica is full.

        With ``stream=False`` the text arrives as a single final chunk.
        """
        if not self._thread.is_alive():
            raise EngineError("the generation loop is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        ref: list[_Sequence] = []
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = self._torch.Generator(device=self.device).manual_seed(params.seed)
        seq = _Sequence(
            prompt_ids=list(prompt_ids),
            params=params,
            text=IncrementalText(self._decode, params.stop),
            push=_threadsafe_push(loop, queue, ref),
            generator=generator,
            stream=stream,
        )
        ref.append(seq)
        with self._cond:
            if len(self._waiting) + len(self._running) >= self.max_pending:
                raise EngineOverloadedError(f"{self.max_pending} sequences already pending on this replica")
            seq.gap = seq.arrival - self._last_arrival
            self._last_arrival = seq.arrival
            self._waiting.append(seq)
            self._cond.notify()
        return _Stream(seq, queue, self._wake)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise EngineError("the generation loop died")

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting),
            "cancelled": self._cancelled_total,
        }

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _decode(self, ids: Sequence[int]) -> str:
        text = self._decoder.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return str(text)

    # ---- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        torch = self._torch
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # a broken batch must not kill the loop
                logger.exception("decode step failed; failing the running batch")
                self._fail(self._running, exc)
                self._running, self._cache, self._mask = [], None, None
        self._fail([*self._running, *self._waiting], EngineError("the engine is shutting down"))

    def _iteration(self) -> None:
        self._evict()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            self._evict()
        if self._running:
            self._decode_step()
            self._evict()

    def _admit(self) -> list[_Sequence]:
        free = self.max_num_seqs - len(self._running)
        if free <= 0 or (self._running and not self._can_merge):
            return []
        with self._cond:
            if not self._waiting:
                return []
            if self._running and not self._prefill_due(free):
                return []  # keep decoding; newcomers are prefilled together a little later
            if not self._running and self.batch_wait_s > 0:
                self._wait_for_company(free)
            admitted: list[_Sequence] = []
            while self._waiting and len(admitted) < free:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._cancelled_total += 1
                else:
                    admitted.append(seq)
        return admitted

    def _prefill_due(self, free: int) -> bool:
        """While a batch is decoding, admit newcomers once they fill it or the oldest waited long enough.

        Every prefill is a forward pass of its own, so prefilling arrivals one by one (they trickle
        in under load) would nearly double the passes per generated token; waiting up to
        ``batch_wait_s`` lets them share one.
        """
        return len(self._waiting) >= free or time.monotonic() - self._waiting[0].arrival >= self.batch_wait_s

    def _wait_for_company(self, free: int) -> None:
        """When idle and requests arrive in a burst, wait up to ``batch_wait_s`` to batch them.

        A request arriving alone (the previous arrival was long ago) starts at once, so
        sequential clients never pay the batching delay.
        """
        if len(self._waiting) == 1 and self._waiting[0].gap > self.batch_wait_s:
            return
        deadline = self._waiting[0].arrival + self.batch_wait_s
        while len(self._waiting) < free and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    def _prefill(self, admitted: list[_Sequence]) -> None:
        torch = self._torch
        from transformers import DynamicCache

        for group in prefill_chunks([len(s.prompt_ids) for s in admitted], PREFILL_TOKEN_BUDGET):
            seqs = [admitted[i] for i in group]
            try:
                ids, mask = left_pad([s.prompt_ids for s in seqs], self.pad_id)
                input_ids = torch.tensor(ids, device=self.device)
                attention = torch.tensor(mask, device=self.device)
                positions = (attention.cumsum(-1) - 1).clamp(min=0)
                cache = DynamicCache(config=self.model.config)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                tokens = self._sample(out.logits[:, -1, :], seqs)
            except Exception as exc:  # e.g. out of memory on a huge prompt: fail these, keep the rest
                logger.exception("prefill failed")
                self._fail(seqs, exc)
                continue
            self._join(seqs, cache, attention)
            self._accept(seqs, tokens)

    def _join(self, seqs: list[_Sequence], cache: Any, mask: torch.Tensor) -> None:
        """Append prefilled sequences (with their cache) to the running batch."""
        torch = self._torch
        if not self._running:
            self._running, self._cache, self._mask = list(seqs), cache, mask
            self._can_merge = _mergeable(cache)
            return
        width = max(self._mask.shape[1] if self._mask is not None else 0, mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_seq(old.keys, width, 2), _pad_seq(new.keys, width, 2)])
            old.values = torch.cat([_pad_seq(old.values, width, 2), _pad_seq(new.values, width, 2)])
        assert self._mask is not None
        self._mask = torch.cat([_pad_seq(self._mask, width, 1), _pad_seq(mask, width, 1)])
        self._running.extend(seqs)

    def _decode_step(self) -> None:
        torch = self._torch
        assert self._mask is not None
        seqs = self._running
        input_ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(seqs), 1))], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
        )
        self._accept(seqs, self._sample(out.logits[:, -1, :], seqs))

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        from .sampling import sample_next

        torch = self._torch
        temperature = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        tokens = sample_next(logits, temperature, top_p, [s.generator for s in seqs])
        return [int(t) for t in tokens.tolist()]

    def _accept(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.cancelled:
                continue
            seq.generated += 1
            seq.last_token = token
            reason: FinishReason | None = None
            if token in self.eos_ids and not seq.params.ignore_eos:
                reason, delta = "stop", seq.text.flush()
            else:
                delta = seq.text.push(token)
                if seq.text.stopped:
                    reason = "stop"
                elif seq.generated >= seq.params.max_tokens or seq.length >= self.max_model_len:
                    reason, delta = "length", delta + seq.text.flush()
            if reason is not None:
                seq.finished = True
            if reason is None and not seq.stream:
                seq.pending += delta
            elif delta or reason is not None:
                seq.push(GenerationChunk(seq.pending + delta, reason, seq.generated))
                seq.pending = ""

    def _evict(self) -> None:
        """Drop finished and cancelled rows from the batch and trim padding nobody needs."""
        keep = [i for i, s in enumerate(self._running) if not (s.finished or s.cancelled)]
        if len(keep) == len(self._running):
            return
        self._cancelled_total += sum(1 for s in self._running if s.cancelled and not s.finished)
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        torch = self._torch
        assert self._mask is not None
        index = torch.tensor(keep, device=self.device)
        self._running = [self._running[i] for i in keep]
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).int().argmax())
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _fail(self, seqs: Sequence[_Sequence], exc: BaseException) -> None:
        error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")
        for seq in seqs:
            if not seq.finished:
                seq.finished = True
                seq.push(error)


def _pad_seq(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Left-pad ``tensor`` with zeros along ``dim`` to ``width``."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _mergeable(cache: Any) -> bool:
    """Whether batches can be merged: every layer a plain full-attention dynamic layer."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _torch_dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
