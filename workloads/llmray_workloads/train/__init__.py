"""Distributed LLM fine-tuning on Ray Train (``python -m llmray_workloads.train --config FILE``).

Modules: :mod:`.config` (TrainingRun -> plan, pure), :mod:`.data` (records -> masked examples),
:mod:`.preflight` (checks before any worker starts), :mod:`.worker` (HF Trainer in a Ray Train
worker), :mod:`.progress` (LLMRAY_PROGRESS lines), :mod:`.export` (atomic final model),
:mod:`.driver` (the entry point).
"""
