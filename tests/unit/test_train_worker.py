"""Worker-side pieces without Ray: HF arguments from the spec, FSDP settings, exact resumption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmray.api.runtime import TrainingRun
from llmray_workloads.tiny import data_dir
from llmray_workloads.train.config import resolve_plan
from llmray_workloads.train.data import ExampleDataset, PadCollator
from llmray_workloads.train.preflight import preflight
from llmray_workloads.train.worker import (
    checkpoint_dir_name,
    evaluated_at,
    fsdp_arguments,
    load_dtype,
    load_model,
    make_trainer,
    run_trainer,
    training_arguments,
    use_fsdp,
)
from tests.models import shared_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny() -> Path:
    return shared_tiny_model()


def make_run(tiny: Path, out: Path, **spec: Any) -> TrainingRun:
    base: dict[str, Any] = {
        "model": {"uri": f"file://{tiny}"},
        "dataset": {"uri": f"file://{data_dir() / 'corpus.txt'}", "packing": True},
        "hyperparameters": {"maxSteps": 4, "batchSizePerWorker": 4, "maxSeqLength": 64, "learningRate": 1e-3},
        "checkpoint": {"everySteps": 4},
        "output": {"uri": f"file://{out}"},
    }
    return TrainingRun.model_validate({"name": "w", "spec": {**base, **spec}})


def test_arguments_follow_the_spec(tiny: Path, tmp_path: Path) -> None:
    run = make_run(
        tiny,
        tmp_path,
        method="lora",
        hyperparameters={
            "epochs": 2,
            "lrScheduler": "cosine",
            "warmupSteps": 3,
            "gradientAccumulationSteps": 4,
            "gradientCheckpointing": True,
            "seed": 7,
            "loggingSteps": 2,
        },
        checkpoint={"everySteps": 5},
    )
    plan = resolve_plan(run)
    model = load_model(run, plan)
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    args = training_arguments(run, plan, "fp32", True, False, str(tmp_path / "hf"), model)
    assert (args.num_train_epochs, args.max_steps, args.gradient_accumulation_steps) == (2, -1, 4)
    assert (args.save_steps, args.eval_steps, args.logging_steps) == (5, 5, 2)
    assert (args.seed, args.data_seed, args.warmup_steps) == (7, 7, 3)
    assert args.lr_scheduler_type.value == "cosine"
    assert args.activation_checkpointing and not args.bf16 and not args.fp16 and args.use_cpu
    assert not args.fsdp  # asked for nothing, and CPU workers never shard


def test_fsdp_only_on_gpus_and_wraps_decoder_layers(tiny: Path, tmp_path: Path) -> None:
    run = make_run(tiny, tmp_path, distributed={"strategy": "fsdp"}, workers={"replicas": 2})
    assert use_fsdp(run, cuda=True) and not use_fsdp(run, cuda=False)
    model = load_model(run, resolve_plan(run))
    config = fsdp_arguments(model, activation_checkpointing=True)["fsdp_config"]
    assert config["version"] == 2 and config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert config["activation_checkpointing"] and config["state_dict_type"] == "FULL_STATE_DICT"
    assert config["reshard_after_forward"] is True and config["cpu_offload"] is False  # full_shard


def test_fsdp_sharding_strategy_and_cpu_offload_reach_accelerate(tiny: Path, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    fsdp = {"strategy": "fsdp", "fsdp": {"shardingStrategy": "shard_grad_op", "cpuOffload": True}}
    run = make_run(tiny, tmp_path, distributed=fsdp, workers={"replicas": 1, "resources": {"gpu": 2}})
    model = load_model(run, resolve_plan(run))
    kwargs = fsdp_arguments(model, False, run.spec.distributed.fsdp)
    assert kwargs["fsdp_config"]["reshard_after_forward"] is False
    # What accelerate's FullyShardedDataParallelPlugin is built from (no GPU needed to parse it).
    args = TrainingArguments(output_dir=str(tmp_path / "args"), use_cpu=True, report_to="none", **kwargs)
    plugin = args.fsdp_plugin_args
    assert (plugin["fsdp_version"], plugin["reshard_after_forward"], plugin["cpu_offload"]) == (
        2,
        False,
        True,
    )


def test_resuming_a_finished_run_does_no_extra_step(tiny: Path, tmp_path: Path) -> None:
    """transformers would run step max_steps + 1 after resuming from the last checkpoint."""
    run = make_run(tiny, tmp_path / "out")
    prepared = preflight(run)

    def trainer(output_dir: Path) -> Any:
        model = load_model(run, prepared.plan)
        args = training_arguments(run, prepared.plan, "fp32", False, False, str(output_dir), model)
        return make_trainer(
            model=model,
            args=args,
            train_dataset=ExampleDataset(prepared.data.train),
            data_collator=PadCollator(prepared.tokenizer.pad_token_id),
        )

    first = trainer(tmp_path / "a")
    run_trainer(first, None)
    assert first.state.global_step == 4
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}
    again = trainer(tmp_path / "b")
    run_trainer(again, str(tmp_path / "a" / "checkpoint-4"))
    assert again.state.global_step == 4
    restored = again.model.state_dict()  # the checkpoint's weights, ready for export
    assert all(torch_equal(restored[k], v) for k, v in trained.items())


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_lora_base_loads_in_the_run_precision(tiny: Path, tmp_path: Path) -> None:
    """Frozen LoRA base weights in bf16/fp16 (adapters stay fp32); full fine-tuning keeps fp32 masters."""
    import torch

    assert [load_dtype(p, lora=True) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    assert [load_dtype(p, lora=False) for p in ("bf16", "fp16", "fp32")] == ["fp32"] * 3
    run = make_run(tiny, tmp_path, method="lora")
    model = load_model(run, resolve_plan(run), "bf16")
    dtypes = {(("lora_" in name), p.dtype) for name, p in model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    full = make_run(tiny, tmp_path, method="full")
    assert {p.dtype for p in load_model(full, resolve_plan(full), "bf16").parameters()} == {torch.float32}


def test_small_helpers() -> None:
    assert checkpoint_dir_name(40) == "checkpoint-000040"
    history = [{"loss": 1.0, "step": 5}, {"eval_loss": 2.0, "step": 10}]
    assert evaluated_at(history, 10) and not evaluated_at(history, 5)
