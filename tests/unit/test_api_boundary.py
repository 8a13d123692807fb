"""The control plane never imports the data plane's heavy libraries (small image, fast start)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_operator_imports_no_ray_torch_or_transformers() -> None:
    code = (
        "import sys, llmray.cli, llmray.operator_main, llmray.api.runtime; "
        "print(','.join(m for m in ('ray', 'torch', 'transformers', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"the operator imported {out.strip()}"


def test_api_imports_only_pydantic() -> None:
    code = (
        "import sys, llmray.api, llmray.api.runtime; "
        "print('kopf' in sys.modules, 'kubernetes' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], (
        "llmray.api must stay importable by the workloads (pydantic only)"
    )
