"""Training throughput: Ray Train (1 and 2 workers) versus a plain single-process HF Trainer.

Same model, data, global batch and HF TrainingArguments everywhere (the plain run builds them with
the workload's own :func:`training_arguments`); the Ray runs go through the real entry point
(``python -m llmray_workloads.train``) on a private local Ray head, so the figures include
everything the product does per step (DDP wrapper, token counting, progress callback).

Throughput is measured in steady state: tokens/s per logging interval (the same computation the
progress lines use), first intervals dropped as warm-up, intervals combined by harmonic mean
(packing makes every interval the same number of tokens).

    python benchmarks/train_throughput.py [--model small|tiny] [--steps N] [--cpus-per-worker 1]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmray.api.runtime import PROGRESS_MARKER, parse_progress
from llmray_workloads.tiny import build_tiny_model, data_dir

SMALL: dict[
    str, Any
] = {  # ~20M parameters: compute-bound enough that per-step overheads show as what they are
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
}


def build_model(kind: str, root: Path) -> Path:
    """The tiny model, or the same tokenizer with a ~20M-parameter random-init Llama."""
    tiny = build_tiny_model(root / "tiny")
    if kind == "tiny":
        return tiny
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = root / "small"
    if not (out / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **SMALL)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def run_config(
    name: str, model: Path, out: Path, workers: int, cpus_per_worker: int, args: argparse.Namespace
) -> dict[str, Any]:
    """A TrainingRun with the same global batch whatever the worker count."""
    return {
        "name": name,
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {"uri": f"file://{data_dir() / 'corpus.txt'}", "packing": True},
            "hyperparameters": {
                "maxSteps": args.steps,
                "learningRate": 1e-3,
                "batchSizePerWorker": args.batch // workers,
                "maxSeqLength": args.seq,
                "loggingSteps": args.log_every,
                "precision": "fp32",
            },
            "workers": {"replicas": workers, "resources": {"cpu": str(cpus_per_worker)}},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "output": {"uri": f"file://{out}"},
        },
    }


def spread(rates: list[float]) -> float:
    """Relative standard deviation of the per-interval rates (how noisy the machine was)."""
    return statistics.pstdev(rates) / statistics.mean(rates) if len(rates) > 1 else 0.0


def steady_rate(rates: list[float], warmup: int) -> float:
    """Harmonic mean of per-interval tokens/s after warm-up (equal tokens per interval)."""
    kept = rates[warmup:] or rates
    return len(kept) / sum(1.0 / r for r in kept)


def plain_rates(config: dict[str, Any], threads: int) -> list[float]:
    """Single process, no Ray: the workload's own Trainer setup, timed the same way."""
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from llmray.api.runtime import TrainingRun
    from llmray_workloads.train.data import ExampleDataset, PadCollator
    from llmray_workloads.train.preflight import preflight
    from llmray_workloads.train.progress import ProgressTracker
    from llmray_workloads.train.worker import load_model, training_arguments

    torch.set_num_threads(threads)
    prepared = preflight(TrainingRun.model_validate(config))
    tracker = ProgressTracker(output_dir=None)
    rates: list[float] = []

    class Rate(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tracker.start(state.max_steps, state.num_input_tokens_seen)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                tracker.update_throughput(state.num_input_tokens_seen)
                rates.append(tracker.tokens_per_second or 0.0)

    model = load_model(prepared.run, prepared.plan)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(prepared.run, prepared.plan, "fp32", False, False, tmp, model)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ExampleDataset(prepared.data.train),
            data_collator=PadCollator(prepared.tokenizer.pad_token_id),
            callbacks=[Rate()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return [r for r in rates if r > 0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_ray(cpus: int) -> Iterator[dict[str, str]]:
    """A Ray head of our own on loopback (never someone else's), torn down with its process group."""
    token = secrets.token_hex(16)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-bench-")
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    head = subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def ray_rates(config: dict[str, Any], env: dict[str, str], workdir: Path) -> list[float]:
    """Run the real entry point; per-interval tokens/s from its progress lines."""
    path = workdir / f"{config['name']}.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "llmray_workloads.train", "--config", str(path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{config['name']} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    rates = []
    for line in result.stdout.splitlines():
        if "worker setup:" in line:
            print(f"{config['name']}: {line[line.index('worker setup:') :]}")
        if PROGRESS_MARKER in line:
            report = parse_progress(line[line.index(PROGRESS_MARKER) :])
            if report and report.state == "running" and report.tokens_per_second:
                rates.append(report.tokens_per_second)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["small", "tiny"], default="small")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps (small 24, tiny 200).")
    parser.add_argument("--log-every", type=int, default=None, help="Steps per interval (small 4, tiny 20).")
    parser.add_argument("--warmup-intervals", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="Global batch (split across Ray workers).")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        help="Threads of the plain run and CPUs of each Ray worker (1: no OpenMP contention on a busy box).",
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (24 if args.model == "small" else 200)
    args.log_every = args.log_every or (4 if args.model == "small" else 20)

    root = Path(tempfile.gettempdir()) / "llmray-bench"
    model = build_model(args.model, root)
    rates: dict[str, list[float]] = {}
    per_worker = args.cpus_per_worker
    with tempfile.TemporaryDirectory(prefix="llmray-bench-") as tmp, private_ray(2 * per_worker) as env:
        # The plain runs bracket the Ray runs and share the machine with the same idle Ray daemons,
        # so drift in the (shared, busy) machine's load shows up as the gap between plain #1 and #2.
        work = Path(tmp)
        started = time.monotonic()
        plain_config = run_config("plain", model, work / "plain", 1, per_worker, args)
        rates["plain HF Trainer #1"] = plain_rates(plain_config, per_worker)
        for workers in (1, 2):
            config = run_config(f"ray{workers}", model, work / f"ray{workers}", workers, per_worker, args)
            rates[f"Ray Train {workers} worker(s)"] = ray_rates(config, env, work)
        rates["plain HF Trainer #2"] = plain_rates(plain_config, per_worker)
        elapsed = time.monotonic() - started
    results = {name: steady_rate(values, args.warmup_intervals) for name, values in rates.items()}
    spreads = {name: spread(values) for name, values in rates.items()}
    results["plain HF Trainer (mean)"] = (results["plain HF Trainer #1"] + results["plain HF Trainer #2"]) / 2
    spreads["plain HF Trainer (mean)"] = spread(
        [results["plain HF Trainer #1"], results["plain HF Trainer #2"]]
    )
    base = results["plain HF Trainer (mean)"]
    print(
        f"\ntrain throughput: model={args.model} steps={args.steps} global_batch={args.batch} seq={args.seq} "
        f"cpus_per_worker={args.cpus_per_worker} log_every={args.log_every} "
        f"warmup_intervals={args.warmup_intervals}"
    )
    for name, rate in results.items():
        print(
            f"  {name:30s} {rate:9.0f} tokens/s  {rate / base:5.2f}x plain  "
            f"(interval spread {spreads[name]:.0%})"
        )
    print(f"  (benchmark wall time {elapsed:.0f}s)")
    ratio = results["Ray Train 1 worker(s)"] / base
    print(
        f"TRAIN_THROUGHPUT ray1_vs_plain={ratio:.2f} target>=0.85 {'OK' if ratio >= 0.85 else 'BELOW TARGET'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
