"""Serving throughput: Ray Serve HTTP endpoint vs a sequential in-process generate loop.

Same model (the tiny local Llama), same prompts, same token counts (``ignore_eos``), same run:

1. baseline: ``model.generate`` once per prompt, sequentially, in this process (conc 1 is measured
   as interleaved pairs, and a baseline block runs right before each other level, so load drift on
   a shared machine affects both sides alike);
2. the ``transformers`` engine behind Ray Serve's HTTP proxy on 127.0.0.1, at concurrency 1, 8, 32.

Prints requests/s and p50/p99 latency per level and the ratios the serving issue targets
(conc 32 >= 3x sequential rps; conc 1 p50 within +25 ms of in-process). Starts its own token-auth
Ray head on loopback and stops it at the end.

    python benchmarks/serve_throughput.py [--max-tokens 32] [--requests 32] [--json out.json]
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.ray_cluster (the loopback Ray head helper)

PROMPTS = [
    "The river does not hurry, yet",
    "Once upon a time in a small village",
    "To bake bread you need flour, water and",
    "The lighthouse keeper climbed the stairs",
    "Explain why the sky is blue:",
    "A list of things to pack for a trip:",
    "The quick brown fox",
    "In the beginning there was",
]


@dataclass
class Level:
    """Results of one load level."""

    name: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize(name: str, concurrency: int, latencies: list[float], seconds: float, max_tokens: int) -> Level:
    n = len(latencies)
    return Level(
        name=name,
        concurrency=concurrency,
        requests=n,
        seconds=seconds,
        rps=n / seconds,
        tokens_per_s=n * max_tokens / seconds,
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * percentile(latencies, 99),
    )


class Baseline:
    """Sequential ``model.generate`` in this process: what one process does without a server."""

    def __init__(self, model_dir: Path, max_tokens: int, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.max_tokens = max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        for prompt in PROMPTS[:3]:
            self.one(prompt)  # warm up

    def one(self, prompt: str) -> float:
        """Latency (s) of one generate + decode."""
        started = time.perf_counter()
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with self.torch.inference_mode():
            out = self.model.generate(
                ids,
                max_new_tokens=self.max_tokens,
                min_new_tokens=self.max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return time.perf_counter() - started

    def block(self, requests: int) -> Level:
        started = time.perf_counter()
        latencies = [self.one(PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
        return summarize(
            "in-process sequential", 1, latencies, time.perf_counter() - started, self.max_tokens
        )


async def paired_conc1(baseline: Baseline, url: str, requests: int, model: str) -> tuple[Level, Level]:
    """Alternate one in-process generate and one HTTP request, so load drift on a shared box hits both."""
    import httpx

    local: list[float] = []
    remote: list[float] = []
    body = {"model": model, "max_tokens": baseline.max_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as http:
        for i in range(requests + 2):
            prompt = PROMPTS[i % len(PROMPTS)]
            local_s = baseline.one(prompt)
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/completions", json={**body, "prompt": prompt})
            remote_s = time.perf_counter() - started
            response.raise_for_status()
            if i >= 2:  # the first pair warms up the connection
                local.append(local_s)
                remote.append(remote_s)
    n = baseline.max_tokens
    return (
        summarize("in-process sequential", 1, local, sum(local), n),
        summarize("serve http conc=1", 1, remote, sum(remote), n),
    )


async def http_level(url: str, concurrency: int, requests: int, max_tokens: int, model: str) -> Level:
    """Closed-loop load: ``concurrency`` clients share ``requests`` requests; all must succeed."""
    import httpx

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient, todo: Iterator[int], record: bool) -> None:
        for i in todo:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
            body |= {"temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            response = await http.post(f"{url}/v1/completions", json=body)
            if record:
                latencies.append(time.perf_counter() - t0)
            response.raise_for_status()
            assert response.json()["usage"]["completion_tokens"] == max_tokens

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        warmup = iter(range(concurrency))
        await asyncio.gather(*(client(http, warmup, False) for _ in range(concurrency)))
        todo = iter(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(client(http, todo, True) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return summarize(f"serve http conc={concurrency}", concurrency, latencies, seconds, max_tokens)


def deploy(local: Any, model_dir: Path, cpus: str, max_num_seqs: int) -> str:
    """Deploy the app on the local Ray head; return the proxy's base URL."""
    import httpx
    from tests.ray_cluster import free_port

    import ray
    from llmray.api.runtime import ServeAppArgs
    from llmray_workloads.serve.app import build_app_from
    from ray import serve

    ray.init(address=local.gcs_address, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    args = ServeAppArgs.model_validate(
        {
            "name": "bench",
            "spec": {
                "model": {"uri": f"file://{model_dir}", "name": "tiny"},
                "engineArgs": {"maxNumSeqs": max_num_seqs},
                "resourcesPerReplica": {"cpu": cpus, "memory": "2Gi"},
                "limits": {"maxOngoingRequests": 64, "maxQueuedRequests": 256, "maxTokens": 512},
            },
        }
    )
    serve.run(build_app_from(args), name="bench", route_prefix="/")
    apps = httpx.get(f"{local.dashboard_url}/api/serve/applications/", headers=local.auth_headers, timeout=10)
    return f"http://127.0.0.1:{apps.json()['http_options']['port']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="Requests per level (x2 at conc 32).")
    parser.add_argument(
        "--cpus", default="1", help="CPUs per replica; the baseline uses as many torch threads."
    )
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    ns = parser.parse_args(argv)

    from tests.ray_cluster import start_local_ray, stop_local_ray

    from llmray_workloads.serve.config import parse_quantity
    from llmray_workloads.tiny import build_tiny_model

    threads = max(1, round(parse_quantity(ns.cpus)))
    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "llmray-bench-tiny")
    baseline = Baseline(model_dir, ns.max_tokens, threads)
    local = start_local_ray(num_cpus=8)
    os.environ.update(local.env)  # before ray is imported: it reads RAY_AUTH_MODE once
    pairs: list[tuple[Level, Level]] = []
    try:
        url = deploy(local, model_dir, ns.cpus, ns.max_num_seqs)
        pairs.append(asyncio.run(paired_conc1(baseline, url, ns.requests, "tiny")))
        for concurrency in (8, 32):
            count = ns.requests * (2 if concurrency == 32 else 1)
            base = baseline.block(ns.requests)
            pairs.append((base, asyncio.run(http_level(url, concurrency, count, ns.max_tokens, "tiny"))))
    finally:
        import ray

        ray.shutdown()
        stop_local_ray(local)

    print(f"\nmodel: tiny Llama ({model_dir}), max_tokens={ns.max_tokens}, replica cpus={ns.cpus}")
    print("each Serve level is compared with an in-process block measured right before it")
    print(f"{'level':<24}{'reqs':>6}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x seq':>7}")
    for base, level in pairs:
        for row in (base, level):
            print(
                f"{row.name:<24}{row.requests:>6}{row.rps:>9.1f}{row.tokens_per_s:>9.0f}"
                f"{row.p50_ms:>9.1f}{row.p99_ms:>9.1f}{row.rps / base.rps:>7.2f}"
            )
    speedup = pairs[2][1].rps / pairs[2][0].rps
    overhead = pairs[0][1].p50_ms - pairs[0][0].p50_ms
    print(f"\nconc 32 vs sequential: {speedup:.2f}x rps (target >= 3x) {'OK' if speedup >= 3 else 'MISS'}")
    print(f"conc 1 p50 overhead: {overhead:+.1f} ms (target <= +25 ms) {'OK' if overhead <= 25 else 'MISS'}")
    if ns.json:
        levels = [asdict(row) for pair in pairs for row in pair]
        result = {"levels": levels, "speedup_32": speedup, "overhead_ms": overhead}
        ns.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
