"""Small real checkpoints made on the fly: HF `save_pretrained` safetensors plus a byte-level tokenizer.

Nothing is downloaded; each test gets weights it made itself with transformers' own classes, so the
HF implementation of the same architecture is the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# The smallest Llama the model code accepts, for tests that build LlamaForCausalLM directly (no files)
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS: dict[str, dict[str, Any]] = {
    "llama3": dict(model_type="llama", rope_theta=500000.0),
    "llama31": dict(
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral": dict(model_type="mistral", rope_theta=10000.0, sliding_window=None),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
}


def write_byte_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (256 byte tokens + merges-free) with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHAT_TEMPLATE})
    )


def make_checkpoint(folder: Path, arch: str = "llama3", seed: int = 0, **overrides: Any) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    kwargs: dict[str, Any] = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.08,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=258,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder, kwargs["vocab_size"])
    return folder


def make_random_llama(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """A Llama checkpoint of random bf16 weights written straight to safetensors: for shapes (8B-sized
    layers, a 128k vocab) where building the HF model in fp32 first takes minutes and twice the disk.
    The oracle is then another fuserve configuration (TP=1), not HF."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(tie_word_embeddings=False, bos_token_id=None, eos_token_id=258)
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * config.initializer_range).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": rand(vocab, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = rand(vocab, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_byte_tokenizer(folder, vocab)
    return folder
