"""Text <-> token ids and the chat template, from an HF folder or a GGUF file.

Uses the `tokenizers` library directly (no transformers at serving time). Chat templates are the
model's own Jinja templates, rendered in a sandbox the way transformers renders them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fuserve.workers.chat_segments import SegmentEncoder

# Used when a model ships no template: a plain transcript the model can continue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> Template:
    """Compiling a chat template takes ~1.8 ms; every chat request renders it (in the frontend, and in
    the HAProxy router for its hint), so each template is compiled once per process."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`, which templates that render `tools` are written for (Jinja's own sorts
    keys and escapes HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    eos_token_ids: frozenset[int]
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)
    # chat prompts tokenized piece by piece between added tokens, earlier turns' pieces reused
    # (chat_segments.py); None where that could change the ids, or by choice
    segments: SegmentEncoder | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_hf_dir(cls, path: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json; fuserve needs the fast-tokenizer file "
                "(save it with transformers' `tokenizer.save_pretrained`)"
            )
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        eos = _token_str(cfg.get("eos_token"))
        ids = set(eos_token_ids or [])
        if eos is not None and backend.token_to_id(eos) is not None:
            ids.add(backend.token_to_id(eos))
        return cls(
            backend=backend,
            eos_token_ids=frozenset(ids),
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=eos,
            add_bos_token=False,  # tokenizer.json's post-processor already adds BOS where the model wants it
            chat_template=template,
            special_ids=_special_ids(backend),
            segments=SegmentEncoder.for_backend(backend),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        from fuserve.workers.models.gguf_tokenizer import tokenizer_from_gguf

        backend, meta = tokenizer_from_gguf(path)
        eos_ids = {meta["eos_token_id"]} if meta.get("eos_token_id") is not None else set()
        return cls(
            backend=backend,
            eos_token_ids=frozenset(eos_ids),
            bos_token=meta.get("bos_token"),
            eos_token=meta.get("eos_token"),
            add_bos_token=bool(meta.get("add_bos_token")),
            chat_template=meta.get("chat_template"),
            special_ids=_special_ids(backend),
            segments=SegmentEncoder.for_backend(backend),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not add_special_tokens and self.segments is not None:  # a rendered chat prompt
            return self.segments.encode(text)
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token is not None:
            bos = self.backend.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """`tools`: the OpenAI tool definitions, for a template that renders them (as HF passes them)."""
        return _compiled(self.chat_template or DEFAULT_CHAT_TEMPLATE).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _special_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
