"""The training job driver: ``python -m llmray_workloads.train --config <file|->``.

The operator submits this as a Ray job. It validates the TrainingRun, runs every check that can
fail without workers (model, tokenizer, data, LoRA targets, sequence length, cluster capacity),
then hands the tokenised data to a Ray Train ``TorchTrainer`` whose workers run
:func:`llmray_workloads.train.worker.train_loop`.

Exit codes: 0 success, 2 bad input (nothing was started or written), 1 training failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

from llmray.api.runtime import ProgressReport

from .. import storage
from .config import RESOURCE_WAIT_ENV, ConfigError, Plan, check_capacity, read_config
from .export import FINAL_REPORT, clean_stale, final_report_uri, new_model_version, publish, staging_dir
from .preflight import Prepared, preflight
from .progress import PROGRESS_DIR, emit, read_progress, say

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
DEFAULT_RESOURCE_WAIT_S = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmray_workloads.train",
        description="Fine-tune a causal LM with Ray Train from a TrainingRun config (JSON or YAML).",
    )
    parser.add_argument("--config", required=True, help="TrainingRun file, or - for stdin.")
    parser.add_argument(
        "--check", action="store_true", help="Only validate the config, model and data (no Ray needed)."
    )
    return parser.parse_args(argv)


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of each alive Ray node."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def wait_for_capacity(plan: Plan, timeout_s: float) -> None:
    """Wait (briefly) for worker nodes to join, then refuse a run the cluster cannot hold."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_capacity(alive_node_resources(), plan)
            return
        except ConfigError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(2.0)


def resource_wait_seconds() -> float:
    try:
        return float(os.environ.get(RESOURCE_WAIT_ENV, DEFAULT_RESOURCE_WAIT_S))
    except ValueError:
        return DEFAULT_RESOURCE_WAIT_S


def finish(plan: Plan, token: str) -> None:
    """Swap the staged model into the output folder and publish the final progress report.

    An object-store output was uploaded by rank 0 (see :func:`.export.publish_remote`): only its
    final report is left to read and remove.

    The final report carries the export's version (also in a local output's manifest): the
    operator copies it into the job's ``status.output.version``, and deployments of this output
    roll it out.
    """
    if plan.output_uri is not None:
        uri = final_report_uri(plan.output_uri, token)
        data = storage.read_bytes(uri, plan.store)
        if data is None:
            raise RuntimeError(f"training ended without a final report at {uri}")
        storage.delete(uri, plan.store)
        report = ProgressReport.model_validate_json(data)
        emit(report.model_copy(update={"model_version": new_model_version(token)}), None)
        return
    staging = staging_dir(plan.output_dir, token)
    final_file = staging / PROGRESS_DIR / FINAL_REPORT
    if not final_file.is_file():
        raise RuntimeError(f"training ended without a staged model at {staging}")
    report = ProgressReport.model_validate_json(final_file.read_text())
    final_file.unlink()
    version = new_model_version(token)
    publish(staging, plan.output_dir, version)
    emit(report.model_copy(update={"model_version": version}), plan.output_dir)


def checkpoint_storage(plan: Plan) -> tuple[str, Any]:
    """``RunConfig``'s storage_path and storage_filesystem.

    Object stores get a pyarrow filesystem built with the spec's endpoint and region (Ray's own
    URI parsing would not know a custom endpoint) and a scheme-less ``bucket/prefix`` path; the
    filesystem carries no credentials (they come from each pod's environment).
    """
    if not plan.storage_is_remote:
        return plan.storage_path, None
    fs, path = storage.filesystem(plan.storage_path, plan.store)
    return path, fs


def build_trainer(prepared: Prepared, data_ref: Any, export_token: str) -> Any:
    """The Ray Train TorchTrainer for a prepared run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import train_loop

    plan, spec = prepared.plan, prepared.run.spec
    storage_path, storage_fs = checkpoint_storage(plan)
    return TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={
            "run": prepared.run,
            "plan": plan,
            "data": data_ref,
            "export_token": export_token,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=dict(plan.resources_per_worker),
        ),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            # A deleted or drained worker pod is a node preemption to Ray Train, which by default
            # retries it forever inside the attempt; it fails the attempt instead, so the operator
            # counts it in status.restarts and bounds it by failurePolicy.maxRestarts.
            # (ray.train exports Train V2's FailureConfig at run time; mypy sees the V1 class.)
            failure_config=FailureConfig(max_failures=plan.max_failures, max_preemption_failures=0),  # type: ignore[call-arg]
        ),
    )


def describe(prepared: Prepared) -> str:
    """One line saying what is about to run."""
    plan, data = prepared.plan, prepared.data
    spec = prepared.run.spec
    eval_part = f", {len(data.eval)} held out" if data.eval is not None else ""
    return (
        f"run {plan.run_name} attempt {plan.attempt}: {spec.method} "
        f"{spec.distributed.strategy} on {plan.num_workers} worker(s) {plan.resources_per_worker}; "
        f"{data.records} records -> {len(data.train)} {spec.dataset.format} examples "
        f"({data.train.num_tokens()} tokens){eval_part}; dropped {data.dropped}; "
        f"checkpoints {plan.run_dir}; output {plan.output_location}"
    )


def report_failure(plan: Plan) -> None:
    """Last progress line of a failed attempt (step from the last report, if any)."""
    last = read_progress(plan.output_dir) or ProgressReport()
    failed = last.model_copy(update={"state": "failed"})
    emit(failed, plan.output_dir if last.step or last.checkpoint_path else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = read_config(args.config, sys.stdin.read() if args.config == "-" else None)
        prepared = preflight(run)
        say(describe(prepared))
        if args.check:
            return 0
        # Ray forwards worker stdout to this driver's log; keep every progress line (no dedup).
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        ray.init(log_to_driver=True)
        wait_for_capacity(prepared.plan, resource_wait_seconds())
    except ConfigError as exc:
        say(f"error: {exc}", sys.stderr)
        return EXIT_BAD_INPUT
    token = uuid.uuid4().hex
    try:
        clean_stale(prepared.plan.output_dir)
        trainer = build_trainer(prepared, ray.put(prepared.data), token)
        trainer.fit()
        finish(prepared.plan, token)
    except Exception as exc:
        say(f"training failed: {type(exc).__name__}: {exc}", sys.stderr)
        report_failure(prepared.plan)
        return EXIT_FAILED
    return 0
