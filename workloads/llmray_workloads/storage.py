"""Object storage (``s3://``, ``gs://``) for models, datasets, checkpoints and outputs, via ``pyarrow.fs``.

Why pyarrow.fs: it is already in the runtime image (Ray Train writes checkpoints through it, and
Ray Serve LLM downloads models with it), it speaks S3 (with an endpoint override for MinIO and
other S3-compatible stores) and GCS, and it uses the cloud SDKs' default credential chains. No
new dependency goes into the 7 GB runtime image.

Credentials are never passed in code or config: the operator exports ``spec.objectStorage``'s
Secret as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``) to every Ray
pod, and without one the SDK's default chain applies (IRSA's web identity token, GKE Workload
Identity, the node's role). So a filesystem object pickled to a Ray worker carries no secret.
Endpoint and region come from the spec (also exported as ``AWS_ENDPOINT_URL_S3`` / ``AWS_REGION``,
which are the fallbacks here, so hand-written configs work with the usual variables).

Models are downloaded to a node-local cache before ``from_pretrained`` (the folder's name includes
a fingerprint of the object listing, so a changed model is downloaded again and concurrent workers
of one node share one copy); outputs are uploaded after export.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmray.api.common import ObjectStorage, is_object_store

ENDPOINT_ENV, REGION_ENV = "AWS_ENDPOINT_URL_S3", "AWS_REGION"
CACHE_SUBDIR = "llmray-objects"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
"""Files left out of a metadata-only download (the driver needs config and tokenizer, not weights)."""
COMPLETE_MARKER = ".llmray-complete"


class StorageError(RuntimeError):
    """An object store could not be read or written (message names the URI, never a credential)."""


@dataclass(frozen=True)
class StoreSettings:
    """Endpoint and region of the S3 store (no credentials: those come from the environment)."""

    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def resolve(cls, spec: ObjectStorage | None, environ: Mapping[str, str] | None = None) -> StoreSettings:
        """The spec's endpoint/region, else the AWS SDK variables the operator sets on the pods."""
        env = os.environ if environ is None else environ
        endpoint = spec.endpoint if spec else None
        region = spec.region if spec else None
        return cls(
            endpoint=endpoint or env.get(ENDPOINT_ENV) or env.get("AWS_ENDPOINT_URL"),
            region=region or env.get(REGION_ENV) or env.get("AWS_DEFAULT_REGION"),
        )


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, bucket/key)`` of an object-store URI, the path without a trailing slash."""
    if not is_object_store(uri):
        raise ValueError(f"{uri!r} is not an s3:// or gs:// URI")
    scheme, rest = uri.split("://", 1)
    path = rest.strip("/")
    if not path:
        raise ValueError(f"{uri!r} names no bucket")
    return scheme, path


def s3_options(settings: StoreSettings) -> dict[str, Any]:
    """``pyarrow.fs.S3FileSystem`` keyword arguments for an endpoint / region (pure, for tests)."""
    options: dict[str, Any] = {}
    if settings.endpoint:
        scheme, _, host = settings.endpoint.partition("://")
        options["endpoint_override"] = host.rstrip("/")
        options["scheme"] = scheme
    # An S3-compatible store has no region lookup: default to us-east-1 (what MinIO expects).
    region = settings.region or ("us-east-1" if settings.endpoint else None)
    if region:
        options["region"] = region
    return options


def filesystem(uri: str, settings: StoreSettings) -> tuple[Any, str]:
    """The pyarrow filesystem of an object-store URI, and the path inside it (``bucket/key``)."""
    from pyarrow import fs as pafs

    scheme, path = split_uri(uri)
    if scheme == "s3":
        return pafs.S3FileSystem(**s3_options(settings)), path
    return pafs.GcsFileSystem(), path


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def listing(uri: str, settings: StoreSettings) -> list[tuple[str, int, float]]:
    """``(relative path, size, mtime)`` of every object under a prefix; ``[("", size, mtime)]`` for a file."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, settings)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [("", int(info.size or 0), _mtime(info))]
        if info.type == pafs.FileType.NotFound:
            return []
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise StorageError(f"cannot list {uri}: {_describe(exc)}") from exc
    out = [
        (e.path[len(path) :].lstrip("/"), int(e.size or 0), _mtime(e))
        for e in entries
        if e.type == pafs.FileType.File
    ]
    return sorted(out)


def _mtime(info: Any) -> float:
    return float(info.mtime.timestamp()) if info.mtime is not None else 0.0


