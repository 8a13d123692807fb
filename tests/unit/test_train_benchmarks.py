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


def test_smoke_mfu_is_the_products_formula() -> None:
    """The smoke's MFU is llmray_workloads.train.mfu's: matmul params (no untied embedding), GPU table."""
    config = gpu_train_smoke.smoke_config(gpu_train_smoke.parse_args([]))
    result = gpu_train_smoke.SmokeResult(
        device="NVIDIA H200", params=700_000_000, matmul_params=600_000_000, dtype="bf16", tokens_per_s=1e4,
        step_s=0.1, loss_first=10.0, loss_last=1.0, peak_mem_gb=1.0,
    )  # fmt: skip
    peak = gpu_train_smoke.peak_flops(result, config, None)
    assert peak == 989e12
    assert gpu_train_smoke.peak_flops(result, config, 100.0) == 100e12  # --peak-tflops wins
    cpu = gpu_train_smoke.smoke_config(gpu_train_smoke.parse_args(["--dry-run"]))
    assert gpu_train_smoke.peak_flops(result, cpu, None) is None
    flops = 6 * 600e6 + 12 * 20 * 1536 * 2048  # 6 x matmul params + 12 L d S (MODEL_0_66B)
    line = gpu_train_smoke.summary(result, config, "plain", peak)
    assert f"mfu={100 * 1e4 * flops / 989e12:.1f}%" in line and "params=0.70B" in line


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
