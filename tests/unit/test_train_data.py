"""Training data: reading files, loss masks per format, packing, split and padding (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmray.api.training import DatasetSpec
from llmray_workloads.tiny import data_dir
from llmray_workloads.train.config import ConfigError
from llmray_workloads.train.data import (
    IGNORE_INDEX,
    ExampleDataset,
    Examples,
    ExampleTable,
    PadCollator,
    chat_mask,
    data_files,
    load_records,
    prepare_data,
    split_examples,
    tokenize_chat,
    tokenize_instruction,
    tokenize_text,
)
from tests.models import shared_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    model = shared_tiny_model()
    return AutoTokenizer.from_pretrained(model)


def spec(**fields: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"uri": "file:///data", **fields})


def learned_text(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    return str(tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]))


def test_instruction_masks_the_prompt(tokenizer: Any) -> None:
    records = [{"prompt": "What is two plus three?", "response": "Five."}]
    out = tokenize_instruction(records, spec(format="instruction"), tokenizer, 64)
    ids, labels = out.input_ids[0], out.labels[0]
    assert ids[0] == tokenizer.bos_token_id
    assert learned_text(tokenizer, ids, labels) == "Five.</s>"
    assert tokenizer.decode(ids) == "<s>What is two plus three?Five.</s>"


def test_instruction_custom_fields_and_truncation(tokenizer: Any) -> None:
    records = [{"q": "A long question " * 20, "a": "Short."}]
    out = tokenize_instruction(
        records, spec(format="instruction", promptField="q", responseField="a"), tokenizer, 16
    )
    assert len(out.input_ids[0]) == 16
    assert all(label == IGNORE_INDEX for label in out.labels[0])  # the response fell off the end


def test_chat_learns_only_assistant_turns(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    out = tokenize_chat([{"messages": messages}], spec(format="chat"), tokenizer, 256)
    assert learned_text(tokenizer, out.input_ids[0], out.labels[0]) == "Hello.</s>Goodbye.</s>"


def test_chat_mask_without_generation_markers(tokenizer: Any) -> None:
    """Templates of real models rarely mark generation; the prefix-rendering fallback finds the turns."""
    plain = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    tokenizer.chat_template, saved = plain, tokenizer.chat_template
    try:
        ids, mask = chat_mask(tokenizer, messages)
    finally:
        tokenizer.chat_template = saved
    kept = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert kept == "Hello.</s>\nGoodbye.</s>\n"  # the turn's own end-of-turn tokens are learned too


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "no string 'content'"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
        ({"other": 1}, "field 'messages'"),
    ],
)
def test_chat_bad_records(tokenizer: Any, record: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"spec.dataset.messagesField") as err:
        tokenize_chat([record], spec(format="chat"), tokenizer, 64)
    assert message in str(err.value)


def test_text_packing_fills_blocks(tokenizer: Any) -> None:
    records = [{"text": line} for line in (data_dir() / "corpus.txt").read_text().splitlines()[:40]]
    packed = tokenize_text(records, spec(packing=True), tokenizer, 64)
    assert all(len(ids) == 64 for ids in packed.input_ids[:-1])
    assert packed.input_ids == packed.labels
    unpacked = tokenize_text(records, spec(), tokenizer, 64)
    assert len(unpacked) == 40
    assert unpacked.input_ids[0][0] == tokenizer.bos_token_id
    assert unpacked.input_ids[0][-1] == tokenizer.eos_token_id


def test_prepare_data_errors(tokenizer: Any) -> None:
    from datasets import Dataset

    with pytest.raises(ConfigError, match=r"spec.dataset.uri: the dataset is empty"):
        prepare_data(Dataset.from_dict({"text": []}), spec(), tokenizer, 64, 0)
    with pytest.raises(ConfigError, match=r"spec.dataset.textField: records have no field 'body'"):
        prepare_data(Dataset.from_dict({"text": ["x"]}), spec(textField="body"), tokenizer, 64, 0)
    with pytest.raises(ConfigError, match=r"record 1 has no string field 'response'"):
        records = Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}])
        prepare_data(records, spec(format="instruction"), tokenizer, 64, 0)
    with pytest.raises(ConfigError, match=r"maxSeqLength \(8\)"):
        records = Dataset.from_list([{"prompt": "a long prompt " * 10, "response": "b"}])
        prepare_data(records, spec(format="instruction"), tokenizer, 8, 0)


def test_split_is_deterministic_and_disjoint() -> None:
    examples = Examples()
    for i in range(20):
        examples.add([i, i], [i, i])
    train, held = split_examples(examples, 0.25, seed=7)
    again_train, again_held = split_examples(examples, 0.25, seed=7)
    assert held is not None and again_held is not None
    assert (train.input_ids, held.input_ids) == (again_train.input_ids, again_held.input_ids)
    assert len(held) == 5 and len(train) == 15
    assert not {tuple(x) for x in train.input_ids} & {tuple(x) for x in held.input_ids}
    assert split_examples(examples, 0.0, 7) == (examples, None)


def test_collator_pads_to_longest() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = PadCollator(pad_token_id=0, pad_to_multiple_of=4)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_examples_travel_as_arrow_and_are_read_as_views() -> None:
    """Arrow int32 columns survive pickling (how Ray ships them); rows are numpy views, not copies."""
    import pickle

    import numpy as np
    import pyarrow as pa

    examples = Examples()
    examples.add([1, 2, 3], [IGNORE_INDEX, 2, 3])
    examples.add([70000], [70000])
    table = pickle.loads(pickle.dumps(ExampleTable.from_examples(examples), protocol=5))
    assert table.table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert (len(table), table.num_tokens()) == (2, 4)
    dataset = ExampleDataset(table)
    first = dataset[0]
    assert (first["input_ids"].tolist(), first["labels"].tolist()) == ([1, 2, 3], [IGNORE_INDEX, 2, 3])
    assert np.shares_memory(first["input_ids"], dataset.input_ids) and dataset[1]["labels"].tolist() == [
        70000
    ]
    with pytest.raises(IndexError):
        dataset[2]
    frozen = [{k: v.copy() for k, v in dataset[i].items()} for i in range(2)]
    for row in frozen:
        for column in row.values():
            column.flags.writeable = False  # Ray's shared buffers are read-only
    out = PadCollator(pad_token_id=0)(frozen)
    assert out["input_ids"].tolist() == [[1, 2, 3], [70000, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [70000, IGNORE_INDEX, IGNORE_INDEX]]


def test_reads_jsonl_parquet_text_and_folders(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["three"]}), tmp_path / "b.parquet")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "c.txt").write_text("four\nfive\n")
    (tmp_path / "txt" / "d.txt").write_text("six\n")
    assert load_records(str(tmp_path / "a.jsonl"), False, spec())["text"] == ["one", "two"]
    assert load_records(str(tmp_path / "b.parquet"), False, spec())["text"] == ["three"]
    assert load_records(str(tmp_path / "txt"), False, spec())["text"] == ["four", "five", "six"]
    with pytest.raises(ConfigError, match=r"mixes file types"):
        data_files(tmp_path)
    with pytest.raises(ConfigError, match=r"does not exist"):
        data_files(tmp_path / "missing")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"spec.dataset.uri: cannot read .*bad.jsonl as json"):
        load_records(str(tmp_path / "bad.jsonl"), False, spec())


def test_bundled_examples_tokenise(tokenizer: Any) -> None:
    """The bundled instruction and chat sets (used by demos and the Ray tests) are valid."""
    for name, fmt in (("instructions.jsonl", "instruction"), ("chat.jsonl", "chat")):
        records = load_records(str(data_dir() / name), False, spec(format=fmt))
        prepared = prepare_data(records, spec(format=fmt, validationSplit=0.1), tokenizer, 128, 0)
        assert prepared.dropped == 0 and prepared.eval is not None
        assert len(prepared.train) + len(prepared.eval) == prepared.records
