"""The kind tier: the real path a user takes, on a real single-node kind cluster on this machine.

``tests/kind/kind.sh up`` builds (once, cached) and starts the cluster, ``kind.sh images`` builds
the project's images and loads them into the node; then the chart is installed with ``helm install``
(the operator runs in a pod with in-cluster config, no address overrides) and the tests drive
``LLMTrainingJob``/``LLMDeployment`` objects whose Ray heads and workers are real pods.

Network: the tests talk to 127.0.0.1 only — the kind API server's port mapping, the serve
NodePort's port mapping (``LLMRAY_KIND_SERVE_PORT``, default 18000) and ``kubectl port-forward``.
The cluster is left running at the end when ``LLMRAY_KEEP_KIND=1`` (faster reruns); otherwise the
session's last step is ``kind.sh down``, which also stops the dockerd it started.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.demo import shared_claim
from tests.kube import Kube
from tests.ray_cluster import free_port, port_open
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
KIND_SH = REPO / "tests" / "kind" / "kind.sh"
CHART = REPO / "charts" / "llmray"
RELEASE = "llmray"
OPERATOR_NS = "llmray-system"
NODE = "llmray-control-plane"
SHARED_HOST_DIR = "/var/lib/llmray/shared"
SERVE_NODE_PORT = 30800


def _run(cmd: list[str], *, timeout: float, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def docker_cli() -> str:
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


@dataclass
class Kind:
    """Handle on the kind cluster with the chart installed."""

    kube: Kube
    serve_port: int

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
        return self.kube.kubectl(*args, check=check, timeout=timeout, input=input).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, namespace: str, doc: dict[str, Any] | str) -> None:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
        self.kubectl("apply", "-n", namespace, "-f", "-", input=text)

    def helm(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return _run(
            [str(self.kube.bin_dir / "helm"), "--kubeconfig", str(self.kube.kubeconfig), *args],
            timeout=timeout,
            check=check,
        )

    def node_exec(self, *cmd: str, timeout: float = 60) -> str:
        """Run a command inside the kind node container (our own container on this machine)."""
        return _run([docker_cli(), "exec", NODE, *cmd], timeout=timeout)

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        data = self.json("get", "secret", "-n", namespace, name)["data"]
        return base64.b64decode(data[key]).decode()

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return list(self.json("get", "pods", "-n", namespace, "-l", selector)["items"])

    def custom(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.json("get", kind, "-n", namespace, name))

    @contextlib.contextmanager
    def port_forward(self, namespace: str, target: str, remote: int) -> Iterator[int]:
        """``kubectl port-forward`` on 127.0.0.1 to ``target`` (e.g. ``svc/x-head``); yields the port."""
        local = free_port()
        cmd = [
            str(self.kube.bin_dir / "kubectl"), "--kubeconfig", str(self.kube.kubeconfig),
            "port-forward", "-n", namespace, "--address", "127.0.0.1", target, f"{local}:{remote}",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(
                lambda: port_open(local) or proc.poll() is not None,
                timeout=30,
                what=f"port-forward {target}",
            )
            if proc.poll() is not None:
                raise AssertionError(f"port-forward exited: {proc.stderr.read() if proc.stderr else ''}")
            yield local
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def _kind_env() -> dict[str, str]:
    return dict(os.environ)


@pytest.fixture(scope="session")
def kind() -> Iterator[Kind]:
    """The kind cluster with the project's images loaded and the chart installed."""
    t0 = time.monotonic()
    out = _run(["bash", str(KIND_SH), "up"], timeout=3600)
    kubeconfig = Path(out.strip().splitlines()[-1].split("=", 1)[1])
    _run(["bash", str(KIND_SH), "images"], timeout=3600)
    env_line = _run(["bash", str(KIND_SH), "env"], timeout=30)
    bin_dir = Path(env_line.split("PATH=", 1)[1].split(":", 1)[0])
    kube = Kube(kubeconfig=kubeconfig, bin_dir=bin_dir)
    handle = Kind(kube=kube, serve_port=int(os.environ.get("LLMRAY_KIND_SERVE_PORT", "18000")))
    # One CoreDNS replica: the node has 2 CPUs and every request counts.
    handle.kubectl("-n", "kube-system", "scale", "deploy/coredns", "--replicas=1")
    # Leftovers of an interrupted run on a kept cluster (LLMRAY_KEEP_KIND=1).
    handle.kubectl("delete", "namespace", "-l", "llmray.io/test=kind", "--wait=true", timeout=300)
    handle.kubectl("delete", "pv", "-l", "llmray.io/test=kind", "--wait=false")
    handle.helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", check=False)
    handle.helm(
        "install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace", "--wait", "--timeout", "5m",
        "--set", "operator.logFormat=plain",
    )  # fmt: skip
    print(f"\n[kind] cluster + images + helm install in {time.monotonic() - t0:.0f}s")
    try:
        yield handle
    finally:
        if os.environ.get("LLMRAY_KEEP_KIND") != "1":
            _run(["bash", str(KIND_SH), "down"], timeout=600, check=False)


@pytest.fixture(scope="module")
def tenant(kind: Kind) -> Iterator[str]:
    """A namespace with a ReadWriteMany claim ``shared`` on a hostPath volume of the node."""
    ns = f"kind-{uuid.uuid4().hex[:6]}"
    kind.kubectl("create", "namespace", ns)
    kind.kubectl("label", "namespace", ns, "llmray.io/test=kind")
    sub = f"{SHARED_HOST_DIR}/{ns}"
    kind.node_exec("bash", "-c", f"mkdir -p {sub} && chmod 1777 {sub}")
    pv, pvc = shared_claim(ns, sub, labels={"llmray.io/test": "kind"})
    kind.apply(ns, pv)
    kind.apply(ns, pvc)
    try:
        yield ns
    finally:
        kind.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        kind.kubectl("delete", "pv", f"{ns}-shared", "--wait=false", check=False)
