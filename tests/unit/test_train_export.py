"""Final-model export (atomic swap, carry-over, LoRA merge) and progress reporting, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray.api.runtime import parse_progress
from llmray_workloads.train.export import (
    clean_stale,
    merge_adapter,
    new_model_version,
    publish,
    read_model_version,
    staging_dir,
)
from llmray_workloads.train.progress import ProgressTracker, emit, progress_path, read_progress
from tests.models import shared_tiny_model

pytestmark = pytest.mark.unit


def make_stage(out: Path, token: str, files: dict[str, str]) -> Path:
    stage = staging_dir(out, token)
    stage.mkdir(parents=True)
    for name, text in files.items():
        (stage / name).write_text(text)
    return stage


def test_first_publish_is_a_rename(tmp_path: Path) -> None:
    out = tmp_path / "model"
    stage = make_stage(out, "a1", {"config.json": "{}", "model.safetensors": "w1"})
    publish(stage, out)
    assert not stage.exists()
    assert (out / "model.safetensors").read_text() == "w1"
    manifest = json.loads((out / ".llmray" / "manifest.json").read_text())
    assert manifest["files"] == ["config.json", "model.safetensors"]


def test_republish_replaces_model_keeps_checkpoints_and_progress(tmp_path: Path) -> None:
    out = tmp_path / "model"
    publish(make_stage(out, "a1", {"config.json": "{}", "model.safetensors": "full"}), out)
    (out / "checkpoints" / "run").mkdir(parents=True)
    (out / "checkpoints" / "run" / "snapshot.json").write_text("ckpt")
    (out / ".llmray" / "progress.json").write_text("{}")
    # Second export is a LoRA adapter: the old full weights must not linger next to it.
    publish(make_stage(out, "b2", {"adapter_config.json": "{}", "adapter_model.safetensors": "lora"}), out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".llmray", "adapter_config.json", "adapter_model.safetensors", "checkpoints"]
    assert (out / "checkpoints" / "run" / "snapshot.json").read_text() == "ckpt"
    assert (out / ".llmray" / "progress.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging / old leftovers


def test_each_export_records_its_version(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert read_model_version(out) is None
    v1 = new_model_version("a1b2c3d4e5f6", now=0.0)
    assert v1 == "19700101-000000-a1b2c3d4"
    publish(make_stage(out, "a1", {"model.safetensors": "w1"}), out, v1)
    assert read_model_version(out) == v1
    v2 = new_model_version("ffff0000", now=60.0)
    publish(make_stage(out, "b2", {"model.safetensors": "w2"}), out, v2)
    assert read_model_version(out) == v2 != v1
    (out / ".llmray" / "manifest.json").write_text("[1, 2]")  # not an object: no version
    assert read_model_version(out) is None


def test_clean_stale_removes_only_this_outputs_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "model"
    make_stage(out, "dead", {"x": "1"})
    (tmp_path / ".model.old-dead").mkdir()
    other = make_stage(tmp_path / "other", "live", {"x": "1"})
    clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]


def test_merge_adapter_writes_a_plain_model(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = shared_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)  # a non-zero update, so merging changes q_proj
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merge_adapter(str(base_dir), tmp_path / "adapter", tmp_path / "merged", tokenizer)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_progress_line_and_file_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tracker = ProgressTracker(output_dir=str(tmp_path))
    tracker.start(total_steps=10, tokens_seen=0)
    tracker.loss, tracker.learning_rate = 2.5, 1e-3
    tracker.update_throughput(tokens_seen=1000)
    tracker.emit(step=3, epoch=0.5)
    line = capsys.readouterr().out
    assert line.startswith("LLMRAY_PROGRESS {")
    report = parse_progress(line)
    assert report is not None and report == read_progress(tmp_path)
    assert (report.step, report.total_steps, report.loss, report.state) == (3, 10, 2.5, "running")
    assert report.tokens_per_second is not None and report.tokens_per_second > 0
    assert progress_path(tmp_path) == tmp_path / ".llmray" / "progress.json"


def test_restore_from_log_history() -> None:
    tracker = ProgressTracker(output_dir=None)
    tracker.restore(
        [{"loss": 3.0, "learning_rate": 0.1, "step": 1}, {"eval_loss": 2.0, "step": 2}, {"loss": 1.5}]
    )
    assert (tracker.loss, tracker.eval_loss, tracker.learning_rate) == (1.5, 2.0, 0.1)


def test_emit_without_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmray.api.runtime import ProgressReport

    emit(ProgressReport(step=1, state="failed"), None)
    assert '"state": "failed"' in capsys.readouterr().out
