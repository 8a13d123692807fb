"""Object storage end to end against a real S3 server on loopback (moto, see tests/s3_server.py).

The model and the dataset are read from s3://, checkpoints and the output model are written to it,
a second attempt resumes from the s3 checkpoint, and the serving engine loads the s3 output. The
Ray cluster of this module gets the S3 credentials in its environment, as the operator gives them
to every Ray pod from spec.objectStorage.secretRef; the training config carries only the endpoint.
Steps are few (CPU time is scarce): one worker, the tiny model, 4 + 2 steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmray.api.runtime import PROGRESS_MARKER, ProgressReport, parse_progress
from llmray_workloads import storage
from llmray_workloads.tiny import data_dir
from tests.models import shared_tiny_model
from tests.ray_cluster import LocalRay, start_local_ray, stop_local_ray
from tests.s3_server import S3Server, make_bucket, s3_server
from tests.waiting import restore_environ

pytestmark = pytest.mark.ray

BUCKET = "llmray-test"
ENTRYPOINT = [sys.executable, "-m", "llmray_workloads.train", "--config"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)  # this process reads and checks objects like a pod would
        try:
            make_bucket(server, BUCKET)
            yield server
        finally:
            restore_environ(saved)


@pytest.fixture(scope="module")
def s3_ray(s3: S3Server) -> Iterator[LocalRay]:
    """A Ray cluster whose processes carry the S3 credentials, like pods with spec.objectStorage."""
    ray = start_local_ray(num_cpus=2, extra_args=["--object-store-memory=300000000"], extra_env=s3.env)
    try:
        yield ray
    finally:
        stop_local_ray(ray)


@pytest.fixture(scope="module")
def store(s3: S3Server) -> storage.StoreSettings:
    return storage.StoreSettings(endpoint=s3.endpoint)


@pytest.fixture(scope="module")
def uploaded(s3: S3Server, store: storage.StoreSettings) -> dict[str, str]:
    """The tiny model and a dataset in the bucket."""
    tiny = shared_tiny_model()
    storage.upload_dir(tiny, f"s3://{BUCKET}/models/tiny", store)
    corpus = (data_dir() / "corpus.txt").read_bytes()
    storage.write_bytes(f"s3://{BUCKET}/data/corpus.txt", corpus, store)
    return {"model": f"s3://{BUCKET}/models/tiny", "dataset": f"s3://{BUCKET}/data/corpus.txt"}


def training_run(uploaded: dict[str, str], s3: S3Server, attempt: int, max_steps: int) -> dict[str, Any]:
    return {
        "name": "s3run",
        "attempt": attempt,
        "spec": {
            "model": {"uri": uploaded["model"]},
            "dataset": {"uri": uploaded["dataset"], "packing": True},
            "hyperparameters": {
                "maxSteps": max_steps,
                "learningRate": 3e-3,
                "batchSizePerWorker": 4,
                "maxSeqLength": 64,
                "loggingSteps": 1,
            },
            "workers": {"replicas": 1, "resources": {"cpu": "1"}},
            "checkpoint": {"everySteps": 2, "keep": 2},
            "output": {"uri": f"s3://{BUCKET}/out/s3run"},
            # no secretRef here: the credentials are in the pods' (the Ray cluster's) environment
            "objectStorage": {"endpoint": s3.endpoint, "region": "us-east-1"},
        },
    }


def run_driver(config: Path, ray: LocalRay | None, s3: S3Server) -> tuple[int, str]:
    env = {**os.environ, **s3.env}
    if ray is not None:
        env.update({**ray.env, "RAY_ADDRESS": ray.gcs_address})
    result = subprocess.run([*ENTRYPOINT, str(config)], env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def progress_reports(log: str) -> list[ProgressReport]:
    reports = []
    for line in log.splitlines():
        if PROGRESS_MARKER in line:
            report = parse_progress(line[line.index(PROGRESS_MARKER) :])
            if report is not None:
                reports.append(report)
    return reports


def names(store: storage.StoreSettings, uri: str) -> set[str]:
    return {rel for rel, _, _ in storage.listing(uri, store)}


def test_train_resume_and_serve_from_s3(
    s3: S3Server, s3_ray: LocalRay, store: storage.StoreSettings, uploaded: dict[str, str], tmp_path: Path
) -> None:
    from llmray_workloads.serve.config import EngineSettings
    from llmray_workloads.serve.engine import SamplingParams, TransformersEngine

    out = f"s3://{BUCKET}/out/s3run"
    runs = f"{out}/checkpoints/default.s3run"

    # attempt 0: model and data from s3, checkpoints every 2 steps and the model to s3
    config = tmp_path / "a0.json"
    config.write_text(json.dumps(training_run(uploaded, s3, 0, 4)))
    code, log = run_driver(config, s3_ray, s3)
    assert code == 0, log[-4000:]
    reports = progress_reports(log)
    assert (reports[-1].state, reports[-1].step) == ("finished", 4)
    assert reports[-1].output_path == out
    assert {r.checkpoint_path for r in reports if r.state == "checkpointed"} == {
        f"{runs}/checkpoint-000002",
        f"{runs}/checkpoint-000004",
    }
    files = names(store, out)
    assert {"config.json", "model.safetensors", "tokenizer_config.json", ".llmray/manifest.json"} <= files
    assert any(f.startswith("checkpoints/default.s3run/checkpoint-000004/") for f in files)
    assert not [f for f in files if f.startswith(".llmray/final-")]  # the driver consumed it
    manifest = json.loads(storage.read_bytes(f"{out}/.llmray/manifest.json", store) or b"{}")
    assert "model.safetensors" in manifest["files"] and "checkpoints" not in manifest["files"]
    first_weights = storage.listing(f"{out}/model.safetensors", store)

    # attempt 1, same run and storage, more steps: resumes from the s3 checkpoint at step 4
    config = tmp_path / "a1.json"
    config.write_text(json.dumps(training_run(uploaded, s3, 1, 6)))
    code, log = run_driver(config, s3_ray, s3)
    assert code == 0, log[-4000:]
    reports = progress_reports(log)
    assert f"resumed from {runs}/checkpoint-000004" in log
    assert (reports[0].step, reports[0].checkpoint_step) == (4, 4)
    trained = [r.step for r in reports[1:] if r.state == "running" and r.loss is not None]
    assert trained and min(trained) == 5  # continues, does not start over
    assert (reports[-1].state, reports[-1].step) == ("finished", 6)
    # keep: 2 -> the step-2 checkpoint is gone, 4 and 6 remain
    prefix = "checkpoints/default.s3run/checkpoint-"
    checkpoints = {f.split("/")[2] for f in names(store, out) if f.startswith(prefix)}
    assert checkpoints == {"checkpoint-000004", "checkpoint-000006"}
    assert storage.listing(f"{out}/model.safetensors", store) != first_weights  # re-exported

    # serving: the engine downloads the s3 output into its model cache and generates
    cache = tmp_path / "serve-cache"
    os.environ["HF_HOME"] = str(cache)
    try:
        engine = TransformersEngine.load(
            EngineSettings(model_source=out, store_endpoint=s3.endpoint, torch_threads=1)
        )
    finally:
        os.environ.pop("HF_HOME", None)
    try:

        async def generate() -> str:
            text = ""
            async for chunk in engine.submit(
                engine.encode("The capital"), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            ):
                text += chunk.text
            return text

        text = asyncio.run(generate())
        assert isinstance(text, str)
        assert engine.stats()  # the generation loop ran
    finally:
        engine.shutdown()
    (copy,) = (cache / storage.CACHE_SUBDIR).iterdir()
    assert (copy / "model.safetensors").is_file() and (copy / storage.COMPLETE_MARKER).is_file()


def test_unreachable_bucket_is_refused_naming_the_field(
    s3: S3Server, uploaded: dict[str, str], tmp_path: Path
) -> None:
    """Checked before Ray is even contacted (exit 2: bad input)."""
    run = training_run(uploaded, s3, 0, 2)
    run["spec"]["output"] = {"uri": "s3://no-such-bucket/out"}
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(run))
    code, log = run_driver(config, None, s3)
    assert code == 2, log[-4000:]
    assert "spec.output.uri: cannot reach s3://no-such-bucket/out: bucket no-such-bucket does not" in log
