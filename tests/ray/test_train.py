"""Training workload on a real local Ray cluster: DDP training, LoRA, stop + resume, capacity refusal.

Every run goes through the real entry point (``python -m llmray_workloads.train``), either as a
subprocess driver or as a Ray job, because that is what the operator submits. The tiny model and
a few dozen steps keep the module within a few minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from llmray.api.runtime import PROGRESS_MARKER, ProgressReport, parse_progress
from llmray_workloads.tiny import data_dir
from tests.models import shared_tiny_model
from tests.ray_cluster import LocalRay, scrape_metrics
from tests.waiting import WaitTimeout, wait_for

pytestmark = pytest.mark.ray

ENTRYPOINT = [sys.executable, "-m", "llmray_workloads.train", "--config"]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return shared_tiny_model()


def training_run(name: str, tiny: Path, out: Path, attempt: int = 0, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": f"file://{tiny}"},
        "dataset": {"uri": f"file://{data_dir() / 'corpus.txt'}", "packing": True, "validationSplit": 0.1},
        "hyperparameters": {
            "maxSteps": 30,
            "learningRate": 3e-3,
            "batchSizePerWorker": 4,
            "maxSeqLength": 128,
            "loggingSteps": 5,
        },
        "workers": {"replicas": 2, "resources": {"cpu": "1"}},
        "checkpoint": {"everySteps": 10, "keep": 2},
        "output": {"uri": f"file://{out}"},
    }
    return {"name": name, "attempt": attempt, "spec": {**base, **spec}}


def write_config(path: Path, run: dict[str, Any]) -> Path:
    path.write_text(json.dumps(run))
    return path


def progress_reports(log: str) -> list[ProgressReport]:
    """Every progress line of a log, in order."""
    reports = []
    for line in log.splitlines():
        if PROGRESS_MARKER in line:
            report = parse_progress(line[line.index(PROGRESS_MARKER) :])
            if report is not None:
                reports.append(report)
    return reports


def run_driver(
    config: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ENTRYPOINT, str(config)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class MetricsWatcher:
    """Scrapes the head's metrics agent once a second in a thread; keeps the latest training samples.

    Training gauges live as long as their worker (and a couple of export intervals after), so a
    test watches while the job runs rather than looking afterwards.
    """

    def __init__(self, url: str, job: str) -> None:
        self.url, self.job = url, job
        self.seen: dict[tuple[str, str], float] = {}
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                samples = scrape_metrics(self.url, prefix="ray_llmray_train_")
            except Exception:
                continue
            self.scrapes += 1
            for name, labels, value in samples:
                if labels.get("job") == self.job:
                    self.seen[(name, labels.get("rank", ""))] = value

    def __enter__(self) -> MetricsWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def test_two_workers_train_and_loss_falls(local_ray: LocalRay, tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    with MetricsWatcher(local_ray.metrics_url, "default/ddp") as metrics:
        result = run_driver(write_config(tmp_path / "run.json", training_run("ddp", tiny, out)))
        # The gauges outlive their worker by ~2 export intervals: the last values are still there.
        wait_for(
            lambda: metrics.seen.get(("ray_llmray_train_step", "0"), 0) >= 25,
            timeout=20,
            what="the training step gauge of rank 0 to reach the last steps",
            interval=0.5,
        )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "worker setup: 2 worker(s), MULTI_CPU" in log
    reports = progress_reports(log)
    losses = [r.loss for r in reports if r.state == "running" and r.loss is not None]
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.9, losses
    final = reports[-1]
    assert (final.state, final.step, final.total_steps) == ("finished", 30, 30)
    assert final.eval_loss is not None and final.tokens_per_second and final.output_path == str(out)
    assert all(r.mfu is None for r in reports)  # CPU workers: no known peak, no MFU
    seen = metrics.seen
    assert seen[("ray_llmray_train_loss", "0")] > 0 and seen[("ray_llmray_train_learning_rate", "0")] >= 0
    assert seen[("ray_llmray_train_tokens_per_second", "0")] > 0
    assert not any(name in {"ray_llmray_train_mfu", "ray_llmray_train_gpu_memory_bytes"} for name, _ in seen)
    assert {r.checkpoint_step for r in reports if r.state == "checkpointed"} == {10, 20, 30}
    assert json.loads((out / ".llmray" / "progress.json").read_text())["state"] == "finished"
    run_dir = out / "checkpoints" / "default.ddp"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000020", "checkpoint-000030"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and tokenizer.eos_token == "</s>"
    assert not (out / "training_args.bin").exists()


def registered_step(snapshot: Path) -> int | None:
    """Step of the latest checkpoint Ray Train registered for resumption (from its run snapshot)."""
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return None
    return int(latest["metrics"]["step"]) if latest else None


def job_client(local_ray: LocalRay, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Jobs client on the dashboard URL.

    RAY_ADDRESS (exported by the fixture) would override the URL given here and send the client
    through a GCS lookup; RAY_API_SERVER_ADDRESS wins over both and goes straight to HTTP.
    """
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", local_ray.dashboard_url)
    return JobSubmissionClient(local_ray.dashboard_url, headers=local_ray.auth_headers)


