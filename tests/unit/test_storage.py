"""Object-store helpers: URI parsing, S3 options, and no credentials in what Ray pickles."""

from __future__ import annotations

import pickle

import pytest

from llmray.api.common import ObjectStorage, is_object_store
from llmray_workloads import storage

pytestmark = pytest.mark.unit


def test_is_object_store() -> None:
    assert is_object_store("s3://b/k") and is_object_store("gs://b")
    assert not is_object_store("file:///x") and not is_object_store("pvc://c/p")
    assert not is_object_store(None) and not is_object_store("hf://a/b")


def test_split_uri() -> None:
    assert storage.split_uri("s3://bucket/models/tiny/") == ("s3", "bucket/models/tiny")
    assert storage.split_uri("gs://bucket") == ("gs", "bucket")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.split_uri("s3:///")
    with pytest.raises(ValueError, match="not an s3"):
        storage.split_uri("file:///x")


@pytest.mark.parametrize(
    ("settings", "options"),
    [
        (storage.StoreSettings(), {}),
        (storage.StoreSettings(region="eu-west-1"), {"region": "eu-west-1"}),
        (
            storage.StoreSettings(endpoint="http://minio.minio.svc:9000/"),
            {"endpoint_override": "minio.minio.svc:9000", "scheme": "http", "region": "us-east-1"},
        ),
        (
            storage.StoreSettings(endpoint="https://storage.googleapis.com", region="auto"),
            {"endpoint_override": "storage.googleapis.com", "scheme": "https", "region": "auto"},
        ),
    ],
)
def test_s3_options(settings: storage.StoreSettings, options: dict[str, str]) -> None:
    assert storage.s3_options(settings) == options


def test_store_settings_spec_wins_over_environment() -> None:
    env = {"AWS_ENDPOINT_URL_S3": "http://env:9000", "AWS_REGION": "env-1"}
    spec = ObjectStorage(endpoint="http://spec:9000")
    assert storage.StoreSettings.resolve(spec, env) == storage.StoreSettings("http://spec:9000", "env-1")
    assert storage.StoreSettings.resolve(None, {}) == storage.StoreSettings()


def test_pickled_filesystem_carries_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray pickles RunConfig's storage_filesystem to every worker: keys must come from the pod's env."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-access-key-value")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fs, path = storage.filesystem("s3://bucket/ckpt", storage.StoreSettings(endpoint="http://127.0.0.1:9"))
    blob = pickle.dumps(fs)
    assert path == "bucket/ckpt"
    assert b"very-secret-access-key-value" not in blob and b"AKIAEXAMPLEKEYID0000" not in blob
