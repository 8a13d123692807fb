"""Writing the final model atomically: build it in a hidden sibling folder, then swap it in.

A retry (or a crash mid-export) never leaves a half-written model at the output path: readers see
either the previous folder or the complete new one. The swap runs in the driver after
``TorchTrainer.fit()`` returned, when Ray has stopped writing, because the default checkpoint
folder (``<output>/checkpoints``) lives inside the output: entries of the old folder that are not
part of the previous export (checkpoints, ``.llmray`` progress, anything the user put there) are
moved into the new folder before the swap. ``.llmray/manifest.json`` lists what an export wrote
and its version (new per export), which the operator rolls out to deployments and replicas report.
Leftover staging folders of crashed attempts are removed at the next start.

An object-store output (``s3://``, ``gs://``) has no rename: rank 0 stages the model locally as
above, uploads its files over the output prefix, deletes what the previous export wrote and this
one did not, and writes ``.llmray/manifest.json`` last; the final progress report goes to
``.llmray/final-<token>.json`` for the driver to read. Checkpoints under the prefix are never
touched. Readers use the output once the job Succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import storage
from .progress import PROGRESS_DIR

STAGING_TAG = ".staging-"
OLD_TAG = ".old-"
MANIFEST = "manifest.json"
FINAL_REPORT = "final.json"


def staging_dir(output_dir: str | Path, token: str) -> Path:
    """Hidden sibling of the output where this attempt builds the final model."""
    out = Path(output_dir)
    return out.parent / f".{out.name}{STAGING_TAG}{token}"


def clean_stale(output_dir: str | Path) -> None:
    """Remove staging / swap leftovers of earlier attempts."""
    out = Path(output_dir)
    if not out.parent.is_dir():
        return
    for tag in (STAGING_TAG, OLD_TAG):
        for leftover in out.parent.glob(f".{out.name}{tag}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def new_model_version(token: str, now: float | None = None) -> str:
    """A version id for one export: UTC time of the export plus the attempt's token (sortable, unique)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{token[:8]}"


def read_model_version(folder: str | Path) -> str | None:
    """The version an export recorded in ``folder``'s manifest, if any."""
    try:
        version = json.loads((Path(folder) / PROGRESS_DIR / MANIFEST).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) and version else None


def read_manifest(folder: Path) -> set[str]:
    """Top-level names a previous export wrote into ``folder``."""
    try:
        return set(json.loads((folder / PROGRESS_DIR / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def carry_over(old: Path, staging: Path) -> list[str]:
    """Move entries of the old output that the new export does not replace into ``staging``."""
    exported = read_manifest(old)
    moved = []
    for entry in sorted(old.iterdir()):
        target = staging / entry.name
        if entry.name == PROGRESS_DIR:
            target.mkdir(exist_ok=True)
            for item in entry.iterdir():
                if not (target / item.name).exists() and item.name != MANIFEST:
                    os.replace(item, target / item.name)
            continue
        if entry.name in exported or target.exists():
            continue
        os.replace(entry, target)
        moved.append(entry.name)
    return moved


def publish(staging: Path, output_dir: str | Path, version: str | None = None) -> Path:
    """Swap ``staging`` in as the output folder (same filesystem: every step is a rename).

    ``version`` (see :func:`new_model_version`) is recorded in the manifest.
    """
    out = Path(output_dir)
    meta = staging / PROGRESS_DIR
    meta.mkdir(exist_ok=True)
    files = sorted(p.name for p in staging.iterdir() if p.name != PROGRESS_DIR)
    manifest: dict[str, Any] = {"files": files}
    if version:
        manifest["version"] = version
    (meta / MANIFEST).write_text(json.dumps(manifest, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        carry_over(out, staging)
        old = out.parent / f".{out.name}{OLD_TAG}{staging.name.rsplit('-', 1)[-1]}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
    return out


def merge_adapter(base_ref: str, adapter_dir: Path, target: Path, tokenizer: Any, **load_kwargs: Any) -> Path:
    """Fold a LoRA adapter into its base model and save a plain HF model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype="auto", **load_kwargs)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def final_report_uri(output_uri: str, token: str) -> str:
    """Where rank 0 leaves the final report of an object-store export for the driver."""
    return f"{output_uri.rstrip('/')}/{PROGRESS_DIR}/final-{token}.json"


def publish_remote(staging: Path, output_uri: str, token: str, settings: storage.StoreSettings) -> list[str]:
    """Upload a staged model over ``output_uri`` (see the module doc); returns the top-level names."""
    out = output_uri.rstrip("/")
    previous: set[str] = set()
    old = storage.read_bytes(f"{out}/{PROGRESS_DIR}/{MANIFEST}", settings)
    if old is not None:
        try:
            previous = set(json.loads(old)["files"])
        except (ValueError, KeyError, TypeError):
            previous = set()
    files = sorted(p.name for p in staging.iterdir() if p.name != PROGRESS_DIR)
    storage.upload_dir(staging, out, settings, skip=frozenset({PROGRESS_DIR}))
    for rel, _, _ in storage.listing(out, settings):
        top = rel.split("/", 1)[0]
        if top in previous and top not in files:
            storage.delete(f"{out}/{rel}", settings)
    manifest = json.dumps({"files": files}, indent=2).encode()
    storage.write_bytes(f"{out}/{PROGRESS_DIR}/{MANIFEST}", manifest, settings)
    final = staging / PROGRESS_DIR / FINAL_REPORT
    if final.is_file():
        storage.write_bytes(final_report_uri(out, token), final.read_bytes(), settings)
    return files
