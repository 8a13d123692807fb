"""Multi-LoRA throughput: 4 adapters served at once vs 1, on the transformers engine in this process.

One engine (the tiny local Llama) with 4 LoRA adapters loaded (rank 8 on q_proj/v_proj, made here
with peft). Closed-loop load at a fixed concurrency, measured in interleaved rounds so drift on a
shared machine hits every mix alike:

- ``base``: every request to the base model;
- ``1 adapter``: every request to adapter ``a0``;
- ``4 adapters``: requests round-robin over ``a0..a3``, so every batch mixes four adapters
  (peft runs each LoRA layer once per distinct adapter in the batch, on that adapter's rows).

Prints requests/s per mix and the ratio ``4 adapters / 1 adapter`` that issue 12 asks for.

    python benchmarks/serve_adapters.py [--concurrency 32] [--requests 128] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The river does not hurry, yet",
    "Once upon a time in a small village",
    "To bake bread you need flour, water and",
    "The lighthouse keeper climbed the stairs",
]
MIXES: dict[str, list[str | None]] = {
    "base": [None],
    "1 adapter": ["a0"],
    "4 adapters": ["a0", "a1", "a2", "a3"],
}


async def one(engine: Any, prompt: str, adapter: str | None, max_tokens: int) -> None:
    from llmray_workloads.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, adapter=adapter)
    last = None
    async for chunk in engine.submit(engine.encode(prompt), params, stream=False):
        last = chunk
    assert last is not None and last.completion_tokens == max_tokens


async def level(
    engine: Any, adapters: list[str | None], concurrency: int, requests: int, max_tokens: int
) -> float:
    """Requests/s of ``requests`` requests from ``concurrency`` closed-loop clients."""
    todo = iter(range(requests))

    async def client() -> None:
        for i in todo:
            await one(engine, PROMPTS[i % len(PROMPTS)], adapters[i % len(adapters)], max_tokens)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_workloads.serve.engine import TransformersEngine
    from llmray_workloads.tiny import build_tiny_adapter, build_tiny_model

    torch.set_num_threads(ns.threads)
    root = Path(tempfile.gettempdir()) / "llmray-bench-adapters"
    base = build_tiny_model(root / "base")
    adapters = {
        f"a{i}": str(build_tiny_adapter(base, root / f"a{i}", seed=i + 1, rank=ns.rank)) for i in range(4)
    }
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    engine = TransformersEngine(
        model, tokenizer, AutoTokenizer.from_pretrained(base), max_num_seqs=ns.concurrency
    )
    assert engine.set_adapters(adapters) == {}

    async def run() -> dict[str, list[float]]:
        results: dict[str, list[float]] = {name: [] for name in MIXES}
        for mix in MIXES.values():  # warm-up: one small round of each
            await level(engine, mix, ns.concurrency, ns.concurrency, ns.max_tokens)
        for _ in range(ns.rounds):
            for name, mix in MIXES.items():
                results[name].append(await level(engine, mix, ns.concurrency, ns.requests, ns.max_tokens))
        return results

    try:
        results = asyncio.run(run())
    finally:
        engine.shutdown()
    rps = {name: statistics.median(values) for name, values in results.items()}
    ratio = rps["4 adapters"] / rps["1 adapter"]
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        f"tiny model, concurrency {ns.concurrency}, {ns.requests} requests x {ns.max_tokens} tokens, "
        f"LoRA rank {ns.rank}, median of {ns.rounds} interleaved rounds, torch threads {ns.threads}"
    )
    for name in MIXES:
        runs = ", ".join(f"{v:.1f}" for v in results[name])
        print(f"  {name:>10}: {rps[name]:6.1f} req/s  (rounds: {runs})")
    one_vs_base = rps["1 adapter"] / rps["base"]
    print(f"4 adapters at once / 1 adapter: {ratio:.2f}x   (1 adapter / base: {one_vs_base:.2f}x)")
    if ns.json is not None:
        ns.json.write_text(
            json.dumps({"rps": rps, "rounds": results, "ratio_4_vs_1": ratio, "load": load}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
