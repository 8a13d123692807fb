"""GPU training smoke test: a ~0.66B random-init Llama, bf16 autocast, 1 GPU, synthetic tokens.

Self-contained (config built in code, no weights, no data, no network), a few minutes at most.
Runs inside a Ray Train ``TorchTrainer`` with one GPU worker when Ray is importable (the path the
product uses), else in-process. Prints tokens/s and MFU (model FLOPs utilisation, the same formula
and GPU peak table as the product's progress reports: ``llmray_workloads.train.mfu``) and one
summary line:

    GPU_TRAIN_SMOKE ok=1 device=... params=0.66B tokens_per_s=... mfu=...% path=ray-train

    python benchmarks/gpu_train_smoke.py                 # on a GPU box
    python benchmarks/gpu_train_smoke.py --dry-run       # tiny model on CPU, checks the plumbing
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

from llmray_workloads.train import mfu

MODEL_0_66B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 20,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 4096,
}
MODEL_TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


@dataclass
class SmokeConfig:
    """What one smoke run does."""

    model: dict[str, Any]
    batch: int
    seq: int
    warmup_steps: int
    steps: int
    use_gpu: bool
    lr: float = 1e-4


@dataclass
class SmokeResult:
    """What one smoke run measured."""

    device: str
    params: int
    matmul_params: int  # what MFU counts: params minus an untied input embedding (mfu.count_params)
    dtype: str
    tokens_per_s: float
    step_s: float
    loss_first: float
    loss_last: float
    peak_mem_gb: float


def train_steps(config: SmokeConfig) -> SmokeResult:
    """Random-init Llama, AdamW, synthetic tokens; time the steady-state steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = config.use_gpu and torch.cuda.is_available()
    if config.use_gpu and not cuda:
        raise RuntimeError("no CUDA device visible; run with --dry-run for the CPU plumbing check")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_config = LlamaConfig(**config.model, tie_word_embeddings=False)
    model_config._attn_implementation = "sdpa"
    with device:  # initialise on the GPU directly (seconds instead of a minute on the CPU)
        model: Any = LlamaForCausalLM(model_config)  # fp32 master weights; bf16 autocast below
    model.train()
    params = sum(p.numel() for p in model.parameters())
    matmul_params, _ = mfu.count_params(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, fused=cuda)
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, model_config.vocab_size, (config.batch, config.seq), generator=generator).to(
        device
    )
    losses: list[float] = []

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(config.warmup_steps):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(config.steps):
        step()
    sync()
    elapsed = time.perf_counter() - started
    return SmokeResult(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        params=params,
        matmul_params=matmul_params,
        dtype="bf16" if bf16 else "fp32",
        tokens_per_s=config.batch * config.seq * config.steps / elapsed,
        step_s=elapsed / config.steps,
        loss_first=losses[0],
        loss_last=losses[-1],
        peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 2**30) if cuda else 0.0,
    )


RESULT_FILE = "smoke_result.json"


def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: run the smoke steps; the result travels back as a one-file checkpoint.

    (Ray Train V2 attaches reported metrics to checkpoints, so a checkpoint is the reliable way back.)
    """
    import ray.train

    result = train_steps(SmokeConfig(**config))
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/{RESULT_FILE}", "w") as out:
            json.dump(asdict(result), out)
        ray.train.report(asdict(result), checkpoint=ray.train.Checkpoint.from_directory(folder))


def run_with_ray(config: SmokeConfig) -> SmokeResult:
    """One Ray Train worker (with one GPU when asked) on a local Ray instance."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray

    # "local": always a fresh private instance, never an existing cluster found on the machine.
    ray.init(address="local", num_gpus=1 if config.use_gpu else 0, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker=ray_train_loop,
            train_loop_config=asdict(config),
            scaling_config=ScalingConfig(num_workers=1, use_gpu=config.use_gpu),
            run_config=RunConfig(name="gpu-train-smoke", storage_path=tempfile.mkdtemp(prefix="gpu-smoke-")),
        )
        checkpoint = trainer.fit().checkpoint
        if checkpoint is None:
            raise RuntimeError("the Ray Train worker reported no result")
        with checkpoint.as_directory() as folder, open(f"{folder}/{RESULT_FILE}") as result_file:
            return SmokeResult(**json.load(result_file))
    finally:
        ray.shutdown()


def peak_flops(result: SmokeResult, config: SmokeConfig, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of the GPU at the run's precision (the user's figure first); None on CPU."""
    if not config.use_gpu:
        return None
    return override_tflops * 1e12 if override_tflops else mfu.peak_flops(result.device, result.dtype)


def summary(result: SmokeResult, config: SmokeConfig, path: str, peak: float | None) -> str:
    """The one line to grep for (``peak``: FLOP/s of the GPU, None when unknown)."""
    flops = mfu.flops_per_token(config.model, result.matmul_params, config.seq)
    achieved = flops * result.tokens_per_s / 1e12
    utilisation = mfu.mfu(result.tokens_per_s, flops, peak, 1)
    mfu_text = f"{100 * utilisation:.1f}%" if utilisation is not None else "n/a"
    ok = math.isfinite(result.loss_last) and result.loss_last < result.loss_first
    return (
        f"GPU_TRAIN_SMOKE ok={int(ok)} device={result.device.replace(' ', '_')} "
        f"params={result.params / 1e9:.2f}B dtype={result.dtype} batch={config.batch} seq={config.seq} "
        f"steps={config.steps} tokens_per_s={result.tokens_per_s:.0f} step_s={result.step_s:.3f} "
        f"model_tflops={achieved:.1f} mfu={mfu_text} peak_mem_gb={result.peak_mem_gb:.1f} "
        f"loss={result.loss_first:.3f}->{result.loss_last:.3f} path={path}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="Tiny model on CPU for a few steps.")
    parser.add_argument("--no-ray", action="store_true", help="Run in this process instead of Ray Train.")
    parser.add_argument("--batch", type=int, default=None, help="Sequences per step (default 8; dry-run 2).")
    parser.add_argument(
        "--seq", type=int, default=None, help="Tokens per sequence (default 2048; dry-run 64)."
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 20; dry-run 3).")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="Untimed steps (default 5; dry-run 1)."
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, for MFU.")
    return parser.parse_args(argv)


def smoke_config(args: argparse.Namespace) -> SmokeConfig:
    dry = args.dry_run
    return SmokeConfig(
        model=MODEL_TINY if dry else MODEL_0_66B,
        batch=args.batch or (2 if dry else 8),
        seq=args.seq or (64 if dry else 2048),
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else (1 if dry else 5),
        steps=args.steps or (3 if dry else 20),
        use_gpu=not dry,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = smoke_config(args)
    try:
        import ray  # noqa: F401

        use_ray = not args.no_ray
    except ImportError:
        use_ray = False
    started = time.perf_counter()
    result = run_with_ray(config) if use_ray else train_steps(config)
    peak = peak_flops(result, config, args.peak_tflops)
    print(
        json.dumps(
            {"config": asdict(config), "result": asdict(result), "wall_s": time.perf_counter() - started}
        )
    )
    print(summary(result, config, "ray-train" if use_ray else "plain", peak), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
