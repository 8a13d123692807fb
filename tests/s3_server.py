"""A real S3-compatible server on loopback for tests: moto's server (``moto_server``), in its own venv.

Why moto: a well-kept, pure-Python implementation of the S3 REST API (the same wire protocol the
AWS SDK inside pyarrow speaks), on PyPI, started as a plain HTTP server on 127.0.0.1. It lives in
a venv of its own (``~/.cache/llmray/moto-<version>``) because moto needs botocore, which pins
``python-dateutil<3``, while the kubernetes client of the project's venv needs ``>=3``: the two
cannot share one environment, and a separate server process is what a real store is anyway.

``python -m tests.s3_server`` installs it (``make test`` does); :func:`start_s3_server` also
installs it on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.ray_cluster import LOOPBACK, free_port
from tests.waiting import wait_for

MOTO_VERSION = "5.2.5"
#: moto[s3,server] and everything it pulls in, pinned (installed with --no-deps).
REQUIREMENTS = Path(__file__).with_name("s3-server-requirements.txt")
ACCESS_KEY, SECRET_KEY, REGION = "llmray-test-key", "llmray-test-secret", "us-east-1"


def moto_venv() -> Path:
    """The server's venv; named after the pinned set, so a change of pins gets a fresh one."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmray"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return root / f"moto-{MOTO_VERSION}-{digest}"


def moto_server_bin() -> Path:
    """The ``moto_server`` executable, installed into its own venv when missing."""
    venv = moto_venv()
    binary, done = venv / "bin" / "moto_server", venv / ".installed"
    if done.is_file() and binary.is_file():  # the stamp: an interrupted install is redone
        return binary
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "-r", str(REQUIREMENTS)],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    done.touch()
    return binary


@dataclass
class S3Server:
    """A running moto S3 server and the environment a Ray pod would get from spec.objectStorage."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


def s3_env(endpoint: str) -> dict[str, str]:
    """What the operator exports to the pods (Secret keys, endpoint, region).

    AWS_EC2_METADATA_DISABLED keeps the SDK from probing the instance metadata address: tests only
    talk to loopback.
    """
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def start_s3_server(log_dir: Path) -> S3Server:
    """Start ``moto_server`` on a free loopback port and wait until it answers."""
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    log = log_dir / "moto.log"
    out = log.open("wb")
    process = subprocess.Popen(
        [str(moto_server_bin()), "-H", LOOPBACK, "-p", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited {process.returncode}: {log.read_text()[-2000:]}")
        return httpx.get(f"{endpoint}/", timeout=2).status_code < 500

    try:
        wait_for(up, timeout=60, what="the S3 server to answer", interval=0.2)
    except Exception:
        stop_s3_server(process)
        raise
    return S3Server(endpoint, process, log, s3_env(endpoint))


def stop_s3_server(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def s3_server(log_dir: Path) -> Iterator[S3Server]:
    server = start_s3_server(log_dir)
    try:
        yield server
    finally:
        stop_s3_server(server.process)


def make_bucket(server: S3Server, bucket: str) -> None:
    """Create a bucket (the workloads never create buckets: an operator's user brings them)."""
    from pyarrow import fs as pafs

    pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        endpoint_override=server.endpoint.split("://", 1)[1],
        scheme="http",
        region=REGION,
        allow_bucket_creation=True,
    ).create_dir(bucket)


if __name__ == "__main__":
    print(moto_server_bin())
