"""The tiny model the training tests share, built once per machine (cached by its build stamp)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmray_workloads.tiny import build_tiny_model


def shared_tiny_model() -> Path:
    """The tiny model in the temp folder's ``llmray-tests/tiny`` (built on first use, then reused)."""
    return build_tiny_model(Path(tempfile.gettempdir()) / "llmray-tests" / "tiny")
