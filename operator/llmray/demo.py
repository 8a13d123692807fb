"""``make demo`` / ``python -m llmray.demo``: train the tiny model, serve it and chat with it.

Everything runs in the local sandbox (``llmray sandbox up``): a real control plane, the real operator
and a real Ray head on 127.0.0.1. Steps:

1. sandbox up (idempotent);
2. build the tiny model into ``/tmp/llmray/models/tiny`` and copy the bundled facts (made-up Q/A
   pairs) to ``/tmp/llmray/data/`` (the paths ``examples/training-tiny-cpu.yaml`` uses);
3. apply ``examples/training-tiny-cpu.yaml`` and show its live progress from the resource's status;
4. apply ``examples/deployment-from-training.yaml`` (serves that job's output) and wait for Ready;
5. ask the served model one of the facts with the ``openai`` client at ``status.endpoint`` (greedy)
   and compare its answer with the one it was trained on.

A second run finds everything in place and only asks the question again.

``--kind`` (``make kind-demo``) tells the same story on the kind cluster of ``tests/kind/kind.sh``:
the chart is installed with Helm, the Ray heads and workers are real pods of ``llmray/ray-runtime``
(which carries the tiny model and the facts), the job writes to a ReadWriteMany claim on the node, and
the question goes through the deployment's ``<name>-serve`` Service (a NodePort mapped to 127.0.0.1)
with an API key.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from llmray import sandbox

MODEL_DIR = Path("/tmp/llmray/models/tiny")
DATA_FILE = Path("/tmp/llmray/data/facts.jsonl")
TRAINING = "examples/training-tiny-cpu.yaml"
DEPLOYMENT = "examples/deployment-from-training.yaml"
console = Console()
Manifest = dict[str, Any]

KIND_NAMESPACE = "llmray-demo"
KIND_RELEASE = "llmray"
KIND_OPERATOR_NAMESPACE = "llmray-system"
KIND_SHARED_DIR = "/var/lib/llmray/shared/demo"  # created by kind.sh on the node, mode 1777
KIND_SERVE_NODE_PORT = 30800
# The kind node has 2 CPUs and the control plane asks for ~0.75 of them.
KIND_HEAD = {"resources": {"cpu": "300m", "memory": "3Gi"}}
KIND_WORKER = {"cpu": "250m", "memory": "2Gi"}


class DemoError(RuntimeError):
    """A stage did not finish; the message says where to look."""


@dataclass
class Target:
    """Where the story runs: the sandbox (simulated pods, one local Ray head) or kind (real pods)."""

    name: str
    repo: Path
    kubeconfig: Path
    kubectl: str
    namespace: str
    log_hint: str
    api_key: str = ""
    serve_url: str = ""  # the Serve endpoint as reached from this machine ("" = status.endpoint)
    explore: list[str] = field(default_factory=list)

    def run_kubectl(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [self.kubectl, "--kubeconfig", str(self.kubeconfig), *args],
            cwd=self.repo, input=stdin, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, doc: dict[str, Any]) -> None:
        self.run_kubectl("apply", "-n", self.namespace, "-f", "-", stdin=yaml.safe_dump(doc))


def _status(api: Any, namespace: str, plural: str, name: str) -> dict[str, Any]:
    obj = api.get_namespaced_custom_object("llmray.io", "v1alpha1", namespace, plural, name)
    return dict(obj.get("status") or {})


def _wait(check: Callable[[], bool], timeout: float, what: str, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}; {log}")
        time.sleep(1)


def _example(repo: Path, path: str) -> dict[str, Any]:
    return dict(yaml.safe_load((repo / path).read_text()))


def prepare_files(repo: Path) -> None:
    """The tiny model and the facts data at the paths the examples use."""
    from llmray_workloads.tiny import FACTS_FILE, build_tiny_model

    build_tiny_model(MODEL_DIR)
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "workloads" / "llmray_workloads" / "data" / FACTS_FILE, DATA_FILE)


def kind_manifests(
    training: dict[str, Any], deployment: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The examples as they run on the one-node kind cluster.

    Multi-pod training needs storage every pod shares, so the output goes to the ReadWriteMany claim
    ``shared``; requests shrink to fit 2 CPUs; the serve Service becomes the NodePort kind maps to
    127.0.0.1, behind an API key (a NodePort without one is refused by the CRD).
    """
    job = {**training, "spec": dict(training["spec"])}
    job["spec"]["output"] = {"uri": f"pvc://shared/{training['metadata']['name']}"}
    job["spec"]["workers"] = {**job["spec"]["workers"], "resources": KIND_WORKER}
    job["spec"]["head"] = KIND_HEAD
    dep = {**deployment, "spec": dict(deployment["spec"])}
    dep["spec"]["resourcesPerReplica"] = {"cpu": "250m", "memory": "1Gi"}
    dep["spec"]["workers"] = {
        **dep["spec"]["workers"],
        "resources": {"gpu": 0, "cpu": "300m", "memory": "2Gi"},
    }
    dep["spec"]["head"] = KIND_HEAD
    dep["spec"]["apiKeySecretRef"] = {"name": "tiny-tuned-api-key", "key": "key"}
    dep["spec"]["service"] = {"type": "NodePort", "port": 8000, "nodePort": KIND_SERVE_NODE_PORT}
    return job, dep


