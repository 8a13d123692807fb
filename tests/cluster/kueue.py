"""pytest plugin: a real Kueue manager against the test control plane (registered in tests/conftest.py).

The manager is the released Kueue (``KUEUE_VERSION`` in versions.env) built from its Go module by
``build.sh kueue``, which also copies the module's CRDs and webhook manifests next to the binary, so
what runs and what is installed come from the same module. It runs as a subprocess on this host,
every listener on 127.0.0.1 (webhook server, health probes, metrics; the visibility API server, which
only binds all interfaces, is switched off by its feature gate).

Webhooks are real: Kueue's internal cert management is off, the fixture makes a CA and a serving
certificate for 127.0.0.1, puts them in the manager's cert dir, and installs Kueue's admission
webhooks and CRD conversion webhooks rewritten to ``https://127.0.0.1:<port>/<path>`` with that CA
(the API server runs on the host, so it reaches loopback). failurePolicy stays as shipped (Fail).
Only the webhooks for Kueue's own API group are installed: the job-framework ones (pods,
deployments, Jobs, ...) would route every pod of the shared test cluster through Kueue while no
framework is enabled (the manager serves them as no-ops then).

Kueue with internal cert management off reads a metrics certificate from the fixed path
``/etc/kueue/metrics/certs`` (cmd/kueue/main.go). When that is absent the manager runs in a private
mount namespace (``unshare``) where a read-only overlay adds the fixture's certificate at that path;
nothing on the host changes.

Fixtures
- ``kueue_manager`` (session): install, start, wait until webhooks answer; at the end delete every
  Kueue object (while the manager still runs, so it can drop its finalizers), stop the manager,
  remove the webhook configurations and CRDs.
- ``kueue`` (function): the same :class:`Kueue`; prints the manager log of the test's span on
  teardown (pytest shows it for failed tests).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import Kube, KubectlError, WaitTimeout, wait_for
from tests.ray_cluster import serving_ok, stop_process

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "tests" / "cluster" / "build.sh"

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"  # served and stored by v0.17 (v1beta1 is still served, converted by webhook)
NAMESPACE = "kueue-system"
MUTATING = "kueue-mutating-webhook-configuration"
VALIDATING = "kueue-validating-webhook-configuration"
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")  # fixed in cmd/kueue/main.go
# Deleted in this order at teardown: users of quota first, so the manager can release the rest.
NAMESPACED_KINDS = ("workloads", "localqueues")
CLUSTER_KINDS = (
    "clusterqueues",
    "cohorts",
    "resourceflavors",
    "workloadpriorityclasses",
    "admissionchecks",
    "topologies",
    "multikueueconfigs",
    "multikueueclusters",
    "provisioningrequestconfigs",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_kueue() -> Path:
    """Build (first time) or locate the Kueue folder: ``kueue``, ``crds/``, ``webhook-manifests.yaml``."""
    proc = subprocess.run(["bash", str(BUILD_SH), "kueue"], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"build.sh kueue failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


def make_certs(out: Path) -> bytes:
    """Make a CA and a serving certificate for 127.0.0.1 (``out``/tls.crt, tls.key); return the CA PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmray-test-kueue-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (out / "tls.key").write_bytes(key_pem)
    os.chmod(out / "tls.key", 0o600)
    return ca.public_bytes(serialization.Encoding.PEM)


