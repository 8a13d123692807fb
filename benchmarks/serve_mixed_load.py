"""Mixed load: short prompts streaming while long prompts arrive; inter-token latency of the streams.

The transformers engine runs in this process (no Ray, no HTTP). ``--streams`` clients stream short
completions back to back; in the mixed phase, a long prompt (``--long-tokens``) arrives every
``--long-every`` seconds. Every chunk a stream receives is timed; the gap between two chunks of
one stream is its inter-token latency (ITL). Each configuration runs two phases:

1. ``streams only``: the decode-step floor;
2. ``mixed``: the same streams plus the long arrivals.

It runs once per ``--chunks`` value (the engine's ``prefill_chunk_tokens``; a value at least the
long prompt's length means no chunking) and reports ITL p50/p99/max next to the longest prefill
pass the engine ran, timed around the model's forward. With chunking, a running stream waits for
at most one chunk's prefill per token, so mixed p99 ITL stays near ``floor + one chunk``; without
it, a stream stalls for the whole long prompt.

The tiny test model allows 512 positions; to measure 2k-token prompts this benchmark raises its
``max_position_embeddings`` in memory (the model is RoPE-based and random: the figures are
latency, not quality).

    python benchmarks/serve_mixed_load.py [--long-tokens 2048] [--chunks 512 4096] [--seconds 8]

Long prompts arrive often (every 0.25 s by default) so that the gaps they stretch are more than
1 % of all gaps and show in p99; on a faster machine, lower ``--long-every`` further.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHORT_PROMPTS = [
    "The river does not hurry, yet",
    "Once upon a time in a small village",
    "The lighthouse keeper climbed the stairs",
    "A list of things to pack for a trip:",
]


LONG_CHUNK_MIN = 32
"""Prefill passes wider than this carry a long prompt's chunk (short prompts are under 16 tokens)."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


class TimedModel:
    """Model proxy that times each forward pass and records its input shape."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.passes: list[tuple[int, int, float]] = []
        """(rows, tokens per row, seconds) per forward."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = self._model(*args, **kwargs)
        rows, width = kwargs["input_ids"].shape
        self.passes.append((int(rows), int(width), time.perf_counter() - started))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@dataclass
class Phase:
    """One measured phase."""

    chunk_tokens: int
    phase: str
    gaps: int
    itl_p50_ms: float
    itl_p99_ms: float
    itl_p999_ms: float
    itl_max_ms: float
    long_prompts: int
    long_chunk_pass_p50_ms: float
    long_chunk_pass_p99_ms: float
    decode_pass_p50_ms: float
    extra: dict[str, Any] = field(default_factory=dict)


async def run_phase(
    engine: Any, timed: TimedModel, ns: argparse.Namespace, long_ids: list[int], mixed: bool
) -> tuple[list[float], int]:
    """Stream for ``ns.seconds``; return the inter-chunk gaps (s) and how many long prompts finished."""
    from llmray_workloads.serve.engine import SamplingParams

    deadline = time.perf_counter() + ns.seconds
    gaps: list[float] = []
    params = SamplingParams(max_tokens=ns.short_tokens, temperature=0.0, ignore_eos=True)

    async def streamer(index: int) -> None:
        i = index
        while time.perf_counter() < deadline:
            ids = engine.encode(SHORT_PROMPTS[i % len(SHORT_PROMPTS)])
            i += 1
            last = None
            async for _ in engine.submit(ids, params):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

    long_done = 0

    async def long_arrivals() -> None:
        nonlocal long_done
        long_params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        pending: list[asyncio.Task[None]] = []

        async def one() -> None:
            nonlocal long_done
            async for _ in engine.submit(long_ids, long_params):
                pass
            long_done += 1

        await asyncio.sleep(min(1.0, ns.long_every))  # let the streams reach a steady state first
        while time.perf_counter() < deadline - ns.long_every / 2:
            pending.append(asyncio.create_task(one()))
            await asyncio.sleep(ns.long_every)
        await asyncio.gather(*pending)

    tasks = [streamer(i) for i in range(ns.streams)]
    if mixed:
        tasks.append(long_arrivals())
    await asyncio.gather(*tasks)
    return gaps, long_done


