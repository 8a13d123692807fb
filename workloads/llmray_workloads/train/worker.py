"""The per-worker training loop: a transformers Trainer inside a Ray Train worker.

Checkpointing uses our own callback rather than ``RayTrainReportCallback`` because we need (a) a
stable, step-named checkpoint folder (``checkpoint-000100``) whose path goes into the progress
line, (b) each rank to upload only its own HF output folder (rank 0: weights, optimizer,
scheduler, trainer state; every rank: its RNG state, FSDP shards) instead of re-copying a shared
folder, and (c) to delete the local copy once Ray has it. Cadence comes from HF's ``save_steps``
(= spec.checkpoint.everySteps), retention from Ray's ``CheckpointConfig(num_to_keep=keep)``.

Resuming: Ray Train restores the latest reported checkpoint of a run with the same name and
storage path (a retried worker group, or a new job attempt), and ``Trainer.train(
resume_from_checkpoint=...)`` restores weights, optimizer, scheduler, RNG and skips the batches
already seen, so the step count continues.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from llmray.api.runtime import TrainingRun
from llmray.api.training import FsdpSpec

from .config import Plan, Precision, resolve_precision
from .data import ExampleDataset, PadCollator, PreparedData
from .export import FINAL_REPORT, merge_adapter, publish_remote, staging_dir
from .metrics import TrainingMetrics
from .mfu import count_params, flops_per_token, peak_flops, token_weighted_length
from .preflight import localize_model
from .progress import PROGRESS_DIR, ProgressTracker, say


class AlreadyTrained(Exception):
    """Raised by :class:`StopWhenTrained` to leave ``Trainer.train`` before its first step."""


class StopWhenTrained(TrainerCallback):  # type: ignore[misc]
    """Ends a run resumed from a checkpoint taken at the last step, before it trains any step.

    transformers 5.24 re-enters the last epoch and runs one more optimiser step before it checks
    max_steps, so a resubmitted finished run would train step max_steps + 1. ``on_train_begin``
    comes after the checkpoint's weights, optimizer and trainer state are restored and before the
    first step; raising there (every rank restored the same step, so all leave together) keeps
    the restored model for export. :func:`run_trainer` catches it.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AlreadyTrained


def run_trainer(trainer: Any, resume_from_checkpoint: str | None) -> None:
    """``trainer.train``, resuming if asked; a run resumed at its last step trains nothing more.

    ``trainer`` must have a :class:`StopWhenTrained` callback (see :func:`make_trainer`).
    """
    with suppress(AlreadyTrained):
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)


def make_trainer(callbacks: list[Any] | None = None, **kwargs: Any) -> Any:
    """A ``transformers.Trainer`` with the workload's callbacks (and without its console printers)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = Trainer(callbacks=[*(callbacks or []), StopWhenTrained()], **kwargs)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def checkpoint_dir_name(step: int) -> str:
    """Name of the checkpoint folder in the run's storage for an optimiser step."""
    return f"checkpoint-{step:06d}"


