"""Checks that run in the driver before any worker starts: model, tokenizer, data, LoRA, capacity.

A doomed run should fail in seconds with the field named, not after the cluster has spun up
workers, loaded weights and written half an output folder.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmray.api.runtime import TrainingRun

from .. import storage
from .config import ConfigError, Plan, resolve_plan
from .data import PreparedData, load_records, prepare_data

HUB_TIMEOUT_S = 15.0
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass
class Prepared:
    """A run that passed every check: its plan, tokenizer, model config and tokenised data."""

    run: TrainingRun
    plan: Plan
    tokenizer: Any
    model_config: Any
    data: PreparedData


def hf_token() -> str | None:
    """Hub token from the environment (the operator exports spec.model.secretRef as HF_TOKEN)."""
    return os.environ.get("HF_TOKEN") or None


def check_hub_repo(repo: str, kind: str, revision: str | None, field: str) -> None:
    """Fail fast (one request, no retries) when a hub repo is unreachable, missing or gated."""
    from huggingface_hub import HfApi

    api = HfApi(token=hf_token())
    try:
        if kind == "model":
            api.model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
        else:
            api.dataset_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as exc:
        hint = (
            "set spec.model.secretRef (HF_TOKEN) for gated or private repos"
            if kind == "model"
            else "set HF_TOKEN for gated or private sets"
        )
        raise ConfigError(
            f"{field}: cannot reach hf://{repo} on the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).strip()[:300]}). Check the name, {hint}, and that the cluster can reach "
            "huggingface.co."
        ) from exc


def check_model_dir(path: str) -> None:
    """A local model folder must exist and hold a config.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"spec.model.uri: model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"spec.model.uri: {folder} has no config.json (expected a Hugging Face model folder)"
        )


def load_model_config(plan: Plan, revision: str | None) -> Any:
    """The model's transformers config (local folder or hub)."""
    from transformers import AutoConfig

    if plan.model_is_hub:
        check_hub_repo(plan.model_ref, "model", revision, "spec.model.uri")
    else:
        check_model_dir(plan.model_ref)
    try:
        return AutoConfig.from_pretrained(plan.model_ref, revision=revision, token=hf_token())
    except Exception as exc:
        raise ConfigError(f"spec.model.uri: cannot read the model config of {plan.model_ref}: {exc}") from exc


def load_tokenizer(plan: Plan, revision: str | None) -> Any:
    """The model's tokenizer; a model without one cannot be fine-tuned on text."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(plan.model_ref, revision=revision, token=hf_token())
    except Exception as exc:
        raise ConfigError(f"spec.model.uri: cannot load a tokenizer from {plan.model_ref}: {exc}") from exc


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings allow, if the config says."""
    for attr in _POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_length(max_seq_length: int, config: Any) -> None:
    """maxSeqLength may not exceed what the model was built for."""
    limit = max_positions(config)
    if limit is not None and max_seq_length > limit:
        raise ConfigError(
            f"spec.hyperparameters.maxSeqLength: {max_seq_length} exceeds the model's "
            f"max_position_embeddings ({limit}); use at most {limit}"
        )


def module_names(config: Any) -> list[str]:
    """Dotted names of every module of the model, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_modules() if name]


def check_lora_targets(targets: list[str], names: list[str]) -> None:
    """Every LoRA target must name a module (peft matches a full name or a dotted suffix)."""
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(
            f"spec.lora.targetModules: {', '.join(missing)} not found in the model; "
            f"module names available: {', '.join(leaves)}"
        )


def check_output_path(output_dir: str) -> None:
    """The output is swapped into place by rename, so it cannot be a volume root."""
    path = Path(output_dir)
    if os.path.ismount(path):
        raise ConfigError(
            f"spec.output.uri: {path} is a mount point; name a folder inside it (e.g. pvc://claim/models/run)"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"spec.output.uri: {path} exists and is not a folder")


def check_buckets(plan: Plan, checkpoint_field: str) -> None:
    """Every object-store location's bucket must be reachable with the pod's credentials."""
    places = [
        ("spec.model.uri", plan.model_uri),
        ("spec.dataset.uri", plan.dataset_uri),
        ("spec.output.uri", plan.output_uri),
        (checkpoint_field, plan.storage_path if plan.storage_is_remote else None),
    ]
    for field, uri in places:
        if uri is None:
            continue
        problem = storage.check_bucket(uri, plan.store)
        if problem is not None:
            raise ConfigError(
                f"{field}: cannot reach {uri}: {problem}. Check the bucket name, spec.objectStorage "
                "(secretRef, endpoint, region) or the pods' workload identity."
            )


def localize_model(plan: Plan, metadata_only: bool = False) -> Plan:
    """The plan with an object-store model downloaded to this node's model cache (no-op otherwise).

    The driver (on the head pod) needs only config and tokenizer (``metadata_only``); each worker
    downloads the weights to its own node.
    """
    if plan.model_uri is None:
        return plan
    try:
        local = storage.cached_download(
            plan.model_uri, storage.model_cache_root(), plan.store, metadata_only=metadata_only
        )
    except storage.StorageError as exc:
        raise ConfigError(f"spec.model.uri: {exc}") from exc
    return dataclasses.replace(plan, model_ref=str(local))


def load_dataset_records(plan: Plan, spec: Any) -> Any:
    """The dataset's records; an object-store dataset is downloaded to a temporary folder first."""
    if plan.dataset_uri is None:
        return load_records(plan.dataset_ref, plan.dataset_is_hub, spec.dataset, hf_token())
    folder = Path(tempfile.mkdtemp(prefix="llmray-dataset-"))
    try:
        name = plan.dataset_uri.rstrip("/").rsplit("/", 1)[-1]
        try:
            local = storage.download(plan.dataset_uri, folder / name, plan.store)
        except storage.StorageError as exc:
            raise ConfigError(f"spec.dataset.uri: {exc}") from exc
        return load_records(str(local), False, spec.dataset, None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def preflight(run: TrainingRun) -> Prepared:
    """Every check that needs no Ray cluster; returns what the workers need."""
    spec = run.spec
    plan = resolve_plan(run)
    field = "spec.checkpoint.storageUri" if spec.checkpoint.storage_uri else "spec.output.uri"
    check_buckets(plan, field)
    if plan.output_uri is None:
        check_output_path(plan.output_dir)
    plan = localize_model(plan, metadata_only=True)
    config = load_model_config(plan, spec.model.revision)
    check_seq_length(spec.hyperparameters.max_seq_length, config)
    lora = spec.effective_lora()
    if lora is not None:
        check_lora_targets(lora.target_modules, module_names(config))
    tokenizer = load_tokenizer(plan, spec.model.revision)
    if plan.dataset_is_hub:
        check_hub_repo(plan.dataset_ref, "dataset", None, "spec.dataset.uri")
    records = load_dataset_records(plan, spec)
    data = prepare_data(
        records, spec.dataset, tokenizer, spec.hyperparameters.max_seq_length, spec.hyperparameters.seed
    )
    return Prepared(run=run, plan=plan, tokenizer=tokenizer, model_config=config, data=data)