def measure(model_dir: Path, chunk: int, ns: argparse.Namespace) -> list[Phase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_workloads.serve.engine import TransformersEngine

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    limit = ns.long_tokens + 64
    if model.config.max_position_embeddings < limit:
        model.config.max_position_embeddings = limit
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = TransformersEngine(
        model,
        tokenizer,
        AutoTokenizer.from_pretrained(model_dir),
        max_num_seqs=64,
        prefill_chunk_tokens=chunk,
        batch_wait_s=0.002,
    )
    timed = TimedModel(model)
    engine.model = timed
    rng = random.Random(0)
    long_ids = [rng.randrange(16, model.config.vocab_size) for _ in range(ns.long_tokens)]
    phases: list[Phase] = []
    try:
        for mixed in (False, True):
            timed.passes.clear()
            gaps, long_done = asyncio.run(run_phase(engine, timed, ns, long_ids, mixed))
            prefill = [s for _, w, s in timed.passes if w > LONG_CHUNK_MIN]
            decode = [s for _, w, s in timed.passes if w == 1]
            phases.append(
                Phase(
                    chunk_tokens=chunk,
                    phase="mixed" if mixed else "streams only",
                    gaps=len(gaps),
                    itl_p50_ms=1000 * statistics.median(gaps),
                    itl_p99_ms=1000 * percentile(gaps, 99),
                    itl_p999_ms=1000 * percentile(gaps, 99.9),
                    itl_max_ms=1000 * max(gaps),
                    long_prompts=long_done,
                    long_chunk_pass_p50_ms=1000 * statistics.median(prefill) if prefill else 0.0,
                    long_chunk_pass_p99_ms=1000 * percentile(prefill, 99) if prefill else 0.0,
                    decode_pass_p50_ms=1000 * statistics.median(decode) if decode else 0.0,
                )
            )
    finally:
        engine.shutdown()
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--long-tokens", type=int, default=2048, help="Tokens of each long prompt.")
    parser.add_argument("--long-every", type=float, default=0.25, help="Seconds between long arrivals.")
    parser.add_argument("--streams", type=int, default=8, help="Concurrent short streaming clients.")
    parser.add_argument("--short-tokens", type=int, default=64, help="max_tokens of each short request.")
    parser.add_argument("--seconds", type=float, default=8.0, help="Duration of each phase.")
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[512, 4096], help="prefill_chunk_tokens values to compare."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    ns = parser.parse_args(argv)

    import torch

    from llmray_workloads.tiny import build_tiny_model

    torch.set_num_threads(ns.threads)
    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "llmray-bench-tiny")
    load_before = os.getloadavg()
    phases = [phase for chunk in ns.chunks for phase in measure(model_dir, chunk, ns)]
    load_after = os.getloadavg()

    print(
        f"\ntiny Llama, {ns.streams} short streams (max_tokens={ns.short_tokens}), "
        f"long prompts of {ns.long_tokens} tokens every {ns.long_every:g} s, {ns.seconds:g} s per phase"
    )
    header = f"{'chunk':>6} {'phase':<13}{'gaps':>7}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}"
    print(header + f"{'longs':>7}{'chunk pass p50/p99 ms':>23}{'decode pass p50 ms':>20}")
    for p in phases:
        print(
            f"{p.chunk_tokens:>6} {p.phase:<13}{p.gaps:>7}{p.itl_p50_ms:>9.1f}{p.itl_p99_ms:>9.1f}"
            f"{p.itl_p999_ms:>10.1f}"
            f"{p.itl_max_ms:>9.1f}{p.long_prompts:>7}"
            f"{p.long_chunk_pass_p50_ms:>14.1f}/{p.long_chunk_pass_p99_ms:<8.1f}"
            f"{p.decode_pass_p50_ms:>20.1f}"
        )
    for floor, mixed in zip(phases[::2], phases[1::2], strict=True):
        bound = floor.itl_p99_ms + mixed.long_chunk_pass_p99_ms
        verdict = "within" if mixed.itl_p99_ms <= bound else "ABOVE"
        print(
            f"chunk {mixed.chunk_tokens}: mixed p99 ITL {mixed.itl_p99_ms:.1f} ms {verdict} "
            f"streams-only p99 + p99 chunk pass = {bound:.1f} ms; max ITL {mixed.itl_max_ms:.1f} ms"
        )
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    print(f"load average (1/5/15 min): before {before}, after {after}; cpu cores: {os.cpu_count()}")
    if ns.json:
        result = {"phases": [asdict(p) for p in phases], "loadavg": [load_before, load_after]}
        ns.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
