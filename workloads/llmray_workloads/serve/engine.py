"""Generation engines behind the OpenAI API: a protocol plus a continuous-batching transformers engine.

The transformers engine runs one background thread that owns the model and a slot-based KV cache
(:class:`SlotKVCache`): one preallocated row per running sequence, each sequence at its own
position. Admitting a sequence takes a free row and finishing one frees it; neither copies the
rest of the cache. Each iteration runs at most one prefill pass of at most
``prefill_chunk_tokens`` prompt tokens (long prompts are prefilled chunk by chunk across
iterations) and then one decode step for every running sequence, so a long prompt arriving delays
running streams by about one chunk's prefill, never by its whole prompt. Per step, sampling, stop
checks, detokenization (one batched tokenizer call) and delivery to the event loop (one wakeup per
loop) are done for the whole batch at once.

Failures are isolated: a forward pass that raises is retried on halves of its batch (bisection),
so only the sequences whose own pass fails are failed; every request always resolves with chunks
or an :class:`EngineError`. After ``max_failed_steps`` consecutive steps in which nothing
succeeded (a sticky device error), :meth:`TransformersEngine.check_health` fails so Serve replaces
the replica.

Memory per replica is bounded: at most ``max_num_seqs`` sequences run and at most ``max_pending``
sequences exist at all; beyond that :class:`EngineOverloadedError` is raised (HTTP 503).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from llmray.api.common import is_object_store

from .telemetry import EngineCounters
from .text import IncrementalText

if TYPE_CHECKING:
    import torch

    from .config import EngineSettings

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
PREFILL_CHUNK_TOKENS = 512
"""Default most prompt tokens (padded) per prefill pass: bounds the stall of running streams."""
MAX_FAILED_STEPS = 5
"""Default consecutive steps without any successful forward pass before the engine reports unhealthy."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation parameters (already validated and clamped by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    adapter: str | None = None
    """LoRA adapter (its model id) to generate with; None: the base model. Sequences of different
    adapters share a batch (peft's per-row ``adapter_names``)."""


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


class UnknownAdapterError(EngineError):
    """The request names an adapter this replica does not serve (HTTP 404 model_not_found)."""


BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in a mixed-adapter batch."""


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

    def adapters(self) -> list[str]: ...

    def shutdown(self) -> None: ...


_ids = itertools.count()
_Queue = asyncio.Queue[GenerationChunk | BaseException]
_Out = GenerationChunk | BaseException
_Item = tuple[_Queue, _Out]


@dataclass(eq=False)
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    text: IncrementalText | None
    """Incremental detokenizer; None when nothing is needed before the end (no stream, no stops)."""
    loop: asyncio.AbstractEventLoop
    queue: _Queue
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))
    gap: float = float("inf")
    """Seconds since the previous submission on this engine (burst detection)."""
    stream: bool = True
    """False: deliver one chunk with all the text at the end (far fewer event-loop wakeups)."""
    pending: str = ""
    tokens: list[int] = field(default_factory=list)
    """Generated token ids."""
    slot: int = -1
    """Row of the KV cache while admitted; -1 otherwise."""
    cached: int = 0
    """Tokens whose keys/values are in the cache (prompt tokens while prefilling)."""
    finished: bool = False
    cancelled: bool = False
    lora: str = BASE_ADAPTER
    """The peft adapter name of ``params.adapter`` (internal: a reloaded adapter gets a new one)."""

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.tokens)

    @property
    def last_token(self) -> int:
        return self.tokens[-1]


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


def _deliver(items: list[_Item]) -> None:
    """Runs on the event loop: hand each item to its stream's queue."""
    for queue, item in items:
        queue.put_nowait(item)


