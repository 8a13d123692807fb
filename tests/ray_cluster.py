"""A real local Ray cluster for tests: one head on loopback with token auth, started per session.

``ray start --block`` runs in the foreground of a child process; terminating that process tears
down exactly this cluster (``ray stop`` would kill every Ray process on the machine, including other
test sessions'). Ports are picked free so parallel sessions do not collide.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.waiting import restore_environ, wait_for

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def serving_ok(proc: subprocess.Popen[Any] | None, what: str, url: str, log_tail: Callable[[], str]) -> bool:
    """Whether a test-started process still runs and answers 200 on its loopback ``url`` now.

    A process that exited raises at once with its log tail, so a wait on this fails fast."""
    if proc is None or proc.poll() is not None:
        raise RuntimeError(f"{what} exited ({proc and proc.returncode}):\n{log_tail()}")
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 30) -> None:
    """SIGTERM a test-started process and wait; SIGKILL it if it does not exit within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def port_open(port: int) -> bool:
    """Whether something accepts connections on loopback ``port`` now."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


@dataclass
class LocalRay:
    """Handle on a running local Ray head."""

    gcs_address: str
    dashboard_url: str
    token: str
    temp_dir: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0
    """Port of the head's metrics agent (Prometheus text, on 127.0.0.1)."""

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def ray_env(token: str) -> dict[str, str]:
    """Environment for Ray processes and drivers of a token-auth cluster."""
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it Ray 2.60 ignores --node-ip-address=127.0.0.1.
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def start_local_ray(
    num_cpus: int = 8,
    extra_args: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    token: str | None = None,
) -> LocalRay:
    """Start a Ray head bound to loopback and wait until its dashboard answers.

    ``extra_env``: variables every Ray process gets, as a pod's environment would (e.g. S3 credentials).
    """
    token = token or secrets.token_hex(16)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    gcs_port, dash_port, metrics_port = free_port(), free_port(), free_port()
    # Workers export metrics to the agent every 2 s instead of 10 s: metric tests wait less.
    env = {**os.environ, **(extra_env or {}), **ray_env(token), "RAY_metrics_report_interval_ms": "2000"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={metrics_port}",
        f"--runtime-env-agent-port={free_port()}",
        *(extra_args or []),
    ]
    log = (temp_dir / "ray-start.log").open("wb")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard_url = f"http://{LOOPBACK}:{dash_port}"
    headers = {"Authorization": f"Bearer {token}"}

    def dashboard_up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(
                f"ray start exited {process.returncode}: {(temp_dir / 'ray-start.log').read_text()[-2000:]}"
            )
        return httpx.get(f"{dashboard_url}/api/version", headers=headers, timeout=2).status_code == 200

    try:
        wait_for(dashboard_up, timeout=120, what="the Ray dashboard to answer", interval=0.5)
    except Exception:
        stop_local_ray_process(process)
        raise
    return LocalRay(
        f"{LOOPBACK}:{gcs_port}", dashboard_url, token, temp_dir, process, ray_env(token), metrics_port
    )


_WORKER_NODE = """
import signal, sys
import ray._private.node, ray._private.parameter
cpus, gcs, agent, agent_grpc, metrics, env_agent = sys.argv[1:7]
params = ray._private.parameter.RayParams(
    gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=int(cpus), num_gpus=0,
    include_log_monitor=False, node_manager_port=0, min_worker_port=0, max_worker_port=0,
    dashboard_agent_listen_port=int(agent), metrics_agent_port=int(agent_grpc),
    metrics_export_port=int(metrics), runtime_env_agent_port=int(env_agent),
)
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("node up", node.node_id, flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
node.kill_all_processes(check_alive=False, allow_graceful=True)
"""


def start_local_worker(
    head: LocalRay, num_cpus: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Join a second Ray node on 127.0.0.1 to ``head`` (own free ports; ``env`` for its processes).

    Started like ``ray.cluster_utils.Cluster.add_node`` does (a ``Node`` in a process of its own):
    ``ray start`` refuses a worker node while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which keeps
    every address on loopback. Stop it with :func:`stop_local_ray_process`; the caller waits for
    it to show up as alive.
    """
    ports = [str(free_port()) for _ in range(4)]
    log = (head.temp_dir / f"ray-worker-{ports[0]}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER_NODE, str(num_cpus), head.gcs_address, *ports],
        env={**os.environ, **head.env, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (Ray's actors get own process groups, not sessions)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def stop_local_ray_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a ``ray start --block`` session and every process in it."""
    sid = process.pid  # start_new_session=True: the pid is the session id
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def stop_local_ray(ray: LocalRay) -> None:
    stop_local_ray_process(ray.process)
    if not os.environ.get("LLMRAY_KEEP_RAY_LOGS"):
        shutil.rmtree(ray.temp_dir, ignore_errors=True)


def local_ray_session() -> Iterator[LocalRay]:
    """Generator for a session fixture; exports the driver env so ray.init() finds the cluster."""
    ray = start_local_ray()
    saved = {k: os.environ.get(k) for k in [*ray.env, "RAY_ADDRESS"]}
    os.environ.update(ray.env)
    os.environ["RAY_ADDRESS"] = ray.gcs_address
    try:
        yield ray
    finally:
        restore_environ(saved)
        stop_local_ray(ray)


MAX_METRICS_BYTES = 32 * 1024 * 1024


def scrape_metrics(url: str, prefix: str = "ray_llmray_") -> list[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` of a Prometheus text endpoint whose names start with ``prefix``.

    Parsed with ``prometheus_client``'s own parser; the body is size-capped and the call has a deadline.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.stream("GET", url, timeout=10) as response:
        response.raise_for_status()
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_METRICS_BYTES:
                raise ValueError(f"{url}: metrics larger than {MAX_METRICS_BYTES} bytes")
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(body.decode())
        if family.name.startswith(prefix)
        for sample in family.samples
    ]


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``labels`` (None: no such sample)."""
    values = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(values) if values else None
