"""The transformers engine in a child process: the replica's HTTP work and the model stop sharing a GIL.

Why: in one process, Serve's request path (the ASGI hop, the proxy round trip, FastAPI, JSON) and
the engine's forward passes take turns on one GIL, and every torch op hands the GIL over, so each
side stalls the other. Measured on 2 cores at concurrency 32, the replica then tops out near one
core while the machine has more (see README, "Serving throughput"). vLLM splits its API server
and engine core into processes for the same reason.

:class:`ProcessEngine` is the replica's side: it implements the :class:`~.engine.Engine` protocol
and forwards submissions, cancellations and calls (tokenization included: the replica then never
imports torch, so a replica holds one copy of it) over one socket pair
(``multiprocessing.connection`` framing).
The child (``python -m llmray_workloads.serve.engine_process FD``) runs an unchanged
:class:`~.engine.TransformersEngine`; its per-step output batch goes back as one message.

Failure handling: if the child dies, every open request fails with :class:`~.engine.EngineError`
and :meth:`ProcessEngine.check_health` fails, so Serve replaces the replica. If the replica dies,
the child reads end-of-file and exits. Every call to the child has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .config import EngineSettings
from .engine import (
    EngineError,
    EngineOverloadedError,
    GenerationChunk,
    GenerationStream,
    SamplingParams,
    TransformersEngine,
    UnknownAdapterError,
    _Stream,
)
from .telemetry import EngineSample

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 3600.0
"""Most seconds the child may take to load the model (a large download from object storage)."""
CALL_TIMEOUT_S = 5.0
"""Deadline of a quick call to the child (health, stats, load figures)."""
ADAPTER_TIMEOUT_S = 3600.0
"""Deadline of loading the LoRA adapters (downloads included; the child loads them one call at a time)."""
STOP_TIMEOUT_S = 15.0
"""How long :meth:`ProcessEngine.shutdown` waits for the child before killing it."""

IN_PROCESS_ENV = "LLMRAY_ENGINE_IN_PROCESS"
"""Set to ``1`` in a replica's environment to run the engine in the replica's own process."""
CALLS = frozenset(
    {"encode", "encode_chat", "set_adapters", "adapters", "check_health", "stats", "current_load", "drain"}
)
"""Engine methods the replica may call in the child (nothing else is dispatched)."""


@dataclass(eq=False)
class _Remote:
    """The replica's record of one request running in the child (the ``seq`` a :class:`_Stream` reads)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationChunk | BaseException]
    finished: bool = False
    cancelled: bool = False


class _RemoteStream(_Stream):
    """A stream whose cancellation (explicit, or by being dropped) is sent to the child."""

    def __del__(self) -> None:
        self.cancel()


def _deliver(items: list[tuple[_Remote, GenerationChunk | BaseException]]) -> None:
    """Runs on the request's event loop."""
    for remote, item in items:
        remote.queue.put_nowait(item)


def _error(kind: str, message: str) -> Exception:
    """The replica-side exception for a failed call in the child (``kind`` from :func:`_reply`)."""
    return ValueError(message) if kind == "value" else EngineError(message)


def _ends(item: GenerationChunk | BaseException) -> bool:
    return isinstance(item, BaseException) or item.finish_reason is not None


class _RemoteCounters:
    """``EngineCounters.drain`` answered by the child (what the replica's reporter reads)."""

    def __init__(self, engine: ProcessEngine) -> None:
        self._engine = engine

    def drain(self) -> EngineSample:
        try:
            sample: EngineSample = self._engine._call("drain")
        except EngineError:
            return EngineSample()
        return sample


