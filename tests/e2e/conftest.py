"""The e2e tier: the real operator + the local control plane + a real local Ray head, wired like the
sandbox (address override, shared token), but on free ports and in its own namespace, so a user's
running sandbox (8265/8000) is never touched. Started once per session, torn down at its end."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from llmray.cli import SHARED_TOKEN_ENV
from llmray.ray import RayClient
from tests.cluster.test_operator_fixtures import GROUP, PLURALS, REPO, Operator, apply_crds
from tests.kube import Kube
from tests.ray_cluster import LOOPBACK, LocalRay, free_port, port_open, start_local_ray, stop_local_ray
from tests.waiting import wait_for

DATA = REPO / "workloads" / "llmray_workloads" / "data" / "instructions.jsonl"


@dataclass
class E2E:
    """Everything an e2e test needs."""

    kube: Kube
    namespace: str
    ray: LocalRay
    serve_url: str
    operator: Operator
    work: Path
    model: Path
    data: Path

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.ray.dashboard_url, headers=self.ray.auth_headers, timeout=30)

    def jobs(self) -> list[dict[str, Any]]:
        with self.http() as h:
            return list(h.get("/api/jobs/").json())

    def jobs_of(self, uid: str) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if (j.get("metadata") or {}).get("llmray.io/uid") == uid]

    def job(self, sid: str) -> dict[str, Any]:
        with self.http() as h:
            return dict(h.get(f"/api/jobs/{sid}").json())

    def job_logs(self, sid: str) -> str:
        with self.http() as h:
            return str(h.get(f"/api/jobs/{sid}/logs").json().get("logs") or "")

    def stop_job(self, sid: str) -> None:
        with self.http() as h:
            h.post(f"/api/jobs/{sid}/stop").raise_for_status()

    def serve_apps(self) -> dict[str, Any]:
        with self.http() as h:
            return dict(h.get("/api/serve/applications/").json().get("applications") or {})

    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.kube.api_client)

    def delete(self, kind: str, name: str) -> None:
        try:
            self.custom().delete_namespaced_custom_object(
                GROUP, "v1alpha1", self.namespace, PLURALS[kind], name
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    def patch(self, kind: str, name: str, body: dict[str, Any]) -> None:
        self.custom().patch_namespaced_custom_object(
            GROUP, "v1alpha1", self.namespace, PLURALS[kind], name, body
        )

    def training(self, name: str, *, max_steps: int, every: int, max_restarts: int = 1) -> dict[str, Any]:
        """The tiny CPU fine-tune (examples/training-tiny-cpu.yaml) on this session's files."""
        return {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": f"file://{self.model}"},
                "dataset": {"uri": f"file://{self.data}", "format": "instruction"},
                "method": "lora",
                "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
                "hyperparameters": {
                    "maxSteps": max_steps,
                    "learningRate": 0.001,
                    "batchSizePerWorker": 2,
                    "maxSeqLength": 64,
                    "precision": "fp32",
                    "loggingSteps": 1,
                },
                "workers": {"replicas": 1, "resources": {"cpu": "1", "memory": "2Gi"}},
                "head": {"resources": {"cpu": "1", "memory": "2Gi"}},
                "checkpoint": {"everySteps": every, "keep": 1},
                "output": {"uri": f"file://{self.work / 'outputs' / name}"},
                "failurePolicy": {"maxRestarts": max_restarts},
            },
        }

    def deployment(self, name: str, **spec: Any) -> dict[str, Any]:
        """The tiny transformers deployment (examples/deployment-tiny-cpu.yaml) on this session's model."""
        base: dict[str, Any] = {
            "model": {"uri": f"file://{self.model}", "name": "tiny"},
            "engine": "transformers",
            "engineArgs": {"maxModelLen": 256, "dtype": "float32", "maxNumSeqs": 4},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            "resourcesPerReplica": {"cpu": "1", "memory": "1Gi"},
            "limits": {"maxPromptTokens": 128, "maxTokens": 16},
            "workers": {"minReplicas": 0, "maxReplicas": 1, "resources": {"cpu": "1", "memory": "2Gi"}},
            "head": {"resources": {"cpu": "1", "memory": "2Gi"}},
        }
        base.update(spec)
        return {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": name},
            "spec": base,
        }


async def _start_serve(ray: LocalRay, port: int) -> None:
    async with RayClient(ray.dashboard_url, ray.token) as c:
        await c.serve.start({"http_options": {"host": LOOPBACK, "port": port}, "proxy_location": "HeadOnly"})


@pytest.fixture(scope="session")
def e2e(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    work = tmp_path_factory.mktemp("e2e")
    # Job entrypoints say `python`: the head (and so every driver) must find this venv's first.
    saved_path = os.environ.get("PATH", "")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + saved_path
    apply_crds(kube)
    core = client.CoreV1Api(kube.api_client)
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    wait_for(
        lambda: core.read_namespaced_service_account("default", namespace), timeout=30, what="default SA"
    )

    from llmray_workloads.tiny import build_tiny_model

    model = build_tiny_model(work / "models" / "tiny")
    data = work / "data" / "instructions.jsonl"
    data.parent.mkdir(parents=True)
    shutil.copy(DATA, data)

    ray = start_local_ray(num_cpus=6)
    operator: Operator | None = None
    try:
        serve_port = free_port()
        asyncio.run(_start_serve(ray, serve_port))
        wait_for(lambda: port_open(serve_port), timeout=120, what="Serve HTTP proxy")
        serve_url = f"http://{LOOPBACK}:{serve_port}"
        operator = Operator(
            kube.kubeconfig,
            namespace,
            work / "operator.log",
            "--unschedulable-timeout",
            "120",
            # The shared-head topology: one local head for every resource; the token by env (not argv).
            "--ray-dashboard-url",
            ray.dashboard_url,
            "--ray-serve-url",
            serve_url,
            env={SHARED_TOKEN_ENV: ray.token},
        ).start()
        yield E2E(kube, namespace, ray, serve_url, operator, work, model, data)
    finally:
        if operator is not None:
            operator.stop()
            print(f"--- operator log {operator.log_path}\n{operator.log_tail(150)}")
        stop_local_ray(ray)
        core.delete_namespace(namespace, propagation_policy="Background")
        os.environ["PATH"] = saved_path
