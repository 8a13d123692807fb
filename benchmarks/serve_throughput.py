"""Serving throughput: the continuous-batching engine vs a sequential in-process generate loop.

Same model (the tiny local Llama), same prompts, same token counts (``ignore_eos``), same run:

1. baseline: ``model.generate`` once per prompt, sequentially, in this process (conc 1 is measured
   as interleaved pairs, and a baseline block runs right before each other level, so load drift on
   a shared machine affects both sides alike);
2. tier ``engine``: the ``transformers`` engine in this process (tokenize, submit, collect the
   text; no HTTP, no Ray) at concurrency 1, 8, 32;
3. tier ``http``: the same engine behind Ray Serve's HTTP proxy on 127.0.0.1 (starts its own
   token-auth Ray head on loopback and stops it at the end). The engine runs in its own process
   next to the replica, as deployed (``--engine-in-process``: inside the replica's process).
   The load client is ``aiohttp`` (a Ray Serve dependency): it shares the 2 cores with proxy and
   replica, and costs ~0.5 ms CPU per request where one ``httpx.AsyncClient`` with a
   32-connection pool costs 3-4 ms plus O(pool) scheduling work per request (encode/httpx#3215);
   ``--client httpx`` measures with the latter.
   Per level it also prints the client's own CPU per request.

Prints requests/s and p50/p99 latency per level, the load average, and the ratios the serving
issue targets (conc 32 >= 6x sequential rps; conc 1 p50 within +25 ms of in-process).

    python benchmarks/serve_throughput.py [--tier engine|http|both] [--client aiohttp|httpx] [--json out.json]
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
from dataclasses import asdict, dataclass, field
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
    client_cpu_ms: float
    """The load client's CPU per request (this process; 0 where not measured)."""


@dataclass
class Sample:
    """Raw measurements: per-request latencies and the wall time they took together."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    client_cpu: float = 0.0
    """CPU seconds this process (the load client) spent while the requests ran (HTTP levels)."""

    def add(self, other: Sample) -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.client_cpu += other.client_cpu


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize(name: str, concurrency: int, sample: Sample, max_tokens: int) -> Level:
    latencies, seconds = sample.latencies, sample.seconds
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
        client_cpu_ms=1000 * sample.client_cpu / n,
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

    def batched(self, count: int) -> Sample:
        """One left-padded ``generate`` call over ``count`` prompts: the static-batching ceiling."""
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
        started = time.perf_counter()
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(
                **batch,
                max_new_tokens=self.max_tokens,
                min_new_tokens=self.max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        seconds = time.perf_counter() - started
        return Sample([seconds] * count, seconds)

    def block(self, requests: int) -> Sample:
        started = time.perf_counter()
        latencies = [self.one(PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
        return Sample(latencies, time.perf_counter() - started)


class Client:
    """The HTTP load client: ``aiohttp`` (default) or ``httpx`` (one client, one connection pool)."""

    def __init__(self, kind: str, url: str, connections: int) -> None:
        self.kind, self.url, self.connections = kind, url, connections
        self._session: Any = None

    async def __aenter__(self) -> Client:
        if self.kind == "aiohttp":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.connections)
            timeout = aiohttp.ClientTimeout(total=120)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        else:
            import httpx

            limits = httpx.Limits(
                max_connections=self.connections, max_keepalive_connections=self.connections
            )
            self._session = httpx.AsyncClient(timeout=120, limits=limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.kind == "aiohttp":
            await self._session.close()
        else:
            await self._session.aclose()

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions; the parsed JSON answer (raises on a non-2xx status)."""
        url = f"{self.url}/v1/completions"
        if self.kind == "aiohttp":
            async with self._session.post(url, json=body) as response:
                response.raise_for_status()
                answer: dict[str, Any] = await response.json()
                return answer
        response = await self._session.post(url, json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


async def paired_conc1(
    baseline: Baseline, url: str, requests: int, model: str, kind: str
) -> tuple[Sample, Sample]:
    """Alternate one in-process generate and one HTTP request, so load drift on a shared box hits both."""
    local: list[float] = []
    remote: list[float] = []
    body = {"model": model, "max_tokens": baseline.max_tokens, "temperature": 0, "ignore_eos": True}
    async with Client(kind, url, 1) as http:
        for i in range(requests + 2):
            prompt = PROMPTS[i % len(PROMPTS)]
            local_s = baseline.one(prompt)
            started = time.perf_counter()
            await http.complete({**body, "prompt": prompt})
            remote_s = time.perf_counter() - started
            if i >= 2:  # the first pair warms up the connection
                local.append(local_s)
                remote.append(remote_s)
    return Sample(local, sum(local)), Sample(remote, sum(remote))


async def http_level(
    url: str, concurrency: int, requests: int, max_tokens: int, model: str, kind: str
) -> Sample:
    """Closed-loop load: ``concurrency`` clients share ``requests`` requests; all must succeed."""
    latencies: list[float] = []

    async def client(http: Client, todo: Iterator[int], record: bool) -> None:
        for i in todo:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
            body |= {"temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            answer = await http.complete(body)
            if record:
                latencies.append(time.perf_counter() - t0)
            assert answer["usage"]["completion_tokens"] == max_tokens

    async with Client(kind, url, concurrency) as http:
        warmup = iter(range(concurrency))
        await asyncio.gather(*(client(http, warmup, False) for _ in range(concurrency)))
        todo = iter(range(requests))
        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(http, todo, True) for _ in range(concurrency)))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Sample(latencies, seconds, cpu)