class _Outbox:
    """Items produced by one engine step, sent with one event-loop wakeup per loop."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, _Out]]] = {}

    def put(self, seq: _Sequence, item: GenerationChunk | BaseException) -> None:
        self._items.setdefault(seq.loop, []).append((seq, item))

    def send(self) -> None:
        items, self._items = self._items, {}
        for loop, batch in items.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(seq.queue, item) for seq, item in batch])
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                for seq, _ in batch:
                    seq.cancelled = True


def plan_prefill(remaining: Sequence[int], budget: int) -> list[int]:
    """Prompt tokens to prefill per waiting sequence (FIFO) in one pass of at most ``budget`` padded tokens.

    The pass is ``rows x width`` tokens, its width set by the first sequence's chunk
    (``min(remaining, budget)``); later sequences join while another row still fits, each with
    ``min(remaining, width)`` tokens. Returns one count per sequence that joins (a prefix).
    """
    if not remaining:
        return []
    width = max(1, min(remaining[0], budget))
    counts: list[int] = []
    for left in remaining:
        if (len(counts) + 1) * width > budget and counts:
            break
        counts.append(min(left, width))
    return counts


def next_capacity(needed: int, current: int, limit: int, minimum: int) -> int:
    """Capacity that holds ``needed``: ``current`` if it does, else doubled up to ``limit``."""
    if needed <= current:
        return current
    capacity = max(current, minimum)
    while capacity < needed:
        capacity *= 2
    return max(needed, min(capacity, limit))


@dataclass
class _Pass:
    """Where one forward pass reads and writes the cache (set on the cache before the pass).

    ``rows`` ([B, T]) and ``positions`` ([B, T]) index the cache row and position each input token's
    keys/values are written to (padding tokens go to the spare last position, never read);
    ``read`` selects the cache rows attention reads (a slice view, or an index for scattered rows);
    ``kv_len`` is how many positions are read.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    read: slice | torch.Tensor
    kv_len: int


def _slot_cache_classes() -> tuple[type, type]:
    """Build the cache classes on first use (transformers is imported lazily)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class SlotLayer(CacheLayerMixin):  # type: ignore[misc]
        """One layer's keys/values, ``[slots, kv_heads, length + 1, head_dim]``, preallocated."""

        def __init__(self, owner: Any) -> None:
            super().__init__()
            self.owner = owner

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            import torch

            slots, length = self.owner.slots, self.owner.length
            _, heads, _, key_dim = key_states.shape
            value_dim = value_states.shape[-1]
            dtype, device = key_states.dtype, key_states.device
            self.keys = torch.zeros(slots, heads, length + 1, key_dim, dtype=dtype, device=device)
            self.values = torch.zeros(slots, heads, length + 1, value_dim, dtype=dtype, device=device)
            self.is_initialized = True

        def grow(self, slots: int, length: int) -> None:
            """Copy into bigger tensors (amortised: capacities double)."""
            if self.keys is None or self.values is None:
                return
            old_slots, _, old_len, _ = self.keys.shape
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros((slots, old.shape[1], length + 1, old.shape[3]))
                new[:old_slots, :, : old_len - 1] = old[:, :, : old_len - 1]
                setattr(self, name, new)

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if self.keys is None:
                self.lazy_initialization(key_states, value_states)
            assert self.keys is not None and self.values is not None
            plan: _Pass = self.owner.plan
            self.keys[plan.rows, :, plan.positions] = key_states.transpose(1, 2)
            self.values[plan.rows, :, plan.positions] = value_states.transpose(1, 2)
            if isinstance(plan.read, slice):
                return self.keys[plan.read, :, : plan.kv_len], self.values[plan.read, :, : plan.kv_len]
            keys = self.keys.index_select(0, plan.read)[:, :, : plan.kv_len]
            return keys, self.values.index_select(0, plan.read)[:, :, : plan.kv_len]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return int(self.owner.plan.kv_len), 0

        def get_seq_length(self) -> int:
            return int(self.owner.plan.kv_len) if self.owner.plan is not None else 0

        def get_max_length(self) -> int:
            return int(self.owner.length)

    class SlotCache(Cache):  # type: ignore[misc]
        """Every layer's slot cache plus the current pass's plan; capacities grow by doubling."""

        def __init__(self, num_layers: int) -> None:
            self.slots = 0
            self.length = 0
            self.plan: _Pass | None = None
            super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

        def ensure(self, slots: int, length: int) -> None:
            if slots > self.slots or length > self.length:
                self.slots, self.length = max(slots, self.slots), max(length, self.length)
                for layer in self.layers:
                    layer.grow(self.slots, self.length)  # type: ignore[union-attr]

    return SlotLayer, SlotCache


def new_slot_cache(num_layers: int) -> Any:
    """An empty slot cache (a ``transformers`` ``Cache``; see :func:`_slot_cache_classes`).

    Why slots rather than paged blocks: with one row per sequence, admitting and finishing are
    O(1) bookkeeping, a decode step reads the rows as a tensor view, and the model's own attention
    (SDPA with an explicit mask) runs unchanged; paging would need a paged-attention kernel that
    Hugging Face models on CPU do not have. The cost is reserving ``max_model_len`` positions per
    running sequence, bounded by ``max_num_seqs`` and grown by doubling as needed.
    """
    _, cache_class = _slot_cache_classes()
    return cache_class(num_layers)


