"""Every Kubernetes call made through :class:`llmray.kube.Kube` carries ``_request_timeout``: an
API server that accepts the connection and never answers gives the pool thread back in time."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

from llmray.kube import DEFAULT_REQUEST_TIMEOUT, Kube, KubeError

from .hostile_head import HostileHead, silent, trickle

pytestmark = pytest.mark.unit

TIMEOUT = 1.0


@pytest.fixture
def silent_apiserver() -> Any:
    with HostileHead() as head:
        # every path: never a full answer; silent, or a byte of the status line every 0.2 s
        # (which no per-read timeout catches: the overall deadline does)
        head.routes.update(
            {
                "/api/v1/namespaces/ns/pods/p": silent,
                "/api/v1/namespaces/ns/pods": silent,
                "/api/v1/namespaces/ns/services/s": trickle(in_headers=True, interval=0.2),
                "/apis/llmray.io/v1alpha1/namespaces/ns/llmdeployments/d/status": silent,
            }
        )
        yield head


def kube_for(head: HostileHead, **kwargs: Any) -> Kube:
    cfg = client.Configuration()
    cfg.host = head.url
    return Kube(client.ApiClient(cfg), **kwargs)


def test_default_is_a_connect_and_read_timeout() -> None:
    assert isinstance(DEFAULT_REQUEST_TIMEOUT, tuple) and all(0 < t <= 60 for t in DEFAULT_REQUEST_TIMEOUT)


async def test_every_verb_times_out_against_a_silent_api_server(silent_apiserver: HostileHead) -> None:
    kube = kube_for(silent_apiserver, request_timeout=(TIMEOUT, TIMEOUT))
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}}
    calls = {
        "read": lambda: kube.read("Pod", "ns", "p"),
        "create": lambda: kube.create(pod),
        "delete": lambda: kube.delete("Pod", "ns", "p", uid="u"),
        "patch": lambda: kube.patch("Service", "ns", "s", {"spec": {}}),
        "patch_status": lambda: kube.patch_status("llmdeployments", "ns", "d", {"phase": "Ready"}),
    }
    try:
        for verb, call in calls.items():
            start = time.monotonic()
            with pytest.raises(KubeError) as info:
                await call()
            elapsed = time.monotonic() - start
            print(f"\n[hostile] kube {verb} against a silent API server: {elapsed:.2f} s")
            assert info.value.transient and info.value.status == 0
            assert elapsed < kube.deadline_s + 0.5, verb
    finally:
        kube.close()


async def test_timeout_is_configurable_per_kube(silent_apiserver: HostileHead) -> None:
    kube = kube_for(silent_apiserver, request_timeout=(0.2, 0.2))
    try:
        assert kube.deadline_s == pytest.approx(1.4)
        start = time.monotonic()
        with pytest.raises(KubeError) as info:
            await kube.read("Pod", "ns", "p")
        # urllib3 retries an idempotent read 3 times after a read timeout: 4 x 0.2 s, then it fails
        assert time.monotonic() - start < kube.deadline_s + 0.5
        assert info.value.reason in ("ConnectionError", "Timeout")
    finally:
        kube.close()
