"""Model FLOPs utilisation (MFU): achieved model FLOPs per second over the accelerators' peak.

Pure functions (no torch import): the worker passes in the parameter counts, the model config and
the device name it detected.

Model FLOPs per trained token (PaLM, appendix B; nanoGPT's ``estimate_mfu``)::

    full fine-tuning:  6·N            + 12·L·d·S
    LoRA:              4·N_base + 6·N_adapter + 12·L·d·S

- ``N``: parameters that take part in matrix multiplies, counted from the loaded model (exact for
  any architecture: GQA, gated MLPs, biases, tied heads) minus the input embedding when it is not
  tied to the LM head (a lookup costs no FLOPs; a tied matrix still runs as the LM head).
- ``6·N``: forward 2·N, backward 4·N (gradients of activations and of weights). LoRA freezes the
  base, so its backward skips the base's weight gradients: 2·N forward + 2·N for activation
  gradients, which still flow through every base layer; the adapters train fully (6·N_adapter).
- ``12·L·d·S``: attention scores and weighted values (no parameters): per layer, forward
  ``2·2·S·d`` per token, backward twice that. ``L`` layers, ``d`` = heads x head dim (the
  hidden size for standard models), ``S`` the sequence length, averaged over tokens
  (``sum(len²) / sum(len)`` of the training examples). Like PaLM, causal masking is not discounted.
- Model FLOPs, not hardware FLOPs: recomputation by gradient checkpointing does not count.

MFU = tokens/s (all workers) x FLOPs per token / (peak FLOP/s per accelerator x accelerators).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Dense (no 2:4 sparsity) peak FLOP/s per accelerator by training precision, from the vendors'
#: datasheets. fp32 is the plain (non-TF32) figure: transformers does not enable TF32 by default.
#: Keys are matched as substrings of ``torch.cuda.get_device_name()``, lower-cased, first match wins
#: (so the more specific names come first).
PEAK_FLOPS: tuple[tuple[str, Mapping[str, float]], ...] = (
    ("h200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("h100 nvl", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("gh200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("a100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("l40s", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("l4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("a10g", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),  # AWS A10G datasheet
    ("a10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("v100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("t4", {"fp16": 65e12, "fp32": 8.1e12}),
)


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of one accelerator at ``precision`` (bf16, fp16, fp32); None when unknown (CPU)."""
    if not device_name:
        return None
    name = device_name.lower()
    for key, figures in PEAK_FLOPS:
        if key in name:
            return figures.get(precision)
    return None


def _get(config: Any, *names: str) -> int | None:
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def attention_width(config: Any) -> tuple[int, int]:
    """``(layers, heads x head_dim)`` of a HF config (dict or ``PretrainedConfig``)."""
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers") or 0
    hidden = _get(config, "hidden_size", "n_embd", "d_model") or 0
    heads = _get(config, "num_attention_heads", "n_head")
    head_dim = _get(config, "head_dim")
    width = heads * head_dim if heads and head_dim else hidden
    return layers, width


def flops_per_token(
    config: Any,
    matmul_params: int,
    seq_len: float,
    adapter_params: int = 0,
) -> float:
    """Training model FLOPs per token (see the module doc).

    ``matmul_params``: the base model's parameters minus an untied input embedding;
    ``adapter_params``: trainable LoRA parameters (0 for full fine-tuning, which uses 6·N).
    """
    layers, width = attention_width(config)
    attention = 12.0 * layers * width * seq_len
    if adapter_params:
        return 4.0 * matmul_params + 6.0 * adapter_params + attention
    return 6.0 * matmul_params + attention


def token_weighted_length(lengths_sum: int, lengths_square_sum: int) -> float:
    """The sequence length a random trained token sits in: ``sum(len²) / sum(len)``."""
    return lengths_square_sum / lengths_sum if lengths_sum > 0 else 0.0


def mfu(
    tokens_per_second: float | None,
    flops_per_token: float,
    peak_per_device: float | None,
    devices: int,
) -> float | None:
    """Model FLOPs utilisation in [0, 1+) or None when the peak is unknown (CPU, unknown GPU)."""
    if tokens_per_second is None or peak_per_device is None or devices <= 0 or flops_per_token <= 0:
        return None
    return tokens_per_second * flops_per_token / (peak_per_device * devices)


def count_params(model: Any) -> tuple[int, int]:
    """``(matmul_params, adapter_params)`` of a loaded (possibly peft-wrapped) model.

    Parameters whose name contains ``lora_`` are the adapters; the input embedding is left out
    unless it shares its storage with the output head (tied weights).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    untied: set[int] = set()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        tied = head is not None and getattr(head, "weight", None) is embeddings.weight
        if not tied:
            untied.add(id(embeddings.weight))
    matmul = adapter = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or id(param) in untied:
            continue
        seen.add(id(param))
        if "lora_" in name:
            adapter += param.numel()
        else:
            matmul += param.numel()
    return matmul, adapter