class RayProgressCallback(TrainerCallback):  # type: ignore[misc]
    """Reports checkpoints to Ray Train (every rank), prints progress (rank 0), sets metrics.

    ``memory``: the rank's peak GPU memory in bytes (None without CUDA), exported at each log.
    """

    def __init__(
        self,
        plan: Plan,
        rank: int,
        tracker: ProgressTracker,
        resumed_step: int | None,
        metrics: TrainingMetrics | None = None,
        memory: Callable[[], int | None] | None = None,
    ) -> None:
        self.plan = plan
        self.rank = rank
        self.tracker = tracker
        self.resumed_step = resumed_step
        self.metrics = metrics
        self.memory = memory

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracker.start(state.max_steps, state.num_input_tokens_seen)
        self.tracker.restore(state.log_history)
        if self.rank == 0 and self.resumed_step is not None:
            say(f"resumed from {self.tracker.checkpoint_path} at step {state.global_step}")
            self.tracker.emit(state.global_step, state.epoch or 0.0)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.tracker.loss = float(logs["loss"])
            self.tracker.update_throughput(state.num_input_tokens_seen)
        if "learning_rate" in logs:
            self.tracker.learning_rate = float(logs["learning_rate"])
        if "eval_loss" in logs:
            self.tracker.eval_loss = float(logs["eval_loss"])
        if self.rank == 0 and ("loss" in logs or "eval_loss" in logs):
            self.tracker.emit(state.global_step, state.epoch or 0.0)
        if self.metrics is not None and self.memory is not None:
            self.metrics.gpu_memory(self.memory())

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import ray.train

        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        name = checkpoint_dir_name(state.global_step)
        checkpoint = ray.train.Checkpoint.from_directory(str(local)) if local.is_dir() else None
        metrics = {"step": state.global_step, "epoch": state.epoch or 0.0}
        if self.tracker.loss is not None:
            metrics["loss"] = self.tracker.loss
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            delete_local_checkpoint_after_upload=True,
        )
        self.tracker.checkpoint_path = self.plan.checkpoint_path(name)
        self.tracker.checkpoint_step = state.global_step
        if self.rank == 0:
            self.tracker.emit(state.global_step, state.epoch or 0.0, state="checkpointed")


def use_fsdp(run: TrainingRun, cuda: bool) -> bool:
    """Whether this run shards with FSDP (asked for, and the workers have GPUs)."""
    return run.spec.distributed.strategy == "fsdp" and cuda


def fsdp_arguments(
    model: Any, activation_checkpointing: bool, fsdp: FsdpSpec | None = None
) -> dict[str, Any]:
    """TrainingArguments for FSDP2: shard per transformer block, full state dict on save.

    FULL_STATE_DICT keeps checkpoints loadable at any world size and lets ``save_model`` write a
    plain HF folder; FSDP's own activation checkpointing replaces HF's under FSDP. FSDP2 spells
    the sharding strategy as ``reshard_after_forward`` (full_shard: True, shard_grad_op: False).
    """
    fsdp = fsdp or FsdpSpec()
    layers = list(getattr(model, "_no_split_modules", None) or [])
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            **({"transformer_layer_cls_to_wrap": layers} if layers else {}),
            "activation_checkpointing": activation_checkpointing,
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": fsdp.sharding_strategy == "full_shard",
            "cpu_offload": fsdp.cpu_offload,
        },
    }


def training_arguments(
    run: TrainingRun,
    plan: Plan,
    precision: Precision,
    has_eval: bool,
    cuda: bool,
    output_dir: str,
    model: Any,
) -> Any:
    """HF TrainingArguments from the spec (DDP by default, FSDP2 when asked and on GPUs).

    accelerate only shards with FSDP on accelerators; on CPU workers fsdp runs as DDP (gloo).
    """
    from transformers import TrainingArguments

    spec = run.spec
    hp = spec.hyperparameters
    fsdp = use_fsdp(run, cuda)
    fsdp_kwargs = fsdp_arguments(model, hp.gradient_checkpointing, spec.distributed.fsdp) if fsdp else {}
    every = spec.checkpoint.every_steps
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=hp.batch_size_per_worker,
        per_device_eval_batch_size=hp.batch_size_per_worker,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_steps,
        weight_decay=hp.weight_decay,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        save_strategy="steps",
        save_steps=every,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=every if has_eval else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=hp.gradient_checkpointing and not fsdp,
        activation_checkpointing_kwargs={"use_reentrant": False} if hp.gradient_checkpointing else None,
        seed=hp.seed,
        data_seed=hp.seed,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        **fsdp_kwargs,
    )


