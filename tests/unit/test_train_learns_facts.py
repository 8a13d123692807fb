"""The demo's fine-tune learns: examples/training-tiny-cpu.yaml's run, in-process, answers the facts.

Same model, data, spec, steps and global batch as the example's 2 Ray Train workers (each step
covers all 8 facts, so one process with the global batch takes the same steps), then greedy
decoding of the prompt the Serve engine renders for a chat completion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.api.runtime import TrainingRun
from llmray_workloads.tiny import FACTS_FILE, data_dir, facts
from llmray_workloads.train.data import ExampleDataset, PadCollator
from llmray_workloads.train.preflight import preflight
from llmray_workloads.train.worker import load_model, make_trainer, run_trainer, training_arguments
from tests.models import shared_tiny_model

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "training-tiny-cpu.yaml"


def example_run(model: Path, out: Path) -> TrainingRun:
    """The example's spec with its /tmp/llmray paths pointed at this test's model and data."""
    spec: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())["spec"]
    assert spec["model"]["uri"] == "file:///tmp/llmray/models/tiny"
    assert spec["dataset"]["uri"] == f"file:///tmp/llmray/data/{FACTS_FILE}"
    spec["model"]["uri"] = f"file://{model}"
    spec["dataset"]["uri"] = f"file://{data_dir() / FACTS_FILE}"
    spec["output"]["uri"] = f"file://{out}"
    return TrainingRun.model_validate({"name": "tiny-train", "spec": spec})


def test_example_fine_tune_answers_the_facts(tmp_path: Path) -> None:
    import torch

    tiny = shared_tiny_model()
    run = example_run(tiny, tmp_path / "out")
    prepared = preflight(run)
    hp, workers = run.spec.hyperparameters, run.spec.workers.replicas
    assert len(prepared.data.train) == len(facts()) == hp.batch_size_per_worker * workers
    one_process = run.spec.model_copy(
        update={
            "hyperparameters": hp.model_copy(
                update={"batch_size_per_worker": hp.batch_size_per_worker * workers}
            )
        }
    )
    run = run.model_copy(update={"spec": one_process})
    torch.manual_seed(hp.seed)
    model = load_model(run, prepared.plan)
    args = training_arguments(run, prepared.plan, "fp32", False, False, str(tmp_path / "hf"), model)
    args.save_strategy = "no"
    trainer = make_trainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(prepared.data.train),
        data_collator=PadCollator(prepared.tokenizer.pad_token_id),
    )
    run_trainer(trainer, None)
    assert trainer.state.global_step == hp.max_steps

    tokenizer, model = prepared.tokenizer, trainer.model.eval()
    answers = []
    for question, _ in facts():
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=32, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    assert answers == [answer for _, answer in facts()]
