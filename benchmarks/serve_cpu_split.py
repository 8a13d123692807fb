"""Where the CPU goes when Ray Serve answers at concurrency 32: per process, in ms per request.

Deploys the same app as ``serve_throughput.py --tier http`` (tiny model, one replica, one proxy,
a loopback token-auth Ray head of its own), warms up, then drives ``--requests`` closed-loop
requests with the same ``aiohttp`` client and reads ``/proc/<pid>/stat`` of the replica, its
engine process (absent with ``--engine-in-process``) and the proxy before and after. Prints the
steady-state requests/s and each process's CPU per request, so layouts can be compared side by
side (run it alternately with and without ``--engine-in-process``).

    python benchmarks/serve_cpu_split.py [--requests 2400] [--concurrency 32] [--engine-in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_throughput as st

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def find(pattern: str) -> list[int]:
    """Pids whose command line contains ``pattern``."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if pattern in line]


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--requests", type=int, default=2400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine-in-process", action="store_true")
    ns = parser.parse_args(argv)

    from tests.ray_cluster import start_local_ray, stop_local_ray

    from llmray_workloads.serve.engine_process import IN_PROCESS_ENV
    from llmray_workloads.tiny import build_tiny_model

    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "llmray-bench-tiny")
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 - Ray reads this exact name
    if ns.engine_in_process:
        os.environ[IN_PROCESS_ENV] = "1"
    local = start_local_ray(num_cpus=8)
    os.environ.update(local.env)
    try:
        url = st.deploy(local, model_dir, "1", 64)
        asyncio.run(st.http_level(url, ns.concurrency, 4 * ns.concurrency, ns.max_tokens, "tiny", "aiohttp"))
        processes = {
            "replica": find("ServeReplica:bench"),
            "engine process": find("llmray_workloads.serve.engine_process"),
            "proxy": find("ProxyActor"),
        }
        before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in processes.items()}
        sample = asyncio.run(
            st.http_level(url, ns.concurrency, ns.requests, ns.max_tokens, "tiny", "aiohttp")
        )
        after = {name: sum(cpu_seconds(p) for p in pids) for name, pids in processes.items()}
    finally:
        import ray

        ray.shutdown()
        stop_local_ray(local)
    count = len(sample.latencies)
    layout = "engine in the replica's process" if ns.engine_in_process else "engine in its own process"
    print(f"\n[serve cpu split] {layout}: {count} requests at concurrency {ns.concurrency}")
    print(f"requests/s: {count / sample.seconds:.1f}")
    print("CPU ms per request:")
    for name, pids in processes.items():
        if pids:
            print(f"  {name:15s} {1000 * (after[name] - before[name]) / count:6.2f}  (pids {pids})")
    print(f"  {'client':15s} {1000 * sample.client_cpu / count:6.2f}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpu cores: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