def load_dtype(precision: Precision, lora: bool) -> str:
    """The dtype the base weights are loaded in.

    LoRA: the run's precision (bf16/fp16 on GPUs, fp32 on CPU). The base weights are frozen, so
    half-precision storage loses nothing and halves their memory; peft keeps the trainable adapters
    in fp32 and autocast does the rest. Full fine-tuning: fp32 master weights, the usual mixed
    precision: AMP's fp16 gradient scaler refuses fp16 parameters, and bf16 weights would round
    away small optimizer updates.
    """
    return precision if lora and precision != "fp32" else "fp32"


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_model(run: TrainingRun, plan: Plan, precision: Precision = "fp32") -> Any:
    """Base model in :func:`load_dtype`, wrapped with LoRA adapters when asked."""
    import torch
    from transformers import AutoModelForCausalLM

    lora = run.spec.effective_lora()
    model = AutoModelForCausalLM.from_pretrained(
        plan.model_ref,
        dtype=getattr(torch, TORCH_DTYPES[load_dtype(precision, lora is not None)]),
        revision=run.spec.model.revision,
        token=os.environ.get("HF_TOKEN"),
    )
    if run.spec.hyperparameters.gradient_checkpointing:
        model.config.use_cache = False
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@contextmanager
def latest_checkpoint() -> Iterator[tuple[str | None, int | None]]:
    """The HF checkpoint folder Ray restored for this run (and its step), if any."""
    import json

    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None, None
        return
    with checkpoint.as_directory() as folder:
        state_file = Path(folder) / "trainer_state.json"
        step = int(json.loads(state_file.read_text())["global_step"]) if state_file.is_file() else None
        yield (str(folder) if step is not None else None), step


def evaluated_at(log_history: list[dict[str, Any]], step: int) -> bool:
    """Whether the trainer already logged an eval loss for ``step`` (avoids a duplicate final eval)."""
    return any("eval_loss" in entry and entry.get("step") == step for entry in log_history)


def stage_model(
    trainer: Any, run: TrainingRun, plan: Plan, rank: int, token: str, tokenizer: Any
) -> Path | None:
    """Write the final model (full, adapter, or merged) to the staging folder; rank 0 returns it.

    The driver swaps it into place once ``fit()`` returned (see :mod:`.export`).
    """
    staging = staging_dir(plan.output_dir, token)
    adapter_stage = staging.with_name(staging.name + "-adapter")
    lora = run.spec.effective_lora()
    merge = lora is not None and lora.merge_on_export
    # Every rank takes part: FSDP gathers the full state dict; DDP writes on rank 0 only.
    trainer.save_model(str(adapter_stage if merge else staging))
    if rank != 0:
        return None
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing downstream needs it
    if merge:
        merge_adapter(
            plan.model_ref,
            adapter_stage,
            staging,
            tokenizer,
            revision=run.spec.model.revision,
            token=os.environ.get("HF_TOKEN"),
        )
        shutil.rmtree(adapter_stage, ignore_errors=True)
    return staging


def accelerators(plan: Plan, world_size: int, cuda: bool) -> int:
    """Accelerators the run holds (the MFU denominator counts every one, idle or not)."""
    if not cuda:
        return 0
    return world_size * max(1, int(plan.resources_per_worker.get("GPU", 1)))


def configure_mfu(
    tracker: ProgressTracker,
    model: Any,
    data: PreparedData,
    precision: Precision,
    device_name: str | None,
    devices: int,
) -> None:
    """Give the tracker what MFU needs: FLOPs per token of this model and data, the peak of the GPUs."""
    matmul, adapter = count_params(model)
    seq_len = token_weighted_length(*data.train.length_moments())
    tracker.flops_per_token = flops_per_token(model.config, matmul, seq_len, adapter)
    tracker.peak_flops = peak_flops(device_name, precision)
    tracker.devices = devices


