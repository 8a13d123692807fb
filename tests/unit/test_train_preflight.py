"""Bad input fails in the driver before any worker starts: exit 2, the field named, nothing written.

Runs the real entry point (``main``) in-process with ``--check`` where Ray is not needed; the
capacity check, which needs a cluster, is in tests/ray/test_train.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from llmray_workloads.tiny import data_dir
from llmray_workloads.train.driver import EXIT_BAD_INPUT, main
from tests.models import shared_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny() -> Path:
    return shared_tiny_model()


def write_run(tmp_path: Path, tiny: Path, **spec: Any) -> Path:
    base: dict[str, Any] = {
        "model": {"uri": f"file://{tiny}"},
        "dataset": {"uri": f"file://{data_dir() / 'corpus.txt'}"},
        "hyperparameters": {"maxSeqLength": 64},
        "output": {"uri": f"file://{tmp_path / 'out'}"},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"name": "bad", "spec": {**base, **spec}}))
    return path


def run_check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--config", str(config), "--check"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_good_config_passes(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(write_run(tmp_path, tiny), capsys)
    assert code == 0, out
    assert "262 records" in out
    assert not (tmp_path / "out").exists()


def bad_cases(tmp_path: Path, tiny: Path) -> dict[str, tuple[dict[str, Any], str]]:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "nomodel").mkdir()
    corpus = {"uri": f"file://{data_dir() / 'corpus.txt'}"}
    return {
        "missing model": (
            {"model": {"uri": f"file://{tmp_path}/no-such-model"}},
            "spec.model.uri: model folder",
        ),
        "not a model": (
            {"model": {"uri": f"file://{tmp_path}/nomodel"}},
            "spec.model.uri: .* no config.json",
        ),
        "missing dataset": (
            {"dataset": {"uri": f"file://{tmp_path}/none.jsonl"}},
            "spec.dataset.uri: .* not exist",
        ),
        "empty dataset": (
            {"dataset": {"uri": f"file://{tmp_path}/empty.jsonl"}},
            "spec.dataset.uri: .*empty",
        ),
        "missing field": (
            {"dataset": {"uri": f"file://{tmp_path}/nofield.jsonl"}},
            "spec.dataset.textField: records have no field 'text'",
        ),
        "instruction fields": (
            {"dataset": {**corpus, "format": "instruction"}},
            "spec.dataset.promptField/responseField: records have no field 'prompt', 'response'",
        ),
        "seq too long": (
            {"hyperparameters": {"maxSeqLength": 1024}},
            r"spec.hyperparameters.maxSeqLength: 1024 exceeds the model's max_position_embeddings \(512\)",
        ),
        "lora targets": (
            {"method": "lora", "lora": {"targetModules": ["q_proj", "query_key_value"]}},
            "spec.lora.targetModules: query_key_value not found in the model; .*q_proj",
        ),
        "spec rule": (
            {"method": "full", "lora": {"r": 4}},
            "spec.lora may only be set when spec.method is lora",
        ),
        "output volume root": (
            {"output": {"uri": "file:///proc"}},
            "spec.output.uri: /proc is a mount point",
        ),
    }


CASES = [
    "missing model",
    "not a model",
    "missing dataset",
    "empty dataset",
    "missing field",
    "instruction fields",
    "seq too long",
    "lora targets",
    "spec rule",
    "output volume root",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: str, tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    spec, pattern = bad_cases(tmp_path, tiny)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out = run_check(write_run(tmp_path, tiny, **spec), capsys)
    assert code == EXIT_BAD_INPUT, out
    assert re.search(pattern, out), out
    assert "llmray-train: error:" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "run.json"})  # nothing written


def test_hub_model_unreachable_fails_fast(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No network here: the hub check must fail in one quick request, not after minutes of retries."""
    started = time.monotonic()
    code, out = run_check(write_run(tmp_path, tiny, model={"uri": "hf://llmray-tests/no-such-model"}), capsys)
    assert code == EXIT_BAD_INPUT
    assert "spec.model.uri: cannot reach hf://llmray-tests/no-such-model" in out
    assert "HF_TOKEN" in out
    assert time.monotonic() - started < 30
