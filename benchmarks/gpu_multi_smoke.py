"""Multi-GPU pod check: every GPU of one worker pod does training work (issue 13 item 4).

A worker pod with ``spec.workers.resources.gpu: N`` runs N Ray Train workers, one per GPU
(:func:`llmray_workloads.train.config.worker_shape`). This runs that shape on the machine's GPUs:
one worker per GPU, each trains a small model under DDP for a few steps, then reports its rank, the
GPU it used (index and UUID) and the memory it allocated. The check passes when N distinct GPUs
each did work (non-zero peak memory) and the all-reduced gradients agree across ranks.

Runs inside Ray Train when Ray is importable (the product's path: Ray pins each worker to one GPU
through CUDA_VISIBLE_DEVICES), else with one torch process per GPU. One summary line:

    GPU_MULTI_SMOKE ok=1 gpus=8 workers=8 distinct_devices=8 min_mem_mb=... path=ray-train

    python benchmarks/gpu_multi_smoke.py            # on a multi-GPU box
    python benchmarks/gpu_multi_smoke.py --dry-run  # 2 CPU processes (gloo), checks the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

STEPS = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def work(rank: int, world: int, use_gpu: bool, out_dir: str) -> dict[str, Any]:
    """One worker's steps (process group already initialised); returns what it reports."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    model = model.to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_gpu else None)
    optim = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)  # different data per rank: DDP must average the grads
    for _ in range(STEPS):
        x = torch.randn(64, 1024, generator=gen).to(device)
        loss = ddp(x).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    # After DDP steps every rank holds the same weights: compare a checksum across ranks.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    report = {
        "rank": rank,
        "world": world,
        "device_index": device.index if use_gpu else -1,
        "device_uuid": str(torch.cuda.get_device_properties(device).uuid) if use_gpu else f"cpu-{rank}",
        "device_name": torch.cuda.get_device_name(device) if use_gpu else "cpu",
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if use_gpu else 0.0,
        "weights_agree": max(float(g.item()) for g in gathered) - min(float(g.item()) for g in gathered)
        < 1e-6,
        "loss": float(loss.item()),
    }
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(report))
    return report


def _torch_worker(rank: int, world: int, use_gpu: bool, out_dir: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    if use_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        work(rank, world, use_gpu, out_dir)
    finally:
        dist.destroy_process_group()


def run_plain(world: int, use_gpu: bool, out_dir: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_torch_worker, args=(world, use_gpu, out_dir, _free_port()), nprocs=world, join=True)


def run_ray(world: int, per_worker: dict[str, float], use_gpu: bool, out_dir: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray

    def loop(config: dict[str, Any]) -> None:
        import ray.train

        ctx = ray.train.get_context()
        work(ctx.get_world_rank(), ctx.get_world_size(), config["use_gpu"], config["out_dir"])

    ray.init(address="local", include_dashboard=False)
    try:
        TorchTrainer(
            train_loop_per_worker=loop,
            train_loop_config={"use_gpu": use_gpu, "out_dir": out_dir},
            scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=per_worker),
            run_config=RunConfig(name="gpu-multi-smoke", storage_path=tempfile.mkdtemp(prefix="gpu-multi-")),
        ).fit()
    finally:
        ray.shutdown()


def verdict(reports: list[dict[str, Any]], gpus: int, workers: int, use_gpu: bool) -> tuple[bool, str]:
    """ok, and the summary fields: one report per worker, each on its own device, each did work."""
    distinct = len({r["device_uuid"] for r in reports})
    min_mem = min((r["peak_mem_mb"] for r in reports), default=0.0)
    ok = (
        len(reports) == workers
        and distinct == workers
        and all(r["weights_agree"] for r in reports)
        and (min_mem > 0 or not use_gpu)
    )
    return ok, f"gpus={gpus} workers={workers} distinct_devices={distinct} min_mem_mb={min_mem:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="2 CPU workers (gloo) instead of the GPUs.")
    parser.add_argument("--no-ray", action="store_true", help="torch processes instead of Ray Train.")
    args = parser.parse_args(argv)

    import torch

    from llmray_workloads.train.config import worker_shape

    use_gpu = not args.dry_run
    gpus = torch.cuda.device_count() if use_gpu else 2
    if use_gpu and gpus < 2:
        print(f"GPU_MULTI_SMOKE ok=skip gpus={gpus} (needs a machine with 2 or more GPUs)")
        return 0
    # The shape the operator's training run asks for on one pod of this machine's size.
    workers, per_worker = worker_shape(1, str(os.cpu_count() or 1), gpus if use_gpu else 0)
    if not use_gpu:
        workers, per_worker = 2, {"CPU": 1.0}
    try:
        import ray  # noqa: F401

        use_ray = not args.no_ray
    except ImportError:
        use_ray = False
    out_dir = tempfile.mkdtemp(prefix="gpu-multi-reports-")
    if use_ray:
        run_ray(workers, per_worker, use_gpu, out_dir)
    else:
        run_plain(workers, use_gpu, out_dir)
    reports = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank-*.json"))]
    for report in reports:
        print(json.dumps(report))
    ok, fields = verdict(reports, gpus, workers, use_gpu)
    path = "ray-train" if use_ray else "torch-spawn"
    print(f"GPU_MULTI_SMOKE ok={int(ok)} {fields} per_worker={per_worker} path={path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