def _local_adapter(source: str) -> str:
    """A local folder holding the adapter ``source`` (a folder, or a hub repo id it downloads)."""
    if Path(source).is_dir() or source.startswith("/"):
        return source
    from huggingface_hub import snapshot_download

    return str(snapshot_download(source))


def local_model(source: str, settings: EngineSettings) -> str:
    """``source`` itself, or for an s3:// / gs:// model its copy in this node's model cache."""
    if not is_object_store(source):
        return source
    from ..storage import StoreSettings, cached_download, model_cache_root

    env = StoreSettings.resolve(None)  # AWS_ENDPOINT_URL_S3 / AWS_REGION set on the pods
    store = StoreSettings(
        endpoint=settings.store_endpoint or env.endpoint, region=settings.store_region or env.region
    )
    try:
        return str(cached_download(source, model_cache_root(), store))
    except Exception as exc:
        raise EngineError(f"cannot download the model {source}: {exc}") from exc


def adapter_base(source: str) -> str | None:
    """The base model a LoRA adapter folder names (``adapter_config.json``), or None for a full model."""
    path = Path(source) / "adapter_config.json"
    if not path.is_file():
        return None
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise EngineError(f"{path}: a LoRA adapter without base_model_name_or_path cannot be served")
    return str(base)


class TransformersEngine:
    """Continuous batching over a Hugging Face causal LM with a slot-based KV cache (see module doc)."""

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
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        max_failed_steps: int = MAX_FAILED_STEPS,
        max_lora_rank: int | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self._decoder = decode_tokenizer or tokenizer
        parameter = next(model.parameters())
        self.device, self._dtype = parameter.device, parameter.dtype
        config = model.config
        self.max_model_len = resolve_max_model_len(max_model_len, config)
        self._window = _check_attention(config)
        self._additive_mask = getattr(config, "_attn_implementation", "sdpa") == "eager"
        self._num_layers = int(config.num_hidden_layers)
        self.vocab_size = int(config.vocab_size)
        self.max_num_seqs = max_num_seqs
        self.batch_wait_s = batch_wait_s
        self.max_pending = max_pending or 4 * max_num_seqs
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.max_failed_steps = max_failed_steps
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._slots: list[_Sequence | None] = []
        self._cache: Any = None
        self._outbox = _Outbox()
        self._failed_steps = 0
        self._fresh_first = False
        self._last_arrival = 0.0
        self._stopping = False
        self._cancelled_total = 0
        # Multi-LoRA: adapters are peft adapters on ``model``. ``_listed`` (model id -> peft name)
        # is what requests may use; ``_loaded`` (peft name -> source) what is in memory. A removed
        # or replaced adapter is unlisted at once and deleted once no sequence uses it.
        self.max_lora_rank = max_lora_rank
        self._peft: Any = None
        self._listed: dict[str, str] = {}
        self._loaded: dict[str, str] = {}
        self._adapter_errors: dict[str, str] = {}
        self._lora_ids = itertools.count()
        self._model_lock = threading.Lock()
        self.counters = EngineCounters()
        """Per-step figures for the replica's telemetry (TTFT, inter-token latency, tokens)."""
        self._last_decode: float | None = None
        self._thread = threading.Thread(target=self._loop, name="llmray-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, settings: EngineSettings, max_pending: int | None = None) -> TransformersEngine:
        """Load model and tokenizer from ``settings.model_source`` onto the configured device.

        ``maxModelLen`` above the model's ``max_position_embeddings`` is refused before the weights load.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = local_model(settings.model_source, settings)
        base = adapter_base(source)
        if base is not None:
            base = local_model(base, settings)
        weights = base or source
        resolve_max_model_len(settings.max_model_len, AutoConfig.from_pretrained(weights))
        if settings.torch_threads and settings.device == "cpu":
            torch.set_num_threads(settings.torch_threads)
        device = settings.device
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("the replica was given a GPU but torch sees no CUDA device")
        dtype = _torch_dtype(settings.dtype, device)
        model: Any = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa")
        if base is not None:
            # A LoRA job's output (lora.mergeOnExport: false) is an adapter: fold it into its base
            # once at load, so serving it costs the same as serving a plain model.
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source).merge_and_unload()
        model = model.to(device).eval()
        has_tokenizer = (Path(source) / "tokenizer_config.json").is_file()
        tokenizer_source = source if has_tokenizer or base is None else base
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        decode_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        return cls(
            model,
            tokenizer,
            decode_tokenizer,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            batch_wait_s=settings.batch_wait_timeout_ms / 1000,
            max_pending=max_pending,
            max_lora_rank=settings.max_lora_rank,
        )

    # ---- adapters (any thread) -------------------------------------------------------------------

    def adapters(self) -> list[str]:
        """Model ids of the LoRA adapters requests may use now."""
        with self._cond:
            return sorted(self._listed)

    def adapter_errors(self) -> dict[str, str]:
        """Adapters of the last :meth:`set_adapters` that failed to load, with why."""
        return dict(self._adapter_errors)

    def set_adapters(self, wanted: Mapping[str, str]) -> dict[str, str]:
        """Serve exactly the adapters ``wanted`` (model id -> folder or hub id), without a restart.

        New ones are loaded (peft ``load_adapter``) between engine iterations; removed or changed
        ones are unlisted at once (new requests get :class:`UnknownAdapterError`) and freed once the
        sequences still using them finish. An adapter that fails to load is left out and reported
        (returned, and in :meth:`adapter_errors`); the others are served regardless.
        """
        errors: dict[str, str] = {}
        local: dict[str, str] = {}
        with self._cond:
            served = {name: self._loaded.get(lora) for name, lora in self._listed.items()}
        for name, source in wanted.items():  # hub downloads happen here, not under the model lock
            if served.get(name) == source:
                continue
            try:
                local[name] = _local_adapter(source)
            except Exception as exc:
                errors[name] = f"adapter {name} failed to load from {source}: {exc}"
        with self._model_lock:
            with self._cond:
                current = {name: self._loaded[lora] for name, lora in self._listed.items()}
                for name in [n for n in self._listed if wanted.get(n) != current[n]]:
                    del self._listed[name]
            for name, source in wanted.items():
                if current.get(name) == source or name in errors:
                    continue
                lora = f"lora{next(self._lora_ids)}"
                try:
                    self._load_adapter(lora, local[name], source)
                except Exception as exc:
                    logger.warning("adapter %s (%s) failed to load: %s", name, source, exc)
                    errors[name] = f"adapter {name} failed to load from {source}: {exc}"
                    continue
                with self._cond:
                    self._listed[name] = lora
            self._adapter_errors = errors
            self._retire()
        return errors

    def _load_adapter(self, lora: str, folder: str, source: str) -> None:
        """Load the adapter in ``folder`` (from ``source``) as peft adapter ``lora`` (caller holds the
        model lock)."""
        config = Path(folder) / "adapter_config.json"
        if self.max_lora_rank is not None and config.is_file():
            rank = int(json.loads(config.read_text()).get("r") or 0)
            if rank > self.max_lora_rank:
                raise EngineError(f"rank {rank} exceeds engineArgs.maxLoraRank {self.max_lora_rank}")
        device = str(self.device)
        if self._peft is None:
            from peft import PeftModel

            self._peft = PeftModel.from_pretrained(self.model, folder, adapter_name=lora, torch_device=device)
        else:
            self._peft.load_adapter(folder, adapter_name=lora, torch_device=device)
        self._peft.eval()
        self._loaded[lora] = source

    def _retire(self) -> None:
        """Delete loaded adapters that are unlisted and used by no sequence (caller holds the model lock)."""
        with self._cond:
            listed = set(self._listed.values())
            used = {s.lora for s in (*self._waiting, *self._prefilling, *self._running)}
        for lora in [n for n in self._loaded if n not in listed and n not in used]:
            del self._loaded[lora]
            if self._loaded:
                self._peft.delete_adapter(lora)
            else:  # peft cannot drop its last adapter: take the LoRA layers out instead
                self.model = self._peft.unload()
                self._peft = None

    # ---- API side (event loop thread) -------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_messages(self.tokenizer, messages)

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> GenerationStream:
        """Queue one sequence; raise :class:`EngineOverloadedError` when the replica is full.

        With ``stream=False`` the text arrives as a single final chunk.
        """
        queue: _Queue = asyncio.Queue()
        seq = self.enqueue(prompt_ids, params, stream, asyncio.get_running_loop(), queue)
        return _Stream(seq, queue, self._wake)

    def enqueue(
        self, prompt_ids: list[int], params: SamplingParams, stream: bool, loop: Any, queue: Any
    ) -> _Sequence:
        """Queue one sequence whose chunks go out as ``loop.call_soon_threadsafe(deliver, [(queue, item)])``.

        :meth:`submit` passes an event loop and an asyncio queue; the engine process
        (:mod:`.engine_process`) passes its pipe and the request id instead.
        """
        if not self._thread.is_alive():
            raise EngineError("the generation loop is not running")
        if not prompt_ids:
            raise EngineError("empty prompt")
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = self._torch.Generator(device=self.device).manual_seed(params.seed)
        incremental = stream or bool(params.stop)
        seq = _Sequence(
            prompt_ids=list(prompt_ids),
            params=params,
            text=IncrementalText(self._decode, params.stop) if incremental else None,
            loop=loop,
            queue=queue,
            generator=generator,
            stream=stream,
        )
        with self._cond:
            if self._stopping:
                raise EngineError("the engine is shutting down")
            if len(self._waiting) + len(self._prefilling) + len(self._running) >= self.max_pending:
                raise EngineOverloadedError(f"{self.max_pending} sequences already pending on this replica")
            if params.adapter is not None:  # looked up under the lock _retire checks usage under
                lora = self._listed.get(params.adapter)
                if lora is None:
                    raise UnknownAdapterError(f"The model `{params.adapter}` does not exist.")
                seq.lora = lora
            seq.gap = seq.arrival - self._last_arrival
            self._last_arrival = seq.arrival
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: _Sequence) -> None:
        """Stop generating ``seq`` (idempotent; a no-op once it finished)."""
        if not seq.finished and not seq.cancelled:
            seq.cancelled = True
            self._wake()

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise EngineError("the generation loop died")
        if self._failed_steps >= self.max_failed_steps:
            raise EngineError(f"the last {self._failed_steps} generation steps all failed")

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self._running) + len(self._prefilling),
            "waiting": len(self._waiting),
            "cancelled": self._cancelled_total,
        }

    def current_load(self) -> tuple[int, int, float]:
        """Running and waiting sequences, and the KV cache's use: tokens held / (maxNumSeqs x maxModelLen).

        Read from another thread without the engine's lock: a momentary, approximate figure.
        """
        running = [s for s in (*self._running, *self._prefilling) if not (s.finished or s.cancelled)]
        cached = sum(s.cached for s in running)
        return len(running), len(self._waiting), cached / (self.max_num_seqs * self.max_model_len)

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

    def _decode_many(self, rows: list[list[int]]) -> list[str]:
        """One tokenizer call for many id lists (a fast tokenizer decodes them in Rust)."""
        if not rows:
            return []
        texts = self._decoder.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [str(t) for t in texts]

    # ---- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        torch = self._torch
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._busy():
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    with self._model_lock, torch.inference_mode():
                        self._iteration()
                        if len(self._loaded) > len(self._listed):
                            self._retire()
                except Exception as exc:  # not attributable to a sequence: fail what is in flight
                    logger.exception("engine iteration failed; failing the admitted sequences")
                    self._failed_steps += 1
                    self._fail([*self._prefilling, *self._running], exc)
                    self._reset()
                finally:
                    self._outbox.send()
        finally:  # whatever ends the loop, nobody is left waiting
            with self._cond:
                self._stopping = True
                orphans = [*self._prefilling, *self._running, *self._waiting]
                self._waiting.clear()
            self._fail(orphans, EngineError("the engine is shutting down"))
            self._outbox.send()

    def _busy(self) -> bool:
        return bool(self._prefilling or self._running)

    def _reset(self) -> None:
        self._prefilling, self._running = [], []
        self._slots, self._cache = [], None

    def _iteration(self) -> None:
        self._evict()
        self._admit()
        if self._prefilling:
            self._prefill_step()
            self._outbox.send()  # first tokens go out now, not after the decode step
            self._evict()
        if self._running:
            self._decode_step()
            self._outbox.send()
            self._evict()
        if not self._busy():
            self._slots, self._cache = [], None  # idle: give the cache's memory back
            self._last_decode = None
            self.counters.idle()

    def _admit(self) -> None:
        free = self.max_num_seqs - len(self._running) - len(self._prefilling)
        if free <= 0:
            return
        with self._cond:
            if not self._waiting:
                return
            if self._busy() and not self._prefill_due(free):
                return  # keep decoding; newcomers are prefilled together a little later
            if not self._busy() and self.batch_wait_s > 0:
                self._wait_for_company(free)
            admitted: list[_Sequence] = []
            while self._waiting and len(admitted) < free:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._cancelled_total += 1
                else:
                    admitted.append(seq)
        for seq in admitted:
            self._take_slot(seq)
        self._prefilling.extend(admitted)

    def _take_slot(self, seq: _Sequence) -> None:
        """Give ``seq`` the lowest free cache row, growing the cache (rarely: doubling) when needed."""
        try:
            slot = self._slots.index(None)
        except ValueError:
            slot = len(self._slots)
            self._slots.append(None)
        self._slots[slot] = seq
        seq.slot = slot
        need = min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len)
        if self._cache is None:
            self._cache = new_slot_cache(self._num_layers)
        cache = self._cache
        slots = next_capacity(len(self._slots), cache.slots, self.max_num_seqs, 4)
        length = next_capacity(need, cache.length, self.max_model_len, 64)
        cache.ensure(slots, length)

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

    # ---- passes --------------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        """Prefill one chunk (at most ``prefill_chunk_tokens`` padded tokens) of the oldest prompts.

        Every other pass puts prompts not started yet first, so short arrivals are not queued
        behind all the chunks of a long prompt, and a long prompt still advances every other pass.
        """
        order = self._prefilling
        self._fresh_first = not self._fresh_first
        if self._fresh_first:
            order = sorted(order, key=lambda s: s.cached > 0)  # stable: FIFO within each group
        remaining = [len(s.prompt_ids) - s.cached for s in order]
        counts = plan_prefill(remaining, self.prefill_chunk_tokens)
        seqs = order[: len(counts)]
        done = self._isolated(seqs, self._prefill_pass)
        finished: list[_Sequence] = []
        tokens: list[int] = []
        for seq, token in done:
            if seq.cached >= len(seq.prompt_ids):
                finished.append(seq)
                tokens.append(token)
        if finished:
            ready = set(finished)
            self._prefilling = [s for s in self._prefilling if s not in ready]
            self._running.extend(finished)
            self._accept(finished, tokens)
            now = time.monotonic()
            self.counters.first_tokens([(s.params.adapter, now - s.arrival) for s in finished])

    def _decode_step(self) -> None:
        """Advance every running sequence by one token (one pass; bisected only on failure)."""
        done = self._isolated(self._running, self._decode_pass)
        self._accept([s for s, _ in done], [t for _, t in done])
        now = time.monotonic()
        interval = None if self._last_decode is None else now - self._last_decode
        self._last_decode = now
        self.counters.decode_step(interval, Counter(s.params.adapter for s, _ in done), len(done))

    def _isolated(
        self, seqs: list[_Sequence], run: Callable[[list[_Sequence]], list[int]]
    ) -> list[tuple[_Sequence, int]]:
        """Run a pass over ``seqs``; on failure retry each half, so only failing sequences fail.

        A pass only writes cache positions its sequences have not committed yet, so a retry is
        idempotent. Counts the step as failed when no sequence got through.
        """
        results: list[tuple[_Sequence, int]] = []
        pending = [seqs]
        while pending:
            group = pending.pop()
            try:
                results.extend(zip(group, run(group), strict=True))
            except Exception as exc:
                if len(group) == 1:
                    logger.warning("forward pass failed for sequence %d: %s", group[0].id, exc)
                    self._fail(group, exc)
                else:
                    mid = len(group) // 2
                    pending += [group[mid:], group[:mid]]
        self._failed_steps = 0 if results else self._failed_steps + 1
        return results

    def _prefill_pass(self, seqs: list[_Sequence]) -> list[int]:
        """Forward the next prompt chunk of each sequence (right-padded); commit it; sample where done.

        Returns one token per sequence (-1 where the prompt is not finished yet).
        """
        torch = self._torch
        remaining = [len(s.prompt_ids) - s.cached for s in seqs]
        width = max(1, min(remaining[0], self.prefill_chunk_tokens))
        counts = [min(r, width) for r in remaining]
        trash = self._cache.length
        ids, rows, writes, positions, last = [], [], [], [], []
        for seq, count in zip(seqs, counts, strict=True):
            start = seq.cached
            chunk = seq.prompt_ids[start : start + count]
            ids.append(chunk + [self.pad_id] * (width - count))
            rows.append([seq.slot] * width)
            real = list(range(start, start + count))
            writes.append(real + [trash] * (width - count))
            positions.append(real + [start + count - 1] * (width - count))
            last.append(count - 1)
        device = self.device
        query = torch.tensor(positions, device=device)
        plan = _Pass(
            rows=torch.tensor(rows, device=device),
            positions=torch.tensor(writes, device=device),
            read=torch.tensor([s.slot for s in seqs], device=device),
            kv_len=max(s.cached + c for s, c in zip(seqs, counts, strict=True)),
        )
        done = [s.cached + c >= len(s.prompt_ids) for s, c in zip(seqs, counts, strict=True)]
        keep = sorted({last[i] for i, d in enumerate(done) if d}) or [width - 1]
        logits = self._forward(seqs, torch.tensor(ids, device=device), query, plan, keep)
        tokens = [-1] * len(seqs)
        finishing = [i for i, d in enumerate(done) if d]
        if finishing:
            picked = logits[finishing, [keep.index(last[i]) for i in finishing]]
            sampled = self._sample(picked, [seqs[i] for i in finishing])
            for i, token in zip(finishing, sampled, strict=True):
                tokens[i] = token
        for seq, count in zip(seqs, counts, strict=True):
            seq.cached += count
        return tokens

    def _decode_pass(self, seqs: list[_Sequence]) -> list[int]:
        """Forward each sequence's last token at its own position; return the next tokens.

        The pass reads a contiguous range of cache rows as a view (no copy) when the running
        sequences fill at least half of it, else gathers just their rows.
        """
        torch = self._torch
        device = self.device
        top = max(s.slot for s in seqs) + 1
        trash = self._cache.length
        if 2 * len(seqs) >= top:  # rows 0..top-1 in place; rows without a running sequence idle
            ids, writes, positions = [self.pad_id] * top, [trash] * top, [0] * top
            for seq in seqs:
                ids[seq.slot], writes[seq.slot], positions[seq.slot] = seq.last_token, seq.cached, seq.cached
            read: Any = slice(0, top)
            rows = torch.arange(top, device=device).unsqueeze(1)
            picks: list[int] | None = [s.slot for s in seqs]
            row_seqs: list[_Sequence | None] = [None] * top
            for seq in seqs:
                row_seqs[seq.slot] = seq
        else:
            ids = [s.last_token for s in seqs]
            writes = positions = [s.cached for s in seqs]
            read = torch.tensor([s.slot for s in seqs], device=device)
            rows = read.unsqueeze(1)
            picks = None
            row_seqs = list(seqs)
        query = torch.tensor(positions, device=device).unsqueeze(1)
        plan = _Pass(rows, torch.tensor(writes, device=device).unsqueeze(1), read, max(positions) + 1)
        logits = self._forward(row_seqs, torch.tensor(ids, device=device).unsqueeze(1), query, plan, [0])[
            :, 0
        ]
        if picks is not None and picks != list(range(top)):
            logits = logits[picks]
        tokens = self._sample(logits, seqs)
        for seq in seqs:
            seq.cached += 1
        return tokens

    def _forward(
        self,
        seqs: Sequence[_Sequence | None],
        input_ids: torch.Tensor,
        query: torch.Tensor,
        plan: _Pass,
        keep: list[int],
    ) -> torch.Tensor:
        """One model forward over ``plan``; returns logits ``[B, len(keep), V]`` at positions ``keep``.

        ``seqs``: the sequence of each row (None: an idle row).
        """
        torch = self._torch
        width = input_ids.shape[1]
        keys = torch.arange(plan.kv_len, device=self.device)
        visible = keys <= query.unsqueeze(-1)  # [B, T, kv]: causal, each row at its own position
        if self._window is not None:
            visible &= keys > query.unsqueeze(-1) - self._window
        mask = visible.unsqueeze(1)
        if self._additive_mask:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=self._dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self._dtype).min
            )
        self._cache.plan = plan
        model = self.model if self._peft is None else self._peft
        try:
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=query,
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1 if keep == [width - 1] else torch.tensor(keep, device=self.device),
                **self._forward_kwargs(seqs),
            )
        finally:
            self._cache.plan = None
        return out.logits  # type: ignore[no-any-return]

    def _forward_kwargs(self, seqs: Sequence[_Sequence | None]) -> dict[str, Any]:
        """Extra model kwargs for a pass over ``seqs`` (in row order).

        With adapters loaded: peft's ``adapter_names``, one per row (idle rows and base-model
        sequences: ``__base__``). Each LoRA layer then adds every adapter's delta to its own rows
        only, so sequences of different adapters and of the base share one forward pass.
        """
        if self._peft is None:
            return {}
        return {"adapter_names": [BASE_ADAPTER if s is None else s.lora for s in seqs]}

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        from .sampling import sample_next

        torch = self._torch
        if all(s.params.temperature <= 0 for s in seqs):
            return [int(t) for t in logits.argmax(dim=-1).tolist()]
        temperature = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        tokens = sample_next(logits, temperature, top_p, [s.generator for s in seqs])
        return [int(t) for t in tokens.tolist()]

    # ---- results -------------------------------------------------------------------------------

    def _accept(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        """Record one new token per sequence: stop checks, detokenization and delivery, batched."""
        incremental: list[tuple[_Sequence, int]] = []
        windows: list[list[int]] = []
        ended: list[tuple[_Sequence, FinishReason]] = []
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.cancelled or seq.finished:
                continue
            seq.tokens.append(token)  # an eos counts as a completion token, as in vLLM and OpenAI
            if token in self.eos_ids and not seq.params.ignore_eos:
                ended.append((seq, "stop"))
                continue
            if seq.text is not None:
                pair = seq.text.add(token)
                if pair is not None:
                    incremental.append((seq, len(windows)))
                    windows += pair
            if seq.generated >= seq.params.max_tokens or seq.length >= self.max_model_len:
                ended.append((seq, "length"))
        decoded = self._decode_many(windows)
        for seq, at in incremental:
            assert seq.text is not None
            delta = seq.text.advance(decoded[at], decoded[at + 1])
            if seq.text.stopped:
                self._finish(seq, "stop", delta)
            elif delta:
                if seq.stream:
                    self._outbox.put(seq, GenerationChunk(delta, None, seq.generated))
                else:
                    seq.pending += delta
        plain = [(s, r) for s, r in ended if not s.finished and s.text is None]
        rows = [s.tokens[:-1] if r == "stop" else s.tokens for s, r in plain]  # "stop" here is an eos
        for (seq, reason), text in zip(plain, self._decode_many(rows), strict=True):
            self._finish(seq, reason, text)
        for seq, reason in ended:
            if not seq.finished:
                assert seq.text is not None
                self._finish(seq, reason, seq.text.flush())

    def _finish(self, seq: _Sequence, reason: FinishReason, delta: str) -> None:
        seq.finished = True
        self._outbox.put(seq, GenerationChunk(seq.pending + delta, reason, seq.generated))
        seq.pending = ""

    def _evict(self) -> None:
        """Free the cache rows of finished and cancelled sequences (nothing is copied)."""
        for group in (self._prefilling, self._running):
            if any(s.finished or s.cancelled for s in group):
                for seq in group:
                    if seq.finished or seq.cancelled:
                        self._cancelled_total += int(seq.cancelled and not seq.finished)
                        self._free(seq)
                group[:] = [s for s in group if not (s.finished or s.cancelled)]

    def _free(self, seq: _Sequence) -> None:
        if 0 <= seq.slot < len(self._slots) and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
        seq.slot = -1

    def _fail(self, seqs: Sequence[_Sequence], exc: BaseException) -> None:
        error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")
        for seq in seqs:
            if not seq.finished:
                seq.finished = True
                self._outbox.put(seq, error)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Prompt ids of a completion prompt (with the tokenizer's special tokens, as ``generate`` gets)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a chat: the model's chat template with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use /v1/completions")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def resolve_max_model_len(requested: int | None, config: Any) -> int:
    """The context length to serve: ``requested`` or the model's; refuse more than the model supports."""
    limit = getattr(config, "max_position_embeddings", None)
    if requested is not None and limit is not None and requested > int(limit):
        raise EngineError(
            f"maxModelLen {requested} exceeds the model's max_position_embeddings ({limit}); "
            f"set engineArgs.maxModelLen to at most {limit}"
        )
    return int(requested or limit or 2048)


def _check_attention(config: Any) -> int | None:
    """The sliding-window size every layer uses (None: full attention); refuse other layouts.

    The engine builds each pass's attention mask itself (rows at different positions), so it
    supports models whose layers all use full attention, or all the same sliding window.
    """
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    kinds = set(getattr(config, "layer_types", None) or [])
    if kinds and kinds != {"full_attention"} and kinds != {"sliding_attention"}:
        raise EngineError(
            f"the transformers engine does not support attention layer types {sorted(kinds)}; "
            "use the vllm engine"
        )
    if kinds == {"full_attention"}:
        return None
    return int(window) if window else None


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
