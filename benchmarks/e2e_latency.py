"""End-to-end latency on the sandbox: apply -> Ready (tiny deployment), apply -> first progress (tiny job).

Run ``llmray sandbox up`` first (or let this script do it with ``--up``), then::

    .venv/bin/python benchmarks/e2e_latency.py --runs 3

Each run applies ``examples/deployment-tiny-cpu.yaml`` and ``examples/training-tiny-cpu.yaml`` under
fresh names in a fresh namespace, times (from the apply returning) until the deployment's status
says Ready and until the job's status shows ``progress.step > 0``, then deletes the namespace. The
clock is the one the user sees: Kubernetes status as `kubectl get` reads it (polled every 0.2 s).
Prints one JSON line per run and a summary (median, min, max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from llmray import sandbox  # noqa: E402

POLL_S = 0.2


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    return doc


def _status(api: Any, ns: str, plural: str, name: str) -> dict[str, Any]:
    obj = api.get_namespaced_custom_object("llmray.io", "v1alpha1", ns, plural, name)
    return dict(obj.get("status") or {})


def _until(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not reached in {timeout:.0f}s")
        time.sleep(POLL_S)


def one_run(api: Any, core: Any, index: int, timeout: float) -> dict[str, float]:
    from kubernetes import client

    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        dep = _load("deployment-tiny-cpu.yaml")
        job = _load("training-tiny-cpu.yaml")
        job["spec"]["output"]["uri"] = f"file:///tmp/llmray/outputs/bench-{ns}"

        t0 = time.monotonic()
        api.create_namespaced_custom_object("llmray.io", "v1alpha1", ns, "llmdeployments", dep)
        ready = _until(
            lambda: _status(api, ns, "llmdeployments", dep["metadata"]["name"]).get("phase") == "Ready",
            timeout,
            "deployment Ready",
        )
        t1 = time.monotonic()
        api.create_namespaced_custom_object("llmray.io", "v1alpha1", ns, "llmtrainingjobs", job)
        name = job["metadata"]["name"]
        first = _until(
            lambda: (_status(api, ns, "llmtrainingjobs", name).get("progress") or {}).get("step", 0) > 0,
            timeout,
            "first training progress",
        )
        done = _until(
            lambda: _status(api, ns, "llmtrainingjobs", name).get("phase") in ("Succeeded", "Failed"),
            timeout,
            "training finished",
        )
        row = {
            "run": index,
            "deploy_apply_to_ready_s": round(ready, 1),
            "train_apply_to_first_progress_s": round(first, 1),
            "train_first_progress_to_done_s": round(done, 1),
            "total_s": round(time.monotonic() - t0, 1),
            "_t1": t1,
        }
        row.pop("_t1")
        return row
    finally:
        core.delete_namespace(ns, propagation_policy="Background")
        # The namespace's resources go with it; give the operator time to remove the Serve app.
        time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--up", action="store_true", help="run `llmray sandbox up` first")
    args = parser.parse_args(argv)

    cfg = sandbox.SandboxConfig.from_env(sandbox.find_repo(REPO))
    if args.up and sandbox.up(cfg) != 0:
        return 1
    kubeconfig, _ = sandbox.cluster_up(cfg)
    from kubernetes import client, config

    from llmray.demo import prepare_files

    prepare_files(REPO)  # the tiny model and data at the examples' paths
    api_client = config.new_client_from_config(str(kubeconfig))
    api, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    rows = []
    for i in range(args.runs):
        row = one_run(api, core, i, args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {
        key: {
            "median": statistics.median(r[key] for r in rows),
            "min": min(r[key] for r in rows),
            "max": max(r[key] for r in rows),
        }
        for key in rows[0]
        if key.endswith("_s")
    }
    print(json.dumps({"summary": summary, "runs": len(rows)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
