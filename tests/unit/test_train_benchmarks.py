"""The training benchmarks parse their arguments and the GPU smoke test runs its tiny CPU mode."""

from __future__ import annotations

import json

import pytest
from benchmarks import gpu_multi_smoke, gpu_train_smoke, train_throughput

pytestmark = pytest.mark.unit


def test_gpu_smoke_defaults_are_the_real_run() -> None:
    config = gpu_train_smoke.smoke_config(gpu_train_smoke.parse_args([]))
    assert config.use_gpu and config.model is gpu_train_smoke.MODEL_0_66B
    assert (config.batch, config.seq, config.steps) == (8, 2048, 20)


def test_gpu_smoke_dry_run_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_train_smoke.main(["--dry-run", "--no-ray", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    detail = json.loads(lines[-2])
    assert detail["result"]["device"] == "cpu" and detail["config"]["steps"] == 2
    assert (
        lines[-1].startswith("GPU_TRAIN_SMOKE ok=") and "path=plain" in lines[-1] and "mfu=n/a" in lines[-1]
    )


def test_mfu_inputs() -> None:
    assert gpu_train_smoke.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_train_smoke.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_train_smoke.peak_tflops("Some GPU", None) is None
    assert gpu_train_smoke.peak_tflops("Some GPU", 100.0) == 100.0
    assert gpu_train_smoke.flops_per_token(1_000, 2, 8, 16) == 6_000 + 12 * 2 * 8 * 16


def test_throughput_helpers() -> None:
    assert train_throughput.steady_rate([1.0, 100.0, 100.0, 50.0], warmup=1) == pytest.approx(75.0)
    args = train_throughput.argparse.Namespace(steps=10, batch=8, seq=128, log_every=2)
    config = train_throughput.run_config(
        "x", train_throughput.Path("/m"), train_throughput.Path("/o"), 2, 1, args
    )
    assert config["spec"]["hyperparameters"]["batchSizePerWorker"] == 4  # same global batch
    assert config["spec"]["workers"] == {"replicas": 2, "resources": {"cpu": "1"}}


def _report(rank: int, uuid: str, mem: float, agree: bool = True) -> dict[str, object]:
    return {"rank": rank, "device_uuid": uuid, "peak_mem_mb": mem, "weights_agree": agree}


def test_multi_gpu_verdict_needs_every_gpu_to_work() -> None:
    """The multi-GPU check fails unless each worker had its own GPU and allocated memory on it."""
    good = [_report(0, "GPU-a", 300.0), _report(1, "GPU-b", 310.0)]
    assert gpu_multi_smoke.verdict(good, 2, 2, use_gpu=True)[0]
    shared = [_report(0, "GPU-a", 300.0), _report(1, "GPU-a", 310.0)]  # two workers, one GPU
    assert not gpu_multi_smoke.verdict(shared, 2, 2, use_gpu=True)[0]
    idle = [_report(0, "GPU-a", 300.0), _report(1, "GPU-b", 0.0)]  # a GPU that did nothing
    assert not gpu_multi_smoke.verdict(idle, 2, 2, use_gpu=True)[0]
    missing = [_report(0, "GPU-a", 300.0)]
    assert not gpu_multi_smoke.verdict(missing, 2, 2, use_gpu=True)[0]
    diverged = [_report(0, "GPU-a", 300.0), _report(1, "GPU-b", 300.0, agree=False)]
    assert not gpu_multi_smoke.verdict(diverged, 2, 2, use_gpu=True)[0]