def shared_claim(
    namespace: str, host_dir: str, labels: dict[str, str] | None = None
) -> tuple[Manifest, Manifest]:
    """A ReadWriteMany claim ``shared`` in ``namespace`` bound to a hostPath folder of the kind node.

    One node, so a hostPath volume is shared by every Ray pod; the folder must exist (kind.sh makes
    it world-writable: the pods run as uid 1000).
    """
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-shared", "labels": dict(labels or {})},
        "spec": {
            "capacity": {"storage": "5Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": host_dir, "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": "shared"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "shared"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": f"{namespace}-shared",
            "resources": {"requests": {"storage": "5Gi"}},
        },
    }
    return pv, pvc


def sandbox_target() -> Target:
    """Bring the sandbox up and describe it."""
    cfg = sandbox.SandboxConfig.from_env(sandbox.find_repo())
    console.rule("[bold]1. sandbox up")
    if sandbox.up(cfg) != 0:
        raise DemoError("llmray sandbox up failed")
    token = sandbox.ensure_token(cfg)
    kubeconfig, bins = sandbox.cluster_up(cfg)
    if not sandbox._dashboard_answers(cfg, token):
        raise DemoError(f"the sandbox's Ray head does not answer at {cfg.dashboard_url}")
    kubectl = str(bins / "kubectl") if bins and (bins / "kubectl").exists() else shutil.which("kubectl")
    if not kubectl:
        raise DemoError("kubectl not found (tests/cluster/build.sh builds it)")
    console.rule("[bold]2. tiny model and data")
    prepare_files(cfg.repo)
    console.print(f"model {MODEL_DIR}, data {DATA_FILE}")
    return Target(
        name="sandbox",
        repo=cfg.repo,
        kubeconfig=kubeconfig,
        kubectl=kubectl,
        namespace="default",
        log_hint=f"operator log: {cfg.log_file('operator')}",
        explore=[
            f"source {cfg.state / 'env'}",
            "kubectl get llmray                      # phase, progress, loss, endpoint",
            "kubectl describe ltj tiny-train         # conditions and events",
            "kubectl get pods -o wide                # the simulated Ray pods",
            "ray job list                            # the real Ray jobs on the local head",
            "make sandbox-down                       # tear down",
        ],
    )


