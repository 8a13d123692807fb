"""Reading records and turning them into (input_ids, labels) examples.

Runs in the driver, before any worker starts, so bad data fails early with the field named. The
tokenised examples are stored as an Arrow table (``list<int32>`` columns: 4 bytes a token, no Python
objects) and travel to the workers through the Ray object store: each node holds one copy in shared
memory and its workers map it without deserialising (Arrow buffers are zero-copy in Ray), reading
only the rows their sampler picks. Every worker sees the exact same examples in the same order (a
resumed run skips the batches it already trained on, which only works if the data is identical).

Loss masking (TRL is not installed, and its SFT collator would be the only thing we used from it):
- text: every token is a label (packing optional);
- instruction: ``bos + prompt`` is masked (-100), ``response + eos`` is learned;
- chat: only assistant turns are learned. Templates with ``{% generation %}`` markers give the mask
  directly; for other templates each assistant turn's span is found by rendering the conversation
  prefix with ``add_generation_prompt`` and the conversation up to the end of the turn.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmray.api.training import DatasetSpec

from .config import ConfigError

IGNORE_INDEX = -100
SUFFIX_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Examples:
    """Tokenised examples: parallel lists of token ids and labels (IGNORE_INDEX where masked)."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, ids: Sequence[int], labels: Sequence[int]) -> None:
        self.input_ids.append(list(ids))
        self.labels.append(list(labels))

    def subset(self, indices: Iterable[int]) -> Examples:
        out = Examples()
        for i in indices:
            out.add(self.input_ids[i], self.labels[i])
        return out

    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