def crds_with_conversion(kueue_dir: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs, with the conversion webhook enabled where Kueue's kustomization enables it
    (crds/kustomization.yaml lists patches/webhook_in_*.yaml), pointed at ``url``."""
    crd_dir = kueue_dir / "crds"
    kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    conversion: dict[str, dict[str, Any]] = {}
    for patch in kustomization.get("patches") or []:
        doc = yaml.safe_load((crd_dir / patch["path"]).read_text())
        conv = (doc.get("spec") or {}).get("conversion")
        if conv and conv.get("strategy") == "Webhook":
            conversion[doc["metadata"]["name"]] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": url, "caBundle": ca_bundle},
                    "conversionReviewVersions": conv["webhook"]["conversionReviewVersions"],
                },
            }
    crds = [yaml.safe_load(p.read_text()) for p in sorted((crd_dir / "bases").glob("*.yaml"))]
    for crd in crds:
        if crd["metadata"]["name"] in conversion:
            crd["spec"]["conversion"] = conversion[crd["metadata"]["name"]]
    return crds


def webhook_configurations(kueue_dir: Path, base_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's admission webhooks for its own API group, each pointed at ``base_url + path``."""
    out = []
    for doc in yaml.safe_load_all((kueue_dir / "webhook-manifests.yaml").read_text()):
        if not doc:
            continue
        hooks = []
        for hook in doc["webhooks"]:
            if not any(GROUP in rule.get("apiGroups", []) for rule in hook.get("rules", [])):
                continue
            path = hook["clientConfig"]["service"]["path"]
            hooks.append({**hook, "clientConfig": {"url": base_url + path, "caBundle": ca_bundle}})
        name = {"MutatingWebhookConfiguration": MUTATING, "ValidatingWebhookConfiguration": VALIDATING}
        out.append({**doc, "metadata": {"name": name[doc["kind"]]}, "webhooks": hooks})
    return out


def manager_config(health: int, metrics: int, webhook: int, cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics}"},
        "webhook": {"host": "127.0.0.1", "port": webhook, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        # VisibilityOnDemand starts an API server on 0.0.0.0:8082; we need none of it.
        "featureGates": {"VisibilityOnDemand": False},
        # No built-in framework: llmray creates Workloads itself (owned by its LLMTrainingJob).
        "integrations": {"frameworks": []},
    }


@dataclass
class Kueue:
    """A running Kueue manager; ``kubectl``/API access goes through :attr:`kube`."""

    kube: Kube
    kueue_dir: Path
    workdir: Path
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    webhook_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "kueue.log"

    def log_tail(self, lines: int = 80, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    # --- lifecycle -------------------------------------------------------------------------------
    def install_and_start(self) -> Kueue:
        cert_dir = self.workdir / "certs"
        ca_pem = make_certs(cert_dir)
        ca_bundle = base64.b64encode(ca_pem).decode()
        base_url = f"https://127.0.0.1:{self.webhook_port}"

        self.kube.kubectl("create", "namespace", NAMESPACE, check=False)
        crds = crds_with_conversion(self.kueue_dir, base_url + "/convert", ca_bundle)
        self._apply(crds)
        self.kube.wait_established(*(c["metadata"]["name"] for c in crds))

        config_path = self.workdir / "config.yaml"
        config = manager_config(self.health_port, self.metrics_port, self.webhook_port, cert_dir)
        config_path.write_text(yaml.safe_dump(config))
        self._start(config_path, cert_dir)
        wait_for(self._ready, timeout=120, what=f"kueue /readyz (log: {self.log_path})")

        self._apply(webhook_configurations(self.kueue_dir, base_url, ca_bundle))
        wait_for(self._webhooks_answer, timeout=60, what="kueue's mutating webhook (dry-run ResourceFlavor)")
        return self

    def _apply(self, docs: list[dict[str, Any]]) -> None:
        self.kube.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=llmray-tests-kueue", "-f", "-",
            input=yaml.safe_dump_all(docs),
        )  # fmt: skip

    def _start(self, config_path: Path, cert_dir: Path) -> None:
        cmd = [
            str(self.kueue_dir / "kueue"),
            f"--config={config_path}",
            f"--kubeconfig={self.kube.kubeconfig}",
            "--zap-log-level=2",
        ]
        if not ((METRICS_CERT_DIR / "tls.crt").is_file() and (METRICS_CERT_DIR / "tls.key").is_file()):
            cmd = self._in_private_etc(cmd, cert_dir)
        log = self.log_path.open("ab")
        log.write(f"===== {' '.join(cmd)}\n".encode())
        log.flush()
        env = {**os.environ, "KUBECONFIG": str(self.kube.kubeconfig)}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env)
        log.close()

    def _in_private_etc(self, cmd: list[str], cert_dir: Path) -> list[str]:
        """Wrap ``cmd`` so it sees ``/etc/kueue/metrics/certs`` (our cert) through a read-only overlay
        on /etc in a mount namespace of its own: as root if allowed, else in a user namespace (the
        first of the two that works here; a container without CAP_SYS_ADMIN may allow neither)."""
        need = f"kueue needs {METRICS_CERT_DIR}/tls.{{crt,key}} (any valid pair) or a working `unshare`"
        if not shutil.which("unshare"):
            raise RuntimeError(f"{need}: unshare is missing")
        layer = self.workdir / "etc-layer"
        shutil.copytree(cert_dir, layer / "kueue" / "metrics" / "certs", dirs_exist_ok=True)
        script = 'mount -t overlay overlay -o "lowerdir=$0:/etc" /etc && exec "$@"'
        tries = [["--user", "--map-root-user"]]
        if os.geteuid() == 0:
            tries.insert(0, [])
        errors = []
        for userns in tries:
            wrap = ["unshare", *userns, "--mount", "--propagation", "private", "sh", "-c", script, str(layer)]
            probe = subprocess.run(
                [*wrap, "test", "-s", str(METRICS_CERT_DIR / "tls.crt")], capture_output=True, text=True
            )
            if probe.returncode == 0:
                return [*wrap, *cmd]
            errors.append(f"{' '.join(wrap[:-4])}: {probe.stderr.strip() or probe.returncode}")
        raise RuntimeError(f"{need}; tried: {errors}")

    def _ready(self) -> bool:
        return serving_ok(self.proc, "kueue", f"http://127.0.0.1:{self.health_port}/readyz", self.log_tail)

    def _webhooks_answer(self) -> bool:
        """A server-side dry run goes through admission: Kueue's ResourceFlavor webhook adds its finalizer."""
        self._ready()  # fail fast when the manager died
        flavor = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": "probe"}}
        proc = self.kube.kubectl(
            "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(flavor), check=False
        )
        if proc.returncode != 0:
            return False
        return f"{GROUP}/resource-in-use" in json.loads(proc.stdout)["metadata"].get("finalizers", [])

    def teardown(self) -> None:
        """Delete Kueue objects (manager still running), stop the manager, uninstall."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self._delete_objects(wait=60)
        finally:
            self.stop()
            self.kube.kubectl(
                "delete", f"mutatingwebhookconfiguration/{MUTATING}",
                f"validatingwebhookconfiguration/{VALIDATING}", "--ignore-not-found", check=False,
            )  # fmt: skip
            try:
                self._delete_objects(wait=0, strip_finalizers=True)  # whatever the manager left
            except KubectlError as exc:
                print(f"kueue teardown: {exc}")
            names = [
                yaml.safe_load(p.read_text())["metadata"]["name"]
                for p in (self.kueue_dir / "crds" / "bases").glob("*.yaml")
            ]
            self.kube.kubectl(
                "delete", "crd", *names, "--ignore-not-found", "--wait=true", "--timeout=60s", check=False
            )

    def _delete_objects(self, wait: float, strip_finalizers: bool = False) -> None:
        """Delete every Kueue object (one kubectl call per step); optionally drop finalizers first,
        for what a stopped manager can no longer release."""
        kinds = ",".join(f"{k}.{GROUP}" for k in (*NAMESPACED_KINDS, *CLUSTER_KINDS))

        def listed() -> list[dict[str, Any]]:
            return list(json.loads(self.kube.kubectl("get", kinds, "-A", "-o", "json").stdout)["items"])

        if strip_finalizers:
            for item in listed():
                meta = item["metadata"]
                if meta.get("finalizers"):
                    ns = ["-n", meta["namespace"]] if meta.get("namespace") else []
                    self.kube.kubectl(  # kind in lower case is the CRDs' singular name
                        "patch", f"{item['kind'].lower()}.{GROUP}", meta["name"], *ns, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}', check=False,
                    )  # fmt: skip
        self.kube.kubectl("delete", kinds, "--all", "-A", "--wait=false", check=False)
        if wait:
            try:
                wait_for(lambda: not listed(), timeout=wait, what="every Kueue object deleted")
            except WaitTimeout as exc:
                left = [
                    f"{i['kind']} {i['metadata'].get('namespace', '')}/{i['metadata']['name']}"
                    for i in listed()
                ]
                raise WaitTimeout(f"{exc}; still there (finalizers?): {left}") from None

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="session")
def kueue_manager(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    handle = Kueue(kube=kube, kueue_dir=build_kueue(), workdir=tmp_path_factory.mktemp("kueue"))
    try:
        handle.install_and_start()
    except BaseException:
        print(f"--- kueue log {handle.log_path}\n{handle.log_tail(200)}")
        handle.teardown()
        raise
    try:
        yield handle
    finally:
        handle.teardown()


@pytest.fixture
def kueue(kueue_manager: Kueue) -> Iterator[Kueue]:
    start = kueue_manager.log_size()
    yield kueue_manager
    # pytest shows teardown output only for failed tests
    tail = kueue_manager.log_tail(150, since=start)
    print(f"--- kueue log during the test ({kueue_manager.log_path})\n{tail}")


__all__ = ["GROUP", "VERSION", "KubectlError", "Kueue", "free_port"]