def submit(client: Any, config: Path) -> str:
    entrypoint = " ".join([*ENTRYPOINT, str(config)])
    try:
        job = wait_for(lambda: client.submit_job(entrypoint=entrypoint), timeout=60, what="a job submission")
    except WaitTimeout as exc:
        if "No available agent" not in str(exc):
            raise
        pytest.fail(
            "the Ray head's job agent has no HTTP server: its port (default 52365) is taken by another Ray "
            "cluster on this machine; start_local_ray should pass --dashboard-agent-listen-port=<free port>"
        )
    return str(job)


def job_status(client: Any, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def test_stopped_job_resumes_from_last_checkpoint(
    local_ray: LocalRay, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempt 0 is stopped after a checkpoint; attempt 1 continues the step count, writes a LoRA adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    spec = {
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "dataset": {"uri": f"file://{data_dir() / 'chat.jsonl'}", "format": "chat"},
        "hyperparameters": {
            "maxSteps": 40,
            "learningRate": 1e-3,
            "batchSizePerWorker": 8,
            "gradientAccumulationSteps": 4,
            "maxSeqLength": 128,
            "loggingSteps": 1,
        },
        "checkpoint": {"everySteps": 4, "keep": 2},
    }
    client = job_client(local_ray, monkeypatch)
    first = submit(client, write_config(tmp_path / "a0.json", training_run("resume", tiny, out, 0, **spec)))

    def checkpointed() -> list[ProgressReport]:
        status = job_status(client, first)
        assert status in ("PENDING", "RUNNING"), f"attempt 0 ended early: {status}"
        return [r for r in progress_reports(client.get_job_logs(first)) if r.state == "checkpointed"]

    wait_for(checkpointed, timeout=180, what="attempt 0 to report a checkpoint", interval=0.5)
    # A checkpoint line means its files are written; Ray registers it for resumption a moment later.
    snapshot = out / "checkpoints" / "default.resume" / "checkpoint_manager_snapshot.json"
    wait_for(lambda: registered_step(snapshot), timeout=60, what="Ray to register the checkpoint")
    client.stop_job(first)
    wait_for(lambda: job_status(client, first) == "STOPPED", timeout=60, what="attempt 0 to stop")
    seen = progress_reports(client.get_job_logs(first))
    last_checkpoint = registered_step(snapshot)
    assert seen[-1].state != "finished" and last_checkpoint is not None and last_checkpoint < 40

    second = submit(client, write_config(tmp_path / "a1.json", training_run("resume", tiny, out, 1, **spec)))
    wait_for(
        lambda: job_status(client, second) in ("SUCCEEDED", "FAILED", "STOPPED"),
        timeout=240,
        what="attempt 1 to finish",
        interval=1.0,
    )
    log = client.get_job_logs(second)
    assert job_status(client, second) == "SUCCEEDED", log[-4000:]
    reports = progress_reports(log)
    resumed = reports[0]  # the first line of a resumed run names the checkpoint it restored
    assert resumed.checkpoint_step == resumed.step == last_checkpoint
    assert "resumed from" in log
    trained = [r.step for r in reports[1:] if r.state == "running" and r.loss is not None]
    assert trained and min(trained) == resumed.step + 1  # continues, does not restart at 1
    assert (reports[-1].state, reports[-1].step) == ("finished", 40)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (
            {"replicas": 3, "resources": {"cpu": "4"}},
            r"3 worker\(s\) of {CPU 4} .* \(total CPU 8; room for 2\)",
        ),
        (
            {"replicas": 1, "resources": {"cpu": "1", "gpu": 1}},
            r"1 worker\(s\) of {CPU 1, GPU 1} .* room for 0",
        ),
    ],
    ids=["cpus", "gpus"],
)
def test_more_than_the_cluster_has_is_refused(
    local_ray: LocalRay, tiny: Path, tmp_path: Path, resources: dict[str, Any], message: str
) -> None:
    import re

    out = tmp_path / "out"
    config = write_config(tmp_path / "run.json", training_run("toobig", tiny, out, workers=resources))
    result = run_driver(config, env={"LLMRAY_RESOURCE_WAIT_SECONDS": "0"}, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search("llmray-train: error: spec.workers: " + message, result.stderr), result.stderr
    assert "Lower spec.workers.replicas" in result.stderr
    assert not out.exists()
