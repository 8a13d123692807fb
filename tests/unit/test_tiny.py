"""The tiny local model: loadable, deterministic, cached, with a chat template marking assistant turns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmray_workloads.tiny import STAMP_FILE, build_tiny_model, data_dir

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_folder_is_hugging_face_format(tiny: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", STAMP_FILE):
        assert (tiny / name).is_file(), name


def test_loads_and_runs_forward(tiny: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 512
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tokenizer("The river does not hurry.", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "The river does not hurry."
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_chat_template_marks_only_assistant_turns(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(tiny)
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello friend."},
    ]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    kept = [tok for tok, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(kept) == "Hello friend.</s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_deterministic_and_cached(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime  # cache hit: untouched
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_rebuilds_over_a_different_build(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m", seed=1)
    before = (out / STAMP_FILE).read_text()
    build_tiny_model(out, seed=2)
    assert (out / STAMP_FILE).read_text() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_bundled_data_present() -> None:
    root = data_dir()
    assert len((root / "corpus.txt").read_text().splitlines()) >= 200
    assert (root / "instructions.jsonl").is_file()
    assert (root / "chat.jsonl").is_file()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "llmray_workloads.tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").is_file()
