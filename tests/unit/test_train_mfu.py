"""MFU: FLOPs per token, accelerator peaks, and the figure in progress reports (hand-checked)."""

from __future__ import annotations

import pytest

from llmray.api.runtime import ProgressReport
from llmray.api.telemetry import TRAINING_METRICS
from llmray_workloads.train.metrics import GPU_MEMORY, report_values
from llmray_workloads.train.mfu import (
    attention_width,
    count_params,
    flops_per_token,
    mfu,
    peak_flops,
    token_weighted_length,
)
from llmray_workloads.train.progress import ProgressTracker

pytestmark = pytest.mark.unit

# Llama-2-7B's config.json (the fields MFU reads).
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
# By hand: per layer 4·4096² (attention) + 3·4096·11008 (gated MLP) + 2·4096 (norms) = 202,383,360;
# 32 layers + final norm 4096 + LM head 32000·4096 = 6,607,343,616. Adding the (untied) input
# embedding, 131,072,000, gives the well-known total of 6,738,415,616 parameters.
LLAMA2_7B_MATMUL = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32000 * 4096


def test_llama2_7b_matmul_count_matches_the_published_total() -> None:
    assert LLAMA2_7B_MATMUL == 6_607_343_616
    assert LLAMA2_7B_MATMUL + 32000 * 4096 == 6_738_415_616


def test_flops_per_token_llama2_7b_full_finetune() -> None:
    # 6·N + 12·L·d·S at S = 4096: 39,644,061,696 + 6,442,450,944
    assert flops_per_token(LLAMA2_7B, LLAMA2_7B_MATMUL, 4096) == 46_086_512_640


def test_mfu_llama2_7b_on_eight_h100_bf16() -> None:
    # 8 x H100 SXM at 3000 tokens/s each: 24000 · 46,086,512,640 / (8 · 989e12) = 0.139797...
    peak = peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak == 989e12
    value = mfu(24_000.0, 46_086_512_640, peak, 8)
    assert value == pytest.approx(0.1397973, rel=1e-6)


def test_lora_counts_4n_for_the_frozen_base_and_6n_for_adapters() -> None:
    # 4 · 1000 + 6 · 10 + 12 · 2 · 8 · 5 = 4000 + 60 + 960
    config = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2}
    assert flops_per_token(config, 1000, 5, adapter_params=10) == 5020
    assert flops_per_token(config, 1000, 5) == 6960


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),
        ("NVIDIA L4", "fp16", 121e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA A10G", "bf16", 70e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("Tesla T4", "bf16", None),  # no bf16 on Turing
        ("Some Future GPU", "bf16", None),
        (None, "bf16", None),  # CPU
    ],
)
def test_peak_flops_table(name: str | None, precision: str, expected: float | None) -> None:
    assert peak_flops(name, precision) == expected


def test_mfu_is_none_on_cpu_or_without_throughput() -> None:
    assert mfu(1000.0, 1e9, None, 0) is None
    assert mfu(None, 1e9, 989e12, 1) is None
    assert mfu(1000.0, 1e9, peak_flops(None, "fp32"), 2) is None


def test_attention_width_uses_head_dim_when_given() -> None:
    assert attention_width(LLAMA2_7B) == (32, 4096)
    assert attention_width({"n_layer": 2, "n_embd": 64, "n_head": 4}) == (2, 64)  # GPT-2 names
    explicit = {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}
    assert attention_width(explicit) == (3, 128)


def test_token_weighted_length() -> None:
    # examples of 2 and 6 tokens: a random token sits in a 6-token sequence 6 times out of 8
    assert token_weighted_length(2 + 6, 4 + 36) == 5.0
    assert token_weighted_length(0, 0) == 0.0


def _tiny_llama(tied: bool) -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


# per layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 = 12,288; MLP 3·64·128 = 24,576; norms 128
TINY_MATMUL = 2 * (12_288 + 24_576 + 128) + 64 + 100 * 64


@pytest.mark.parametrize("tied", [False, True])
def test_count_params_leaves_out_only_an_untied_input_embedding(tied: bool) -> None:
    assert count_params(_tiny_llama(tied)) == (TINY_MATMUL, 0)


def test_count_params_separates_lora_adapters() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(False), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # type: ignore[arg-type]
    # q: A 4·64 + B 64·4; v: A 4·64 + B 32·4 -> 896 per layer
    assert count_params(model) == (TINY_MATMUL, 2 * 896)


def test_tracker_reports_mfu_and_none_on_cpu() -> None:
    tracker = ProgressTracker(output_dir=None, flops_per_token=1e9, peak_flops=1e12, devices=2)
    tracker.tokens_per_second = 500.0
    assert tracker.report(1, 0.1).mfu == pytest.approx(0.25)
    cpu = ProgressTracker(output_dir=None, flops_per_token=1e9, peak_flops=None, devices=0)
    cpu.tokens_per_second = 500.0
    report = cpu.report(1, 0.1)
    assert report.mfu is None
    assert "mfu" not in report.model_dump(by_alias=True, exclude_none=True)


def test_progress_report_round_trips_mfu() -> None:
    report = ProgressReport.model_validate({"step": 3, "mfu": 0.42})
    assert ProgressReport.model_validate_json(report.model_dump_json(by_alias=True)).mfu == 0.42


def test_training_gauges_cover_the_contract_and_skip_unknowns() -> None:
    values = report_values(ProgressReport(step=4, loss=1.5, tokens_per_second=10.0))
    assert values == {
        "ray_llmray_train_step": 4.0,
        "ray_llmray_train_loss": 1.5,
        "ray_llmray_train_tokens_per_second": 10.0,
    }
    assert GPU_MEMORY in TRAINING_METRICS