class ProcessEngine:
    """The replica's handle on a :class:`TransformersEngine` running in a child process."""

    def __init__(self, settings: EngineSettings, max_pending: int | None = None) -> None:
        parent, child = socket.socketpair()
        # The child imports what this process can (Ray may have added runtime_env paths to sys.path).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(child.fileno())], pass_fds=(child.fileno(),), env=env
        )
        child.close()
        self._conn = Connection(parent.detach())
        self._outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._open: dict[int, _Remote] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._dead: str | None = None
        self.max_pending = max_pending or 4 * settings.max_num_seqs
        self._sources: dict[str, str] = {}
        """Adapter model id -> source, as last listed by the child."""
        # The child's own bound is looser, so this one (checked at submit: a 503) is the one that
        # applies; the child may still count sequences whose cancellation is in flight.
        self._conn.send(("init", settings.model_dump(mode="json"), 2 * self.max_pending))
        info = self._await_ready()
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self._listed: list[str] = []
        self.counters = _RemoteCounters(self)
        threading.Thread(target=self._read, name="llmray-engine-reader", daemon=True).start()
        threading.Thread(target=self._write, name="llmray-engine-writer", daemon=True).start()

    def _await_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._conn.poll(1.0):
            code = self._process.poll()
            if code is not None:
                raise EngineError(f"the engine process exited with code {code} while loading the model")
            if time.monotonic() > deadline:
                self._kill()
                raise EngineError(f"the engine process did not load the model within {START_TIMEOUT_S:.0f}s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._kill()
            raise EngineError(f"the engine process failed to start: {exc}") from None
        if kind != "ready":
            self._kill()
            raise EngineError(str(payload))
        return dict(payload)

    @classmethod
    def load(cls, settings: EngineSettings, max_pending: int | None = None) -> ProcessEngine:
        """Start the child and load the model there (as :meth:`TransformersEngine.load` does here)."""
        return cls(settings, max_pending)

    # ---- Engine protocol -------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Tokenized by the child: this process then never imports torch (a replica holds one copy)."""
        ids: list[int] = self._call("encode", text)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids: list[int] = self._call("encode_chat", messages)
        return ids

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> GenerationStream:
        """Queue one sequence in the child; the same errors as :meth:`TransformersEngine.submit`."""
        if self._dead is not None:
            raise EngineError(self._dead)
        if not prompt_ids:
            raise EngineError("empty prompt")
        if params.adapter is not None and params.adapter not in self._listed:
            raise UnknownAdapterError(f"The model `{params.adapter}` does not exist.")
        remote = _Remote(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:  # under the lock _gone empties _open with, so nothing is left behind
            if self._dead is not None:
                raise EngineError(self._dead)
            if len(self._open) >= self.max_pending:
                raise EngineOverloadedError(f"{self.max_pending} sequences already pending on this replica")
            rid = next(self._ids)
            self._open[rid] = remote
        self._outgoing.put(("submit", rid, list(prompt_ids), params, stream))
        cancel = ("cancel", rid)
        return _RemoteStream(remote, remote.queue, lambda: self._outgoing.put(cancel))  # type: ignore[arg-type]

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineError(self._dead)
        self._call("check_health")

    def stats(self) -> dict[str, int]:
        try:
            stats: dict[str, int] = self._call("stats")
        except EngineError:
            return {}
        return stats

    def adapters(self) -> list[str]:
        return list(self._listed)

    def set_adapters(self, wanted: Mapping[str, str]) -> dict[str, str]:
        """As :meth:`TransformersEngine.set_adapters`: removed or changed adapters are unlisted at
        once (new requests for them get :class:`UnknownAdapterError`, a 404), new ones once loaded."""
        self._listed = [name for name in self._listed if wanted.get(name) == self._sources.get(name)]
        try:
            errors: dict[str, str] = self._call("set_adapters", dict(wanted), timeout=ADAPTER_TIMEOUT_S)
        finally:
            with contextlib.suppress(EngineError):
                listed = list(self._call("adapters"))
                self._sources = {name: wanted[name] for name in listed if name in wanted}
                self._listed = listed
        return errors

    def current_load(self) -> tuple[int, int, float]:
        try:
            running, waiting, cache = self._call("current_load")
        except EngineError:
            return 0, 0, 0.0
        return int(running), int(waiting), float(cache)

    def shutdown(self) -> None:
        """Stop the child (gracefully, then by force) and fail whatever is still open."""
        if self._process.poll() is None:
            self._outgoing.put(("shutdown",))
            try:
                self._process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill()
        self._gone("the engine is shutting down")

    # ---- the pipe --------------------------------------------------------------------------

    def _call(self, name: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Call engine method ``name`` in the child; its result, or :class:`EngineError`."""
        future: Future[Any] = Future()
        with self._lock:
            if self._dead is not None:
                raise EngineError(self._dead)
            cid = next(self._ids)
            self._calls[cid] = future
        self._outgoing.put(("call", cid, name, args))
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            raise EngineError(f"the engine process did not answer {name} within {timeout:.0f}s") from None
        finally:
            with self._lock:
                self._calls.pop(cid, None)

    def _write(self) -> None:
        """The one sender: submissions, cancellations (also from ``__del__``, hence the queue), calls."""
        while True:
            batch = [self._outgoing.get()]
            while not self._outgoing.empty():
                batch.append(self._outgoing.get())
            cancelled = [m[1] for m in batch if m[0] == "cancel"]
            if cancelled:  # the child sends nothing more for these: forget them here
                with self._lock:
                    for rid in cancelled:
                        self._open.pop(rid, None)
            try:
                self._conn.send(batch)
            except OSError:
                return
            if any(m[0] == "shutdown" for m in batch):
                return

    def _read(self) -> None:
        """Hand each output batch to the requests' event loops (one wakeup per loop) and resolve calls.

        Whatever ends this loop (end-of-file, or anything unexpected) ends the engine for good:
        every open request and pending call fails, and so does the health check.
        """
        try:
            while True:
                kind, *payload = self._conn.recv()
                if kind == "out":
                    self._dispatch(payload[0])
                elif kind == "reply":
                    cid, ok, value = payload
                    with self._lock:
                        future = self._calls.get(cid)
                    if future is not None:
                        with contextlib.suppress(InvalidStateError):  # _gone got there first
                            future.set_result(value) if ok else future.set_exception(_error(*value))
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading from the engine process failed; stopping it")
            self._kill()
        try:
            code: int | None = self._process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        self._gone(f"the engine process exited ({code})" if code is not None else "the engine process died")

    def _dispatch(self, batch: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Remote, GenerationChunk | BaseException]]] = {}
        with self._lock:
            for rid, item in batch:
                remote = self._open.pop(rid, None) if _ends(item) else self._open.get(rid)
                if remote is None:
                    continue
                if _ends(item):
                    remote.finished = True
                by_loop.setdefault(remote.loop, []).append((remote, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop is gone: nobody is listening
                loop.call_soon_threadsafe(_deliver, items)

    def _gone(self, why: str) -> None:
        """The child is gone: fail every open request and pending call with ``why``."""
        with self._lock:
            self._dead = self._dead or why
            open_, self._open = self._open, {}
            calls, self._calls = self._calls, {}
        self._dispatch_failures(open_, EngineError(why))
        for future in calls.values():
            with contextlib.suppress(InvalidStateError):
                future.set_exception(EngineError(why))

    def _dispatch_failures(self, open_: dict[int, _Remote], error: EngineError) -> None:
        for remote in open_.values():
            remote.finished = True
            failed: list[tuple[_Remote, GenerationChunk | BaseException]] = [(remote, error)]
            with contextlib.suppress(RuntimeError):
                remote.loop.call_soon_threadsafe(_deliver, failed)

    def _kill(self) -> None:
        self._process.kill()
        self._process.wait(timeout=STOP_TIMEOUT_S)


# ---- the child ---------------------------------------------------------------------------------


class _PipeLoop:
    """Stands in for an event loop in the child: the engine's per-step outbox goes up the pipe.

    :meth:`TransformersEngine.enqueue` was given this object as the loop and the request id as
    the queue, so ``call_soon_threadsafe(_deliver, [(rid, item), ...])`` is one step's output.
    """

    def __init__(self, conn: Connection, send_lock: threading.Lock, open_: dict[int, Any]) -> None:
        self._conn, self._send_lock, self._open = conn, send_lock, open_

    def call_soon_threadsafe(self, _deliver: Any, batch: list[tuple[int, Any]]) -> None:
        for rid, item in batch:
            if _ends(item):
                self._open.pop(rid, None)
        try:
            with self._send_lock:
                self._conn.send(("out", batch))
        except OSError as exc:  # the replica is gone; the outbox cancels these sequences
            raise RuntimeError("the replica closed the pipe") from exc


def _reply(
    conn: Connection, lock: threading.Lock, engine: TransformersEngine, cid: int, name: str, args: Any
) -> None:
    try:
        if name not in CALLS:
            raise EngineError(f"unknown call {name}")
        method = engine.counters.drain if name == "drain" else getattr(engine, name)
        message = ("reply", cid, True, method(*args))
    except Exception as exc:  # tokenizing bad input (e.g. a chat the template refuses): the caller's 400
        kind = "value" if name in ("encode", "encode_chat") else "engine"
        message = ("reply", cid, False, (kind, str(exc)))
    with lock:
        conn.send(message)


def child_main(fd: int) -> None:
    """Load the engine from the ``init`` message, then serve the replica's messages until EOF."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-process: %(message)s")
    conn = Connection(fd)
    _, settings, max_pending = conn.recv()
    try:
        engine = TransformersEngine.load(EngineSettings.model_validate(settings), max_pending=max_pending)
    except Exception as exc:
        logger.exception("the engine failed to load")
        conn.send(("failed", f"the engine failed to load: {exc}"))
        return
    conn.send(
        (
            "ready",
            {
                "max_model_len": engine.max_model_len,
                "vocab_size": engine.vocab_size,
            },
        )
    )
    lock = threading.Lock()
    open_: dict[int, Any] = {}
    pipe = _PipeLoop(conn, lock, open_)
    # Adapter loading (slow: downloads) has a worker of its own, so it never holds up the quick calls.
    quick = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmray-engine-call")
    slow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmray-engine-adapters")
    code = 0
    try:
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                return
            for message in batch:
                if message[0] == "shutdown":
                    return
                adapters = message[0] == "call" and message[2] == "set_adapters"
                _handle(message, engine, conn, lock, pipe, open_, slow if adapters else quick)
    except Exception:
        logger.exception("the engine process failed")
        code = 1
    finally:
        engine.shutdown()
        quick.shutdown(wait=False, cancel_futures=True)
        slow.shutdown(wait=False, cancel_futures=True)
        os._exit(code)


def _handle(
    message: tuple[Any, ...],
    engine: TransformersEngine,
    conn: Connection,
    lock: threading.Lock,
    pipe: _PipeLoop,
    open_: dict[int, Any],
    calls: ThreadPoolExecutor,
) -> None:
    """One message from the replica; a request that cannot be queued fails alone."""
    kind = message[0]
    if kind == "submit":
        _, rid, prompt_ids, params, stream = message
        try:
            seq = engine.enqueue(prompt_ids, params, stream, pipe, rid)
        except Exception as exc:
            error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")
            pipe.call_soon_threadsafe(None, [(rid, error)])
            return
        if not seq.finished:  # it may already have ended on the engine thread (and been sent)
            open_[rid] = seq
    elif kind == "cancel":
        seq = open_.pop(message[1], None)
        if seq is not None:
            engine.cancel(seq)
    elif kind == "call":
        _, cid, name, args = message
        calls.submit(_reply, conn, lock, engine, cid, name, args)


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
