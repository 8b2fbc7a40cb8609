"""Build a `tokenizers.Tokenizer` from a GGUF file's metadata, which stands in for `tokenizer.json`.

A GGUF carries the vocabulary (`tokenizer.ggml.tokens`), the merges, token types and special ids,
but not the normalizer / pre-tokenizer / decoder pipeline: llama.cpp names that pipeline with one
string, `tokenizer.ggml.pre`. This module maps those names back to the pipeline the original HF
`tokenizer.json` declares, so token ids match the HF tokenizer of the same model.

The tokenizer is assembled as a `tokenizer.json` document rather than through the Python builder API,
because that is the one way to give each added (special) token the exact id the file gives it.

Supported `tokenizer.ggml.model` values:
- `gpt2`: byte-level BPE (SmolLM, Llama 3, Qwen2, GPT-2 style vocabularies), with the `pre` values in
  `_BYTE_LEVEL_PRE_TOKENIZERS`.
- `llama`: SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama); merges are rebuilt from
  the piece scores when the file has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from fuserve.workers.models.gguf_format import read_gguf_metadata

# llama.cpp token types (llama.h `llama_token_type`)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# The split regexes of the HF tokenizer.json files these vocabularies come from.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(pattern: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            _byte_level(use_regex=False),
        ],
    }


# `tokenizer.ggml.pre` -> (normalizer, pre-tokenizer, BPE ignore_merges), as in the model's tokenizer.json
_DIGITS_THEN_GPT2 = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)],
}
_BYTE_LEVEL_PRE_TOKENIZERS: dict[str, tuple[dict[str, Any] | None, dict[str, Any], bool]] = {
    # SmolLM / SmolLM2 and StarCoder: each digit on its own, then GPT-2's regex
    "smollm": (None, _DIGITS_THEN_GPT2, False),
    "starcoder": (None, _DIGITS_THEN_GPT2, False),
    "gpt-2": (None, _byte_level(use_regex=True), False),
    # Llama 3 (tiktoken-derived): whole-word vocabulary hits skip the merges, as in its tokenizer.json
    "llama-bpe": (None, _split_then_bytes(_LLAMA3_SPLIT), True),
    "llama3": (None, _split_then_bytes(_LLAMA3_SPLIT), True),
    "llama-v3": (None, _split_then_bytes(_LLAMA3_SPLIT), True),
    "smaug-bpe": (None, _split_then_bytes(_LLAMA3_SPLIT), True),
    # Qwen2 / Qwen2.5 and the DeepSeek-R1 Qwen distills: NFC first, single digits
    "qwen2": ({"type": "NFC"}, _split_then_bytes(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": ({"type": "NFC"}, _split_then_bytes(_QWEN2_SPLIT), False),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _special_ids(metadata: dict[str, Any]) -> set[int]:
    """bos/eos/unk/pad ids: always special, whatever type the file gives them."""
    keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    return {metadata[f"tokenizer.ggml.{key}"] for key in keys if f"tokenizer.ggml.{key}" in metadata}


def _added_tokens(
    tokens: list[str], types: list[int], forced_special: set[int], usable: set[int] | None
) -> list[dict[str, Any]]:
    """Control tokens (and bos/eos/unk/pad) become special added tokens, user-defined ones plain added
    tokens, as in the HF tokenizer.json: both are matched whole in the text, only special ones are
    dropped by `decode(skip_special_tokens=True)`. `usable`, when given, limits which ids qualify.
    """
    added = []
    for token_id, token in enumerate(tokens):
        kind = types[token_id] if token_id < len(types) else TOKEN_NORMAL
        if usable is not None and token_id not in usable:
            continue
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) or token_id in forced_special:
            added.append(_added_token(token_id, token, special=True))
        elif kind == TOKEN_USER_DEFINED:
            added.append(_added_token(token_id, token, special=False))
    return added


def _post_processor(
    base: dict[str, Any] | None, bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None
) -> dict[str, Any] | None:
    """Adds bos / eos around each sequence when the file asks for it (`add_bos_token` et al.)."""
    single: list[dict[str, Any]] = []
    pair: list[dict[str, Any]] = []
    special: dict[str, Any] = {}
    for side, type_id in (("A", 0), ("B", 1)):
        pieces: list[dict[str, Any]] = []
        if bos is not None:
            pieces.append({"SpecialToken": {"id": bos, "type_id": type_id}})
        pieces.append({"Sequence": {"id": side, "type_id": type_id}})
        if eos is not None:
            pieces.append({"SpecialToken": {"id": eos, "type_id": type_id}})
        pair += pieces
        if side == "A":
            single = list(pieces)
    for token, token_id in ((bos, bos_id), (eos, eos_id)):
        if token is not None:
            special[token] = {"id": token, "ids": [token_id], "tokens": [token]}
    if not special:
        return base
    template = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}
    return template if base is None else {"type": "Sequence", "processors": [base, template]}


def _byte_level_bpe(metadata: dict[str, Any], path: Path) -> tuple[dict[str, Any], set[int]]:
    """tokenizer.json for `tokenizer.ggml.model == "gpt2"`; also returns the ids added as tokens."""
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise NotImplementedError(
            f"{path}: byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {sorted(_BYTE_LEVEL_PRE_TOKENIZERS)}"
        )
    normalizer, pre_tokenizer, ignore_merges = _BYTE_LEVEL_PRE_TOKENIZERS[pre]
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type", [])
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: byte-level BPE vocabulary without tokenizer.ggml.merges")

    # Vocabulary tokens are spelled in the byte alphabet. llama.cpp stores added tokens as raw text;
    # those that use other characters get a byte-alphabet spelling for the BPE model, which needs a
    # unique string per id. As in transformers' GGUF conversion, only byte-alphabet-spelled tokens are
    # taken as special/added: a control token with other characters is a mislabelled ordinary token.
    table = bytes_to_unicode()
    alphabet = set(table.values())
    vocab: dict[str, int] = {}
    spelled: set[int] = set()
    for token_id, token in enumerate(tokens):
        if set(token) <= alphabet:
            spelled.add(token_id)
        else:
            token = "".join(table[byte] for byte in token.encode("utf-8"))
        vocab.setdefault(token, token_id)

    added = _added_tokens(tokens, types, _special_ids(metadata) & spelled, usable=spelled)
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }
    return document, {entry["id"] for entry in added}


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """BPE merges implied by a SentencePiece vocabulary: SentencePiece BPE merges the adjacent pair
    whose joined piece has the highest score, so every split of a normal piece into two normal pieces
    is a merge, ranked by the joined piece's score (ties: by the ids of the two halves).
    """
    ids = {token: token_id for token_id, token in enumerate(tokens) if types[token_id] == TOKEN_NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, token_id in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[token_id], ids[left], ids[right], left, right))
    ranked.sort()
    return [[left, right] for _, _, _, left, right in ranked]


def _sentencepiece_bpe(metadata: dict[str, Any], path: Path) -> tuple[dict[str, Any], set[int]]:
    """tokenizer.json for `tokenizer.ggml.model == "llama"` (SentencePiece BPE with byte fallback),
    shaped like transformers' `LlamaTokenizer`: "▁" for spaces, a "▁" before the text when
    `add_space_prefix` (the default), unknown characters as `<0xNN>` byte pieces.
    """
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    count = len(tokens)
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * count
    scores: list[float] = metadata.get("tokenizer.ggml.scores") or [0.0] * count
    merges = metadata.get("tokenizer.ggml.merges")
    if isinstance(merges, list):
        merge_pairs = [merge.split(" ", 1) for merge in merges]
    else:
        merge_pairs = _merges_from_scores(tokens, scores, types)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, kind in enumerate(types) if kind == TOKEN_UNKNOWN), None)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))

    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    added = _added_tokens(tokens, types, _special_ids(metadata), usable=None)
    # Llama 2's tokenizer.json form: the prefix "▁" goes before each stretch of text (also one after a
    # special token, as llama.cpp does) and every space becomes "▁", leading spaces included, which is
    # what SentencePiece itself does. (`Metaspace(prepend_scheme="first")` skips the prefix when the
    # text starts with a space, which SentencePiece does not.)
    normalizers: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    if prefix:
        normalizers.insert(0, {"type": "Prepend", "prepend": "▁"})
    decoder_steps: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoder_steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoder_steps},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk_id] if unk_id is not None else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merge_pairs,
        },
    }
    return document, {entry["id"] for entry in added}


def tokenizer_from_gguf(path: str | Path) -> tuple[Tokenizer, dict[str, Any]]:
    """The model's tokenizer, plus what a server needs beside it.

    The returned dict holds `bos_token_id`, `eos_token_id`, `bos_token`, `eos_token`, `add_bos_token`,
    `add_eos_token` and `chat_template`. The tokenizer's post-processor already adds bos/eos when the
    file says so, so `encode(text)` gives what the model was trained to see; pass
    `add_special_tokens=False` when a chat template has written them into the text already.
    """
    path = Path(path)
    metadata, _ = read_gguf_metadata(path, string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    model = metadata.get("tokenizer.ggml.model")
    if not isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        raise ValueError(
            f"{path}: no tokenizer.ggml.tokens in the metadata, so there is no tokenizer to build"
        )
    if model == "gpt2":
        document, added_ids = _byte_level_bpe(metadata, path)
        default_add_bos = False
    elif model == "llama":
        document, added_ids = _sentencepiece_bpe(metadata, path)
        default_add_bos = True  # llama.cpp and HF add <s> to SentencePiece vocabularies unless told not to
    else:
        raise NotImplementedError(
            f"{path}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
            "supported: 'gpt2', 'llama'"
        )

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None
    eos = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos_id in added_ids
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos_id in added_ids
    document["post_processor"] = _post_processor(
        document["post_processor"],
        bos if add_bos else None,
        bos_id,
        eos if add_eos else None,
        eos_id,
    )
    tokenizer = Tokenizer.from_str(json.dumps(document))
    info = {
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "chat_template": metadata.get("tokenizer.chat_template"),
    }
    return tokenizer, info