def kind_target() -> Target:
    """The kind cluster (``make kind-up images`` made it): install the chart, prepare the namespace."""
    repo = sandbox.find_repo()
    kind_sh = repo / "tests" / "kind" / "kind.sh"
    env = subprocess.run(["bash", str(kind_sh), "env"], capture_output=True, text=True, check=True).stdout
    kubeconfig = Path(env.split("KUBECONFIG=", 1)[1].split()[0])
    bins = Path(env.split("PATH=", 1)[1].split(":", 1)[0])
    if subprocess.run(["bash", str(kind_sh), "status"], capture_output=True, check=False).returncode != 0:
        raise DemoError("no kind cluster answers: run `make kind-up images` first (or `make kind-demo`)")
    target = Target(
        name="kind",
        repo=repo,
        kubeconfig=kubeconfig,
        kubectl=str(bins / "kubectl"),
        namespace=KIND_NAMESPACE,
        log_hint=f"operator log: kubectl logs -n {KIND_OPERATOR_NAMESPACE} deploy/{KIND_RELEASE}",
        serve_url=f"http://127.0.0.1:{int(_env_port())}/v1",
    )
    console.rule("[bold]1. helm install (the operator runs in a pod)")
    helm = subprocess.run(
        [str(bins / "helm"), "--kubeconfig", str(kubeconfig), "upgrade", "--install", KIND_RELEASE,
         str(repo / "charts" / "llmray"), "-n", KIND_OPERATOR_NAMESPACE, "--create-namespace", "--wait",
         "--timeout", "5m"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if helm.returncode != 0:
        raise DemoError(f"helm install failed: {helm.stderr.strip()}")
    console.print(f"release {KIND_RELEASE} in {KIND_OPERATOR_NAMESPACE}")
    console.rule("[bold]2. namespace, shared volume, API key")
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KIND_NAMESPACE}}
    target.run_kubectl("apply", "-f", "-", stdin=yaml.safe_dump(ns))
    pv, pvc = shared_claim(KIND_NAMESPACE, KIND_SHARED_DIR)
    target.run_kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pv))
    target.apply(pvc)
    existing = target.run_kubectl(
        "get", "secret", "-n", KIND_NAMESPACE, "--ignore-not-found", "tiny-tuned-api-key",
        "-o", "jsonpath={.data.key}",
    )  # fmt: skip
    if existing:
        target.api_key = base64.b64decode(existing).decode()
    else:
        target.api_key = secrets.token_urlsafe(24)
        target.run_kubectl(
            "create", "secret", "generic", "tiny-tuned-api-key", "-n", KIND_NAMESPACE,
            f"--from-literal=key={target.api_key}",
        )  # fmt: skip
    console.print(
        f"namespace {KIND_NAMESPACE}: claim shared (hostPath {KIND_SHARED_DIR}), Secret tiny-tuned-api-key"
    )
    target.explore = [
        f"export KUBECONFIG={kubeconfig} PATH={bins}:$PATH",
        f"kubectl get llmray -n {KIND_NAMESPACE}         # phase, progress, loss, endpoint",
        f"kubectl get pods -n {KIND_NAMESPACE} -o wide   # the real Ray head and worker pods",
        f"kubectl logs -n {KIND_OPERATOR_NAMESPACE} deploy/{KIND_RELEASE}",
        "make kind-down                                # tear down (stops the dockerd it started)",
    ]
    return target


def _env_port() -> str:
    return os.environ.get("LLMRAY_KIND_SERVE_PORT", "18000")