class ExampleTable:
    """Tokenised examples as an Arrow table (``input_ids``, ``labels``: ``list<int32>``).

    Pickles as Arrow buffers, which the Ray object store shares zero-copy between the workers of a
    node; rows are read as numpy views of those buffers.
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    @classmethod
    def from_examples(cls, examples: Examples) -> ExampleTable:
        import pyarrow as pa

        column = pa.list_(pa.int32())
        return cls(
            pa.table(
                {
                    "input_ids": pa.array(examples.input_ids, type=column),
                    "labels": pa.array(examples.labels, type=column),
                }
            )
        )

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def num_tokens(self) -> int:
        import pyarrow.compute as pc

        return int(pc.sum(pc.list_value_length(self.table.column("input_ids"))).as_py() or 0)

    def length_moments(self) -> tuple[int, int]:
        """``(sum(len), sum(len²))`` over the examples (for the attention term of MFU)."""
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self.table.column("input_ids")).cast("int64")
        total = pc.sum(lengths).as_py() or 0
        squares = pc.sum(pc.multiply(lengths, lengths)).as_py() or 0
        return int(total), int(squares)

    def columns(self) -> tuple[Any, Any, Any]:
        """Row offsets and the flat token / label arrays (numpy views, no copy)."""
        ids = self.table.column("input_ids").combine_chunks()
        labels = self.table.column("labels").combine_chunks()
        if not ids.offsets.equals(labels.offsets):
            raise ValueError("input_ids and labels rows differ in length")
        return ids.offsets.to_numpy(), ids.values.to_numpy(), labels.values.to_numpy()


@dataclass
class PreparedData:
    """What the workers train and evaluate on."""

    train: ExampleTable
    eval: ExampleTable | None
    records: int
    dropped: int


# ---------------------------------------------------------------------------------------------- reading


def data_files(path: Path) -> tuple[str, list[str]]:
    """The loader kind (json, parquet, text) and sorted files of a file or folder."""
    if not path.exists():
        raise ConfigError(f"spec.dataset.uri: {path} does not exist")
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in SUFFIX_KINDS and not any(part.startswith(".") for part in p.parts)
        )
        if not files:
            raise ConfigError(f"spec.dataset.uri: {path} holds no .jsonl, .json, .parquet or .txt files")
    kinds = {SUFFIX_KINDS.get(p.suffix) for p in files}
    if None in kinds:
        raise ConfigError(
            f"spec.dataset.uri: {files[0].name}: unsupported file type (use .jsonl, .parquet, .txt)"
        )
    if len(kinds) > 1:
        raise ConfigError(
            f"spec.dataset.uri: {path} mixes file types {sorted(k for k in kinds if k)}; use one"
        )
    for p in files:
        try:
            with p.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"spec.dataset.uri: cannot read {p}: {exc.strerror or exc}") from exc
    return str(kinds.pop()), [str(p) for p in files]


def load_records(ref: str, is_hub: bool, spec: DatasetSpec, token: str | None = None) -> Any:
    """The dataset as a ``datasets.Dataset`` (hub repo id or local file/folder)."""
    import datasets

    datasets.disable_progress_bars()
    if is_hub:
        try:
            return datasets.load_dataset(ref, split=spec.split, token=token)
        except Exception as exc:
            raise ConfigError(
                f"spec.dataset.uri: cannot load hf://{ref} (split {spec.split!r}) from the Hugging Face "
                f"hub: {_short(exc)}. Check the name, spec.dataset.split, HF_TOKEN for gated sets, "
                "and network access."
            ) from exc
    kind, files = data_files(Path(ref))
    cache = tempfile.mkdtemp(prefix="llmray-data-")  # local files: no cache left behind in $HOME
    try:
        loaded = datasets.load_dataset(
            kind, data_files=files, split="train", cache_dir=cache, keep_in_memory=True
        )
        return loaded
    except Exception as exc:
        raise ConfigError(f"spec.dataset.uri: cannot read {ref} as {kind}: {_short(exc)}") from exc
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    cause = exc.__cause__ or exc.__context__
    first = text[0] if text else type(exc).__name__
    if cause is not None and str(cause).strip():
        first += f" ({str(cause).strip().splitlines()[0]})"
    return first[:500]


def required_field(spec: DatasetSpec) -> tuple[str, list[str]]:
    """Wire name of the spec field naming the record fields a format needs, and those fields."""
    if spec.format == "text":
        return "spec.dataset.textField", [spec.text_field]
    if spec.format == "instruction":
        return "spec.dataset.promptField/responseField", [spec.prompt_field, spec.response_field]
    return "spec.dataset.messagesField", [spec.messages_field]


def check_columns(columns: Sequence[str], spec: DatasetSpec) -> None:
    """Refuse a dataset whose records lack the fields the format reads."""
    where, needed = required_field(spec)
    missing = [name for name in needed if name not in columns]
    if missing:
        raise ConfigError(
            f"{where}: records have no field {', '.join(repr(m) for m in missing)} "
            f"(format {spec.format}; fields present: {', '.join(columns) or 'none'})"
        )


# ---------------------------------------------------------------------------------------------- tokenising


def _string(record: dict[str, Any], name: str, index: int, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: record {index} has no string field {name!r} (got {type(value).__name__})"
        )
    return value


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenize_text(
    records: Sequence[dict[str, Any]], spec: DatasetSpec, tokenizer: Any, max_len: int
) -> Examples:
    """``bos + text + eos`` per record, truncated, or packed into max_len blocks."""
    texts = [_string(r, spec.text_field, i, "spec.dataset.textField") for i, r in enumerate(records)]
    encoded = [
        _bos(tokenizer) + ids + _eos(tokenizer) for ids in _encode(tokenizer, [t for t in texts if t.strip()])
    ]
    out = Examples()
    if spec.packing:
        stream = [tok for ids in encoded for tok in ids]
        for start in range(0, len(stream), max_len):
            block = stream[start : start + max_len]
            if len(block) > 1:
                out.add(block, block)
    else:
        for ids in encoded:
            ids = ids[:max_len]
            if len(ids) > 1:
                out.add(ids, ids)
    return out


def tokenize_instruction(
    records: Sequence[dict[str, Any]], spec: DatasetSpec, tokenizer: Any, max_len: int
) -> Examples:
    """``bos + prompt`` (masked) then ``response + eos`` (learned), truncated to max_len."""
    where = "spec.dataset.promptField/responseField"
    prompts = [_string(r, spec.prompt_field, i, where) for i, r in enumerate(records)]
    responses = [_string(r, spec.response_field, i, where) for i, r in enumerate(records)]
    out = Examples()
    for p_ids, r_ids in zip(_encode(tokenizer, prompts), _encode(tokenizer, responses), strict=True):
        prompt = _bos(tokenizer) + p_ids
        response = r_ids + _eos(tokenizer)
        ids = (prompt + response)[:max_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_len]
        out.add(ids, labels)
    return out


def _messages(record: dict[str, Any], name: str, index: int) -> list[dict[str, str]]:
    value = record.get(name)
    where = "spec.dataset.messagesField"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: record {index} field {name!r} must be a non-empty list of messages")
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ConfigError(f"{where}: record {index} message {turn} has no string 'role'")
        if not isinstance(message.get("content"), str):
            raise ConfigError(f"{where}: record {index} message {turn} has no string 'content'")
    if not any(m["role"] == "assistant" for m in value):
        raise ConfigError(f"{where}: record {index} has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _render(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)


def chat_mask(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of assistant-turn tokens."""
    if _GENERATION_TAG.search(tokenizer.chat_template or ""):
        out = _render(tokenizer, messages, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    ids = list(_render(tokenizer, messages)["input_ids"])
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)["input_ids"]) if i else 0
        end = len(_render(tokenizer, messages[: i + 1])["input_ids"])
        mask[start:end] = [1] * (end - start)
    return ids, mask