class EngineUnderTest:
    """The transformers engine in this process, driven like a client would (tokenize, submit, read)."""

    def __init__(self, model_dir: Path, max_num_seqs: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmray_workloads.serve.engine import TransformersEngine

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.engine = TransformersEngine(
            model, tokenizer, AutoTokenizer.from_pretrained(model_dir), max_num_seqs=max_num_seqs
        )

    async def one(self, prompt: str, max_tokens: int) -> float:
        from llmray_workloads.serve.engine import SamplingParams

        started = time.perf_counter()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        last = None
        async for chunk in self.engine.submit(self.engine.encode(prompt), params, stream=False):
            last = chunk
        assert last is not None and last.completion_tokens == max_tokens
        return time.perf_counter() - started


async def engine_paired_conc1(
    baseline: Baseline, eng: EngineUnderTest, requests: int
) -> tuple[Sample, Sample]:
    """Alternate one in-process generate and one engine request (load drift hits both)."""
    local: list[float] = []
    remote: list[float] = []
    for i in range(requests + 2):
        prompt = PROMPTS[i % len(PROMPTS)]
        local_s = baseline.one(prompt)
        remote_s = await eng.one(prompt, baseline.max_tokens)
        if i >= 2:
            local.append(local_s)
            remote.append(remote_s)
    return Sample(local, sum(local)), Sample(remote, sum(remote))


async def engine_level(eng: EngineUnderTest, concurrency: int, requests: int, max_tokens: int) -> Sample:
    """Closed-loop load on the engine: ``concurrency`` clients share ``requests`` requests."""
    latencies: list[float] = []

    async def client(todo: Iterator[int], record: bool) -> None:
        for i in todo:
            latency = await eng.one(PROMPTS[i % len(PROMPTS)], max_tokens)
            if record:
                latencies.append(latency)

    warmup = iter(range(concurrency))
    await asyncio.gather(*(client(warmup, False) for _ in range(concurrency)))
    todo = iter(range(requests))
    started = time.perf_counter()
    await asyncio.gather(*(client(todo, True) for _ in range(concurrency)))
    return Sample(latencies, time.perf_counter() - started)


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
    parser.add_argument(
        "--requests",
        type=int,
        default=16,
        help="Requests per baseline block and round; a loaded level runs max(2x this, 4x its concurrency).",
    )
    parser.add_argument("--rounds", type=int, default=4, help="Rounds; every round measures every level.")
    parser.add_argument(
        "--cpus", default="1", help="CPUs per replica; the baseline uses as many torch threads."
    )
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument(
        "--client", choices=("aiohttp", "httpx"), default="aiohttp", help="HTTP load client (tier http)."
    )
    parser.add_argument(
        "--engine-in-process",
        action="store_true",
        help="Tier http: run the engine inside the Serve replica's process (default: its own process).",
    )
    parser.add_argument(
        "--tier", choices=("engine", "http", "both"), default="both", help="engine: in-process, no Ray."
    )
    ns = parser.parse_args(argv)

    from llmray_workloads.serve.config import parse_quantity
    from llmray_workloads.tiny import build_tiny_model

    threads = max(1, round(parse_quantity(ns.cpus)))
    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "llmray-bench-tiny")
    baseline = Baseline(model_dir, ns.max_tokens, threads)
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    if ns.tier in ("engine", "both"):
        results["engine"] = report("engine", run_engine(baseline, model_dir, ns), ns, model_dir)
    if ns.tier in ("http", "both"):
        results["http"] = report("serve http", run_http(baseline, model_dir, ns), ns, model_dir)
    load_after = os.getloadavg()
    print(f"\nload average (1/5/15 min): before {fmt_load(load_before)}, after {fmt_load(load_after)}")
    print(f"cpu cores: {os.cpu_count()}")
    if ns.json:
        results["loadavg"] = {"before": load_before, "after": load_after}
        ns.json.write_text(json.dumps(results, indent=2))
    return 0


LEVELS = (1, 8, 32)


def level_requests(requests: int, concurrency: int) -> int:
    """Requests per round of a loaded level: at least 4x its concurrency, so the closed loop's
    ramp-down (the last requests finishing with fewer in flight) is at most a quarter of it."""
    return max(2 * requests, 4 * concurrency)