def point_adapter_at(folder: Path, base_uri: str | None) -> None:
    """Name the object-store base model in an exported LoRA adapter instead of this pod's cache path.

    peft writes the local folder the base was loaded from; a server elsewhere must find the base
    at its URI (it downloads it the same way).
    """
    config_file = folder / "adapter_config.json"
    if base_uri is None or not config_file.is_file():
        return
    import json

    data = json.loads(config_file.read_text())
    data["base_model_name_or_path"] = base_uri
    config_file.write_text(json.dumps(data, indent=2))


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (``train_loop_per_worker``)."""
    import ray.train
    import torch
    import transformers
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import AutoTokenizer

    import ray

    run: TrainingRun = config["run"]
    plan: Plan = localize_model(config["plan"])  # an s3:// / gs:// model: to this node's cache
    data: PreparedData = ray.get(config["data"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()  # no tqdm bars for weight loading in the job log
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    cuda = plan.use_gpu and torch.cuda.is_available()
    precision = resolve_precision(
        run.spec.hyperparameters.precision, cuda, cuda and torch.cuda.is_bf16_supported()
    )
    requested = run.spec.hyperparameters.precision
    if rank == 0 and run.spec.distributed.strategy == "fsdp" and not use_fsdp(run, cuda):
        say("distributed.strategy fsdp needs GPU workers (accelerate shards only on accelerators); using DDP")
    if rank == 0 and requested not in ("auto", precision):
        say(f"precision {requested} -> {precision} (no GPU on the workers)")
    transformers.set_seed(run.spec.hyperparameters.seed)
    tokenizer = AutoTokenizer.from_pretrained(
        plan.model_ref, revision=run.spec.model.revision, token=os.environ.get("HF_TOKEN")
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    model = load_model(run, plan, precision)
    local_dir = tempfile.mkdtemp(prefix=f"llmray-hf-rank{rank}-")
    args = training_arguments(run, plan, precision, data.eval is not None, cuda, local_dir, model)
    tracker = ProgressTracker(output_dir=plan.output_dir if rank == 0 else None)
    configure_mfu(
        tracker,
        model,
        data,
        precision,
        torch.cuda.get_device_name() if cuda else None,
        accelerators(plan, context.get_world_size(), cuda),
    )
    metrics = TrainingMetrics(f"{run.namespace}/{run.name}", rank)
    if rank == 0:
        tracker.on_report = metrics.report
    with latest_checkpoint() as (resume_dir, resumed_step):
        if resumed_step is not None:
            tracker.checkpoint_path = plan.checkpoint_path(checkpoint_dir_name(resumed_step))
            tracker.checkpoint_step = resumed_step
        trainer = make_trainer(
            model=model,
            args=args,
            train_dataset=ExampleDataset(data.train),
            eval_dataset=ExampleDataset(data.eval) if data.eval is not None else None,
            data_collator=PadCollator(pad_id, 8 if cuda else 1),
            processing_class=tokenizer,
            callbacks=[
                RayProgressCallback(
                    plan,
                    rank,
                    tracker,
                    resumed_step,
                    metrics,
                    (lambda: int(torch.cuda.max_memory_allocated())) if cuda else (lambda: None),
                )
            ],
        )
        trainer = prepare_trainer(trainer)
        if rank == 0:
            say(
                f"worker setup: {context.get_world_size()} worker(s), "
                f"{trainer.accelerator.distributed_type.value}, fsdp={trainer.is_fsdp_enabled}, "
                f"precision {precision}, device {args.device}"
            )
        run_trainer(trainer, resume_dir)
    state = trainer.state
    if data.eval is not None and not evaluated_at(state.log_history, state.global_step):
        trainer.evaluate()
    staged = stage_model(trainer, run, plan, rank, config["export_token"], tokenizer)
    shutil.rmtree(local_dir, ignore_errors=True)
    if staged is not None:
        tracker.tokens_per_second = tracker.average_throughput(state.num_input_tokens_seen)
        final = tracker.report(
            state.global_step, state.epoch or 0.0, "finished", output_path=plan.output_location
        )
        (staged / PROGRESS_DIR).mkdir(exist_ok=True)
        (staged / PROGRESS_DIR / FINAL_REPORT).write_text(
            final.model_dump_json(by_alias=True, exclude_none=True)
        )
        if plan.output_uri is not None:
            point_adapter_at(staged, plan.model_uri)
            publish_remote(staged, plan.output_uri, config["export_token"], plan.store)
            shutil.rmtree(staged, ignore_errors=True)