def download(
    uri: str, dest: Path, settings: StoreSettings, entries: list[tuple[str, int, float]] | None = None
) -> Path:
    """Copy an object (to ``dest``) or the objects under a prefix (into folder ``dest``).

    ``entries``: the subset of :func:`listing` to copy (default: all).
    """
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, settings)
    entries = listing(uri, settings) if entries is None else entries
    if not entries:
        raise StorageError(f"{uri} does not exist or holds no objects")
    local = pafs.LocalFileSystem()
    try:
        if entries == [("", entries[0][1], entries[0][2])] and entries[0][0] == "":
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=local)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            for rel, _, _ in entries:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(
                    f"{path}/{rel}", str(dest / rel), source_filesystem=fs, destination_filesystem=local
                )
    except OSError as exc:
        raise StorageError(f"cannot download {uri}: {_describe(exc)}") from exc
    return dest


def cached_download(uri: str, cache_root: Path, settings: StoreSettings, metadata_only: bool = False) -> Path:
    """A local copy of ``uri`` under ``cache_root``, reused while the objects are unchanged.

    The folder name is a hash of the URI and of its listing (names, sizes, mtimes). Each caller
    downloads into its own temporary sibling and renames it into place, so workers of one node
    racing on the same model end up with one complete copy. ``metadata_only`` leaves out weight
    files (config, tokenizer and adapter config only).
    """
    entries = listing(uri, settings)
    if not entries:
        raise StorageError(f"{uri} does not exist or holds no objects")
    if metadata_only:
        entries = [e for e in entries if not e[0].endswith(WEIGHT_SUFFIXES)] or entries[:0]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "object"
    digest = hashlib.sha256(json.dumps([uri, entries, metadata_only]).encode()).hexdigest()[:16]
    root = cache_root / CACHE_SUBDIR
    target = root / f"{digest}-{name}"
    if (target / COMPLETE_MARKER).is_file() or (target.is_file()):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{digest}.{uuid.uuid4().hex}"
    try:
        if entries and entries[0][0] == "":
            tmp.mkdir()
            download(uri, tmp / name, settings, entries)
            tmp_target: Path = tmp / name
        else:
            tmp.mkdir()
            if entries:
                download(uri, tmp, settings, entries)
            (tmp / COMPLETE_MARKER).write_text(uri)
            tmp_target = tmp
        try:
            os.replace(tmp_target, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where downloaded models go: the pod's model cache volume (HF_HOME), else the temp folder."""
    env = os.environ if environ is None else environ
    return Path(env.get("HF_HOME") or Path(tempfile.gettempdir()) / "llmray-cache")


def upload_dir(
    local: Path, uri: str, settings: StoreSettings, skip: frozenset[str] = frozenset()
) -> list[str]:
    """Upload every file under ``local`` to the prefix ``uri``; returns the relative paths written.

    Top-level names in ``skip`` are left out (uploaded later, e.g. the manifest that marks the
    upload complete).
    """
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, settings)
    local_fs = pafs.LocalFileSystem()
    written = []
    try:
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = file.relative_to(local).as_posix()
            if rel.split("/", 1)[0] in skip:
                continue
            pafs.copy_files(str(file), f"{path}/{rel}", source_filesystem=local_fs, destination_filesystem=fs)
            written.append(rel)
    except OSError as exc:
        raise StorageError(f"cannot upload to {uri}: {_describe(exc)}") from exc
    return written


def write_bytes(uri: str, data: bytes, settings: StoreSettings) -> None:
    """Write one object."""
    fs, path = filesystem(uri, settings)
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {_describe(exc)}") from exc


def read_bytes(uri: str, settings: StoreSettings, limit: int = 16 << 20) -> bytes | None:
    """Read one (small) object; None when it does not exist."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, settings)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            data: bytes = stream.read(limit + 1)
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {_describe(exc)}") from exc
    if len(data) > limit:
        raise StorageError(f"{uri} is larger than {limit} bytes")
    return data


def delete(uri: str, settings: StoreSettings) -> None:
    """Delete one object (missing is fine)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, settings)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as exc:
        raise StorageError(f"cannot delete {uri}: {_describe(exc)}") from exc


def check_bucket(uri: str, settings: StoreSettings) -> str | None:
    """None when the bucket of ``uri`` is reachable with the pod's credentials, else why not."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, settings)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        return _describe(exc)
    if info.type == pafs.FileType.NotFound:
        return f"bucket {bucket} does not exist"
    return None
