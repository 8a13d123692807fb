"""pytest plugin: the local Kubernetes control plane (tests/cluster/cluster.sh) as fixtures.

Fixtures
- ``kube`` (session): a :class:`Kube` handle on a running cluster. Reuses the cluster that
  ``$KUBECONFIG`` (or ``.cache/cluster/kubeconfig``) points at when it answers; otherwise starts one
  with ``cluster.sh up`` and tears it down at session end (``LLMRAY_KEEP_CLUSTER=1`` keeps it).
  While the session runs, the pinned bin dir (kubectl, helm, ...) is first on ``PATH`` and
  ``KUBECONFIG`` names the cluster, so subprocesses and in-process clients (Kopf) find both.
  If the cluster cannot start, the fixture raises: tests error, they are never skipped.
- ``namespace`` (function): a fresh namespace whose ``default`` ServiceAccount exists (so pods are
  admitted); deleted afterwards without waiting for the deletion to finish.

Helpers: :func:`apply_yaml`, and ``wait_for`` / ``async_wait_for`` re-exported from tests.waiting.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.waiting import WaitTimeout, async_wait_for, restore_environ, wait_for

__all__ = ["Kube", "KubectlError", "WaitTimeout", "apply_yaml", "async_wait_for", "wait_for"]

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "cluster" / "cluster.sh"
BUILD_SH = REPO / "tests" / "cluster" / "build.sh"
TEST_NAMESPACE_LABEL = "llmray.io/test"


class KubectlError(RuntimeError):
    """A kubectl command failed; carries the command line, exit code, stdout and stderr."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        super().__init__(
            f"kubectl exited {proc.returncode}: {' '.join(map(str, proc.args))}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )


@dataclass
class Kube:
    """Handle on the test cluster."""

    kubeconfig: Path
    bin_dir: Path
    started_here: bool = False
    _api_client: Any = field(default=None, repr=False)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster; raise :class:`KubectlError` if it fails."""
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc)
        return proc

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until each CRD (``plural.group``) is Established.

        Not ``kubectl wait --for=condition=Established``: right after an apply the CRD may have no
        ``status.conditions`` yet, and kubectl then fails at once instead of waiting.
        """
        from tests.waiting import wait_for

        query = '{.status.conditions[?(@.type=="Established")].status}'
        for crd in crds:
            wait_for(
                lambda crd=crd: (
                    self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={query}", check=False).stdout.strip()
                    == "True"
                ),
                timeout=timeout,
                interval=0.2,
                what=f"CRD {crd} Established",
            )

    @property
    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` configured from :attr:`kubeconfig` (created once)."""
        if self._api_client is None:
            from kubernetes import config

            self._api_client = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api_client

    def reachable(self) -> bool:
        return _reachable(self.bin_dir, self.kubeconfig)


def _reachable(bin_dir: Path, kubeconfig: Path) -> bool:
    if not kubeconfig.is_file():
        return False
    try:
        proc = subprocess.run(
            [
                str(bin_dir / "kubectl"),
                "--kubeconfig",
                str(kubeconfig),
                "--request-timeout=5s",
                "get",
                "--raw=/readyz",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _run_script(*args: str) -> str:
    """Run a cluster script, return its stdout; raise with its whole output when it fails."""
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`bash {' '.join(args)}` failed with exit code {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc.stdout


def _bin_dir() -> Path:
    """Build (first time) or just locate the pinned binaries; build.sh prints the dir last."""
    lines = _run_script(str(BUILD_SH)).strip().splitlines()
    if not lines:
        raise RuntimeError("tests/cluster/build.sh printed no bin dir")
    return Path(lines[-1])


def _candidate_kubeconfigs() -> list[Path]:
    env = os.environ.get("KUBECONFIG", "")
    paths = [Path(p) for p in env.split(os.pathsep) if p] if env else []
    if len(paths) > 1:
        raise RuntimeError(f"KUBECONFIG lists several files ({env}); point it at one for the tests")
    own = Path(_run_script(str(CLUSTER_SH), "kubeconfig").strip())
    return [*paths, own]


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    bin_dir = _bin_dir()
    handle: Kube | None = None
    for candidate in _candidate_kubeconfigs():
        if _reachable(bin_dir, candidate):
            handle = Kube(kubeconfig=candidate.resolve(), bin_dir=bin_dir, started_here=False)
            break
    if handle is None:
        out = _run_script(str(CLUSTER_SH), "up")
        match = re.search(r"^export KUBECONFIG=(.+)$", out, re.MULTILINE)
        if not match:
            raise RuntimeError(f"cluster.sh up did not print the kubeconfig:\n{out}")
        handle = Kube(kubeconfig=Path(match.group(1).strip()), bin_dir=bin_dir, started_here=True)
        if not handle.reachable():
            raise RuntimeError(f"cluster.sh up finished but {handle.kubeconfig} does not answer")

    saved = {k: os.environ.get(k) for k in ("PATH", "KUBECONFIG")}
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["KUBECONFIG"] = str(handle.kubeconfig)
    try:
        yield handle
    finally:
        restore_environ(saved)
        if handle._api_client is not None:
            handle._api_client.close()
        if handle.started_here and os.environ.get("LLMRAY_KEEP_CLUSTER") != "1":
            _run_script(str(CLUSTER_SH), "down")


def _namespace_name(node_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube.api_client)
    name = _namespace_name(request.node.name)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={TEST_NAMESPACE_LABEL: "true"}))
    )
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=30,
        what=f"ServiceAccount default in namespace {name}",
    )
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise


def apply_yaml(
    kube: Kube, manifest: str | dict[str, Any] | list[dict[str, Any]], namespace: str | None = None
) -> list[dict[str, Any]]:
    """Server-side apply one or more objects (YAML text, possibly multi-document, a dict or a list
    of dicts) with kubectl; return the applied objects as the API server returned them."""
    if isinstance(manifest, str):
        docs = [d for d in yaml.safe_load_all(manifest) if d]
    elif isinstance(manifest, dict):
        docs = [manifest]
    else:
        docs = list(manifest)
    if not docs:
        raise ValueError("apply_yaml: nothing to apply")
    text = yaml.safe_dump_all(docs)
    args = [
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=llmray-tests",
        "-o",
        "yaml",
        "-f",
        "-",
    ]
    if namespace:
        args[1:1] = ["-n", namespace]
    out = kube.kubectl(*args, input=text).stdout
    result = yaml.safe_load(out)
    if result and result.get("kind") == "List":
        return list(result.get("items") or [])
    return [result] if result else []