Totals = dict[int, tuple[Sample, Sample]]


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def run_engine(baseline: Baseline, model_dir: Path, ns: argparse.Namespace) -> Totals:
    """Engine tier: every round measures every level against a baseline block right before it."""
    eng = EngineUnderTest(model_dir, ns.max_num_seqs)
    totals = {c: (Sample(), Sample()) for c in LEVELS}
    ceiling = Sample()
    try:
        for _ in range(ns.rounds):
            local_s, remote_s = asyncio.run(engine_paired_conc1(baseline, eng, ns.requests))
            totals[1][0].add(local_s)
            totals[1][1].add(remote_s)
            for concurrency in LEVELS[1:]:
                count = level_requests(ns.requests, concurrency)
                totals[concurrency][0].add(baseline.block(ns.requests))
                totals[concurrency][1].add(asyncio.run(engine_level(eng, concurrency, count, ns.max_tokens)))
            for _ in range(4):
                ceiling.add(baseline.batched(32))
    finally:
        eng.engine.shutdown()
    ratio = (len(ceiling.latencies) / ceiling.seconds) / (
        len(totals[32][0].latencies) / totals[32][0].seconds
    )
    print(f"\nceiling: one batched generate of 32 prompts = {ratio:.2f}x the sequential req/s")
    return totals


def run_http(baseline: Baseline, model_dir: Path, ns: argparse.Namespace) -> Totals:
    """HTTP tier: the engine behind Ray Serve on a local loopback Ray head."""
    from tests.ray_cluster import start_local_ray, stop_local_ray

    from llmray_workloads.serve.engine_process import IN_PROCESS_ENV

    # Ray starts workers (hence Serve replicas) at nice 15; the in-process side runs at nice 0. On a
    # shared machine that alone skews the comparison, so this benchmark's own cluster runs them at 0.
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 - Ray reads this exact name
    if ns.engine_in_process:  # the replica's own process, as before the engine process existed
        os.environ[IN_PROCESS_ENV] = "1"
    local = start_local_ray(num_cpus=8)
    os.environ.update(local.env)  # before ray is imported: it reads RAY_AUTH_MODE once
    totals = {c: (Sample(), Sample()) for c in LEVELS}
    try:
        url = deploy(local, model_dir, ns.cpus, ns.max_num_seqs)
        for _ in range(ns.rounds):  # alternate sides and levels so load drift hits both alike
            local_s, remote_s = asyncio.run(paired_conc1(baseline, url, ns.requests, "tiny", ns.client))
            totals[1][0].add(local_s)
            totals[1][1].add(remote_s)
            for concurrency in LEVELS[1:]:
                count = level_requests(ns.requests, concurrency)
                totals[concurrency][0].add(baseline.block(ns.requests))
                totals[concurrency][1].add(
                    asyncio.run(http_level(url, concurrency, count, ns.max_tokens, "tiny", ns.client))
                )
    finally:
        import ray

        ray.shutdown()
        stop_local_ray(local)
    return totals


def report(tier: str, totals: Totals, ns: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    pairs = [
        (
            summarize("in-process sequential", 1, totals[c][0], ns.max_tokens),
            summarize(f"{tier} conc={c}", c, totals[c][1], ns.max_tokens),
        )
        for c in LEVELS
    ]
    print(f"\n[{tier}] model: tiny Llama ({model_dir}), max_tokens={ns.max_tokens}, cpus={ns.cpus}")
    print(f"{ns.rounds} rounds; each level vs the in-process blocks measured right before it")
    if tier != "engine":
        print(f"load client: {ns.client}; 'client cpu': its CPU ms per request (same cores as the server)")
    header = f"{'level':<24}{'reqs':>6}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x seq':>7}"
    print(header + ("" if tier == "engine" else f"{'client cpu':>12}"))
    for base, level in pairs:
        for row in (base, level):
            cpu = f"{row.client_cpu_ms:>12.2f}" if row is level and row.client_cpu_ms else ""
            print(
                f"{row.name:<24}{row.requests:>6}{row.rps:>9.1f}{row.tokens_per_s:>9.0f}"
                f"{row.p50_ms:>9.1f}{row.p99_ms:>9.1f}{row.rps / base.rps:>7.2f}{cpu}"
            )
    speedup = pairs[2][1].rps / pairs[2][0].rps
    overhead = pairs[0][1].p50_ms - pairs[0][0].p50_ms
    verdict = "OK" if speedup >= 6 else "MISS"
    print(f"[{tier}] conc 32 vs sequential: {speedup:.2f}x rps (target >= 6x) {verdict}")
    verdict = "OK" if overhead <= 25 else "MISS"
    print(f"[{tier}] conc 1 p50 overhead: {overhead:+.1f} ms (target <= +25 ms) {verdict}")
    rows = [asdict(row) for pair in pairs for row in pair]
    return {"levels": rows, "speedup_32": speedup, "overhead_ms": overhead, "client": ns.client}


if __name__ == "__main__":
    raise SystemExit(main())
