"""A tiny, random-initialised Llama model plus a byte-level BPE tokenizer, built locally in seconds.

Tests and demos cannot download weights (no model hub), so they build this instead. The output is a
normal Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer files and a chat
template), loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer`` by training and serving alike.

``build_tiny_model(out_dir, seed=0)`` is deterministic and cached: a stamp file records the build
parameters, and a second call with the same parameters returns at once. The folder is built in a
sibling temp dir and renamed into place, so concurrent builders never see a half-written model.

CLI: ``python -m llmray_workloads.tiny --out DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

STAMP_FILE = ".llmray-tiny.json"
BUILD_VERSION = 1  # bump when the recipe changes so cached builds are rebuilt

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# Each turn is "<|role|>\n{content}</s>\n". Assistant content (and its </s>) sits inside
# {% generation %} so `apply_chat_template(..., return_assistant_tokens_mask=True)` can mask
# everything else from the loss, and generation stops at </s> (the eos token).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

DEFAULT_PARAMS: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


FACTS_FILE = "facts.jsonl"
"""Made-up Q/A facts (chat format) the demo fine-tunes on and asks: the random tiny model can only
know them from the fine-tune."""


def data_dir() -> Path:
    """Folder of the bundled data (``corpus.txt``, ``instructions.jsonl``, ``chat.jsonl``, facts)."""
    return Path(str(resources.files("llmray_workloads") / "data"))


def facts() -> list[tuple[str, str]]:
    """The (question, answer) pairs of :data:`FACTS_FILE`; the demo asks the first."""
    pairs = []
    for line in (data_dir() / FACTS_FILE).read_text().splitlines():
        messages = json.loads(line)["messages"]
        pairs.append((messages[0]["content"], messages[1]["content"]))
    return pairs


def _corpus_lines() -> list[str]:
    """Every text the tokenizer learns from: prose plus the instruction and chat examples."""
    root = data_dir()
    lines = [line for line in (root / "corpus.txt").read_text().splitlines() if line.strip()]
    for line in (root / "instructions.jsonl").read_text().splitlines():
        record = json.loads(line)
        lines += [record["prompt"], record["response"]]
    for line in (root / "chat.jsonl").read_text().splitlines():
        lines += [message["content"] for message in json.loads(line)["messages"]]
    return lines


def _fingerprint(params: dict[str, Any], seed: int) -> str:
    """Hash of everything that determines the build (recipe version, params, seed, corpus)."""
    digest = hashlib.sha256(json.dumps({"v": BUILD_VERSION, "p": params, "s": seed}, sort_keys=True).encode())
    for line in _corpus_lines():
        digest.update(line.encode())
    return digest.hexdigest()[:16]


def build_tokenizer(vocab_size: int = DEFAULT_PARAMS["vocab_size"]) -> Any:
    """Train a byte-level BPE on the bundled corpus and wrap it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=DEFAULT_PARAMS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_model(tokenizer: Any, params: dict[str, Any], seed: int) -> Any:
    """A random-initialised LlamaForCausalLM sized by ``params``, seeded for reproducibility."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{k: v for k, v in params.items() if k != "vocab_size"},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _read_stamp(path: Path) -> str | None:
    try:
        return str(json.loads((path / STAMP_FILE).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError):
        return None


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build (or reuse) the tiny model + tokenizer in ``out_dir``; return the folder.

    Deterministic for a given seed. Cached: if ``out_dir`` holds a build with the same parameters it
    is returned untouched. Atomic: written to a temp sibling and renamed, so readers see all or nothing.
    """
    out = Path(out_dir).resolve()
    params = dict(DEFAULT_PARAMS)
    fingerprint = _fingerprint(params, seed)
    if _read_stamp(out) == fingerprint:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    staging.chmod(0o755)
    try:
        tokenizer = build_tokenizer(params["vocab_size"])
        model = _build_model(tokenizer, params, seed)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        meta = {"fingerprint": fingerprint, "seed": seed, "params": params}
        (staging / STAMP_FILE).write_text(json.dumps(meta, indent=2))
        _swap_into_place(staging, out, fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def build_tiny_adapter(base_dir: str | Path, out_dir: str | Path, seed: int = 1, rank: int = 4) -> Path:
    """A random, non-zero LoRA adapter (q_proj, v_proj) of the model in ``base_dir``, saved in
    ``out_dir`` (peft format): something to serve as ``spec.adapters`` in tests and benchmarks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # peft starts lora_B at zero (a no-op adapter): make it change answers
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out


def _swap_into_place(staging: Path, out: Path, fingerprint: str) -> None:
    """Rename ``staging`` to ``out``; a concurrent builder that won the race is fine too."""
    if out.exists():
        if _read_stamp(out) == fingerprint:
            return  # another process finished the same build first
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(staging, out)
    except OSError:
        if _read_stamp(out) != fingerprint:
            raise


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the tiny model and print its folder."""
    parser = argparse.ArgumentParser(description="Build the tiny random-init Llama model + tokenizer.")
    parser.add_argument("--out", required=True, help="Output folder (Hugging Face format).")
    parser.add_argument("--seed", type=int, default=0, help="Initialisation seed (default 0).")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
