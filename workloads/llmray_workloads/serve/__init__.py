"""OpenAI-compatible, autoscaled LLM serving on Ray Serve.

Entry points:

- ``llmray_workloads.serve.app:build_app`` — the Serve application builder the operator deploys
  (``import_path`` + ``args`` = :class:`llmray.api.runtime.ServeAppArgs`).
- ``python -m llmray_workloads.serve --model DIR`` — serve a local model folder by hand.

Modules: :mod:`.config` (pure spec -> Serve options), :mod:`.protocol` (OpenAI request validation,
errors, response shapes, SSE framing), :mod:`.text` (incremental detokenization and stop strings),
:mod:`.sampling`, :mod:`.engine` (continuous-batching transformers engine), :mod:`.api` (the
FastAPI app), :mod:`.deployment` (the Serve deployment), :mod:`.vllm` (Ray Serve LLM path).
This package imports no ray/torch at import time so the pure parts stay cheap to test.
"""