def tokenize_chat(
    records: Sequence[dict[str, Any]], spec: DatasetSpec, tokenizer: Any, max_len: int
) -> Examples:
    """Conversations rendered with the tokenizer's chat template; loss only on assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "spec.dataset.format: chat needs a tokenizer with a chat template; this model has none"
        )
    out = Examples()
    for i, record in enumerate(records):
        ids, mask = chat_mask(tokenizer, _messages(record, spec.messages_field, i))
        labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, mask, strict=True)]
        out.add(ids[:max_len], labels[:max_len])
    return out


TOKENIZERS = {"text": tokenize_text, "instruction": tokenize_instruction, "chat": tokenize_chat}


def drop_unlearnable(examples: Examples) -> tuple[Examples, int]:
    """Remove examples with no label token left (e.g. a prompt longer than maxSeqLength)."""
    keep = [i for i, labels in enumerate(examples.labels) if any(t != IGNORE_INDEX for t in labels[1:])]
    return examples.subset(keep), len(examples) - len(keep)


def split_examples(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples | None]:
    """Deterministic train / validation split (same seed → same split on every attempt)."""
    if fraction <= 0:
        return examples, None
    if len(examples) < 2:
        raise ConfigError("spec.dataset.validationSplit: needs at least 2 examples to hold some out")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(order) - 1, max(1, round(len(order) * fraction)))
    return examples.subset(sorted(order[n_eval:])), examples.subset(sorted(order[:n_eval]))


def prepare_data(records: Any, spec: DatasetSpec, tokenizer: Any, max_len: int, seed: int) -> PreparedData:
    """Validate and tokenise a loaded dataset; every problem becomes a ConfigError naming its field."""
    if len(records) == 0:
        raise ConfigError("spec.dataset.uri: the dataset is empty")
    check_columns(list(records.column_names), spec)
    rows = records.to_list() if hasattr(records, "to_list") else list(records)
    examples = TOKENIZERS[spec.format](rows, spec, tokenizer, max_len)
    examples, dropped = drop_unlearnable(examples)
    if len(examples) == 0:
        raise ConfigError(
            "spec.dataset.uri: no example has a token to learn from"
            + (
                f" within spec.hyperparameters.maxSeqLength ({max_len})"
                if dropped
                else " (all texts are empty)"
            )
        )
    train, held_out = split_examples(examples, spec.validation_split, seed)
    return PreparedData(
        train=ExampleTable.from_examples(train),
        eval=ExampleTable.from_examples(held_out) if held_out is not None else None,
        records=len(rows),
        dropped=dropped,
    )


# ---------------------------------------------------------------------------------------------- batching


class ExampleDataset:
    """Map-style torch dataset over an :class:`ExampleTable` (HF Trainer samples it by index)."""

    def __init__(self, examples: ExampleTable) -> None:
        self.offsets, self.input_ids, self.labels = examples.columns()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self.offsets[index], self.offsets[index + 1]
        return {"input_ids": self.input_ids[start:end], "labels": self.labels[start:end]}


@dataclass
class PadCollator:
    """Pads a batch to its longest example (never beyond maxSeqLength: examples are already cut)."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows are lists or (read-only, shared) numpy views; the batch is built in fresh arrays."""
        import numpy as np
        import torch

        longest = max(len(item["input_ids"]) for item in batch)
        multiple = self.pad_to_multiple_of
        width = -(-longest // multiple) * multiple
        ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(batch), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            mask[row, :n] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask),
        }