def train(api: Any, target: Target, name: str, timeout: float) -> dict[str, Any]:
    """Show the job's live progress (from its status, as `kubectl get ltj` shows it) until it ends."""
    columns = (
        TextColumn(f"[bold]{name}[/] {{task.fields[phase]:<12}}"),
        BarColumn(),
        TextColumn("step {task.fields[steps]:<7}"),
        TextColumn("loss {task.fields[loss]:<7} {task.fields[tps]:>6} tok/s  ETA {task.fields[eta]:<6}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, phase="Pending", steps="-", loss="-", tps="-", eta="-")
        while True:
            st = _status(api, target.namespace, "llmtrainingjobs", name)
            prog = st.get("progress") or {}
            bar.update(
                task,
                total=prog.get("totalSteps") or None,
                completed=prog.get("step", 0),
                steps=f"{prog.get('step', 0)}/{prog.get('totalSteps') or '?'}",
                phase=st.get("phase", "Pending"),
                loss=prog.get("loss") or "-",
                tps=str(prog.get("tokensPerSecond") or "-"),
                eta=prog.get("eta") or "-",
            )
            if st.get("phase") in ("Succeeded", "Failed"):
                break
            if time.monotonic() > deadline:
                raise DemoError(f"training did not finish in {timeout:.0f}s; {target.log_hint}")
            time.sleep(1)
    if st.get("phase") != "Succeeded":
        raise DemoError(f"training Failed: {st.get('message')} (kubectl describe ltj {name})")
    return st


def ask(endpoint: str, api_key: str, model: str, timeout: float) -> tuple[str, str, str]:
    """Ask the served model one of the facts it was trained on (greedy); (question, answer, expected)."""
    from openai import APIConnectionError, OpenAI

    from llmray_workloads.tiny import facts

    question, expected = facts()[0]
    ai = OpenAI(base_url=endpoint, api_key=api_key or "not-needed", max_retries=2, timeout=120)
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = ai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
            )
            break
        except APIConnectionError:  # a NodePort answers a moment after kube-proxy programs it
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    return question, (reply.choices[0].message.content or "").strip(), expected


def story(target: Target, timeout: float) -> str:
    """Train, serve, ask; returns the endpoint used."""
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(str(target.kubeconfig)))
    training, deployment = _example(target.repo, TRAINING), _example(target.repo, DEPLOYMENT)
    if target.name == "kind":
        training, deployment = kind_manifests(training, deployment)
    job, served = training["metadata"]["name"], deployment["metadata"]["name"]
    model = deployment["spec"]["model"].get("name", served)

    console.rule(f"[bold]3. fine-tune (LLMTrainingJob {job})")
    t0 = time.monotonic()
    target.apply(training)
    st = train(api, target, job, timeout)
    console.print(f"output {st['output']['uri']}  ({time.monotonic() - t0:.0f}s)")

    console.rule(f"[bold]4. serve (LLMDeployment {served}, model from the training job)")
    t0 = time.monotonic()
    target.apply(deployment)
    with console.status(f"waiting for LLMDeployment {served} to be Ready ..."):
        _wait(
            lambda: _status(api, target.namespace, "llmdeployments", served).get("phase") == "Ready",
            timeout,
            f"LLMDeployment {served} Ready",
            target.log_hint,
        )
    endpoint = target.serve_url or _status(api, target.namespace, "llmdeployments", served)["endpoint"]
    console.print(f"Ready at {endpoint}  ({time.monotonic() - t0:.0f}s)")

    console.rule("[bold]5. chat (openai client)")
    question, answer, expected = ask(endpoint, target.api_key, model, timeout)
    console.print(f"[bold]Q:[/] {question}\n[bold]A:[/] {answer}\n[bold]trained on:[/] {expected}")
    if answer == expected:
        console.print("[green]the answer matches the fact it was fine-tuned on[/]")
    else:
        console.print("[yellow]the answer does not match the fact it was fine-tuned on[/]")
    return endpoint


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    started = time.monotonic()
    timeout = float(getattr(args, "timeout", 600.0))
    try:
        target = kind_target() if getattr(args, "kind", False) else sandbox_target()
        endpoint = story(target, timeout)
    except (DemoError, sandbox.SandboxError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    console.rule(f"[bold green]done in {time.monotonic() - started:.0f}s")
    key = f" -H 'Authorization: Bearer {target.api_key}'" if target.api_key else ""
    lines = "\n".join(f"  {line}" for line in [*target.explore, f"curl{key} {endpoint}/models"])
    console.print(f"explore:\n{lines}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmray.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each stage")
    parser.add_argument("--kind", action="store_true", help="run on the kind cluster (make kind-up images)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
