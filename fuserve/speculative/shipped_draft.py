"""The draft models fuserve ships, turned into model folders its loader serves like any other.

A shipped draft file (fuserve/speculative/drafts/<name>.safetensors) holds only the draft's own
weights: its few decoder layers and final norm. It shares the target's tied embedding / LM head, so
the file stays a few MB while the target's 49k x 576 embedding stays in the target's own file. To
serve it, `materialize_draft` writes (once, in a folder named by the content hash of both files) an
HF-style Llama folder: config.json (the target's architecture with the draft's depth and MLP width),
model.safetensors (target embedding + draft layers + norm, tied) and the target's tokenizer. A file
that also holds `VOCAB_TENSOR` (the token ids its reduced-vocabulary head may propose, subset_head.py)
gets them as the folder's draft_vocab.json, which the draft runner reads.

A config names a shipped draft by `path: "shipped:<name>"` (see `resolve_shipped`), which fuserve's
loader resolves to the materialized folder; the draft file's metadata says which target package it
was trained for, so nothing else needs to be configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuserve.speculative.subset_head import write_vocab_file

DRAFTS_DIR = Path(__file__).parent / "drafts"
SHIPPED_PREFIX = "shipped:"
DRAFT_FORMAT = "fuserve-draft/1"
EMBED_NAME = "model.embed_tokens.weight"
VOCAB_TENSOR = "draft.vocab_token_ids"  # [V'] ascending target ids (uint16 when they fit: 2 bytes each)


def is_shipped(path: str | None) -> bool:
    return bool(path) and str(path).startswith(SHIPPED_PREFIX)


def shipped_names() -> list[str]:
    return sorted(p.stem for p in DRAFTS_DIR.glob("*.safetensors"))


def shipped_draft_file(name: str) -> Path:
    """The shipped file of a draft by name (`shipped:<name>` without the prefix)."""
    file = DRAFTS_DIR / f"{name}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(
            f"no shipped draft named {name!r}; shipped drafts: {', '.join(shipped_names()) or 'none'}"
        )
    return file


def read_draft_metadata(draft_file: Path) -> dict[str, str]:
    with safe_open(str(draft_file), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != DRAFT_FORMAT:
        raise ValueError(f"{draft_file} is not a fuserve draft file (metadata format {meta.get('format')!r})")
    return meta


def default_cache_dir() -> Path:
    """$FUSERVE_CACHE_DIR/drafts, else ~/.cache/fuserve/drafts."""
    root = os.environ.get("FUSERVE_CACHE_DIR") or Path.home() / ".cache" / "fuserve"
    return Path(root) / "drafts"


def resolve_shipped(path: str, cache_dir: Path | None = None) -> Path:
    """`shipped:<name>` -> the materialized model folder of that draft, built against the target
    package its metadata names."""
    from fuserve.workers.models.loader import find_package_gguf

    draft_file = shipped_draft_file(path[len(SHIPPED_PREFIX) :])
    target = find_package_gguf(read_draft_metadata(draft_file)["target_package"])
    return materialize_draft(target, draft_file, cache_dir or default_cache_dir())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def target_config_and_embedding(target_source: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """The target's HF config and its (dequantized) embedding, from a .gguf file or an HF folder."""
    if target_source.is_file() and target_source.suffix == ".gguf":
        from fuserve.workers.models.gguf_loader import iter_gguf_tensors, read_gguf

        config = dict(read_gguf(target_source).config)
        tensors = iter_gguf_tensors(target_source, torch.float32)
        embed = next(t for name, t in tensors if name == EMBED_NAME)
        return config, embed.clone()
    config = json.loads((target_source / "config.json").read_text())
    for file in sorted(target_source.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if EMBED_NAME in f.keys():
                return config, f.get_tensor(EMBED_NAME)
    raise FileNotFoundError(f"{target_source} holds no {EMBED_NAME}")


def draft_hf_config(target_config: dict[str, Any], meta: dict[str, str]) -> dict[str, Any]:
    """The target's architecture with the draft's depth and MLP width, tied to the target's head."""
    config = {k: v for k, v in target_config.items() if not k.startswith("_")}
    config.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=int(meta["num_hidden_layers"]),
        intermediate_size=int(meta["intermediate_size"]),
        tie_word_embeddings=True,
    )
    return config


def _write_tokenizer(target_source: Path, folder: Path) -> None:
    """The target's tokenizer as tokenizer.json + tokenizer_config.json (the draft speaks its ids)."""
    if not (target_source.is_file() and target_source.suffix == ".gguf"):
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (target_source / name).is_file():
                shutil.copy(target_source / name, folder / name)
        return
    from fuserve.workers.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(target_source)
    tok.backend.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def materialize_draft(target_source: Path, draft_file: Path, cache_dir: Path) -> Path:
    """An HF Llama folder of the full draft (target embedding + the file's layers and norm, tied),
    written once under `cache_dir` in a folder named by the hash of both files; returns its path."""
    target_source, draft_file = Path(target_source), Path(draft_file)
    meta = read_draft_metadata(draft_file)
    target_hash = (
        file_sha256(target_source) if target_source.is_file() else file_sha256(target_source / "config.json")
    )
    trained_for = meta.get("target_sha256")
    if trained_for and target_source.is_file() and trained_for != target_hash:
        raise ValueError(
            f"{draft_file.name} was trained for a target with sha256 {trained_for[:12]}, but "
            f"{target_source} has {target_hash[:12]}: serve it with its own target "
            f"({meta.get('target_package')})"
        )
    key = hashlib.sha256(f"{file_sha256(draft_file)}:{target_hash}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{draft_file.stem}-{key}"
    if (folder / "model.safetensors").is_file():
        return folder
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    target_config, embed = target_config_and_embedding(target_source)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_dir))
    try:
        tensors = {EMBED_NAME: embed.contiguous()}
        with safe_open(str(draft_file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name).contiguous()
        vocab = tensors.pop(VOCAB_TENSOR, None)
        if vocab is not None:
            write_vocab_file(tmp, vocab.to(torch.int64), meta.get("vocab_subset", ""))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = draft_hf_config(target_config, meta)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_tokenizer(target_source, tmp)
        try:
            tmp.rename(folder)  # atomic: a concurrent materialization of the same files wins or loses whole
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
