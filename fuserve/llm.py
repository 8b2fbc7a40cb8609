"""Offline use: `LLM(config).generate(prompts, params)` runs a batch to completion in-process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuserve.configs import FuserveConfig, load_config
from fuserve.core_messages import TokenLogprobs
from fuserve.sampling_params import RequestError, SamplingParams
from fuserve.workers.engine import LLMEngine


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class Completion:
    request_id: str
    prompt: str | list[int]
    outputs: list[CompletionOutput]
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, config: FuserveConfig | str | Path | None = None) -> None:
        if not isinstance(config, FuserveConfig):
            config = load_config(config)
        self.config = config
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def shutdown(self) -> None:
        """Frees the GPU memory (weights, KV pool, CUDA graphs) now, so that the next `LLM` in this
        process gets all of it; `with LLM(...) as llm:` calls it on the way out."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def default_sampling_params(self) -> SamplingParams:
        """What `generate` uses without params: the model's generation_config.json defaults (with
        model.generation_config auto; its max_new_tokens as max_tokens), else SamplingParams' own."""
        generation = self.engine.generation
        length = {} if generation.max_new_tokens is None else {"max_tokens": generation.max_new_tokens}
        return SamplingParams(**generation.sampling_defaults, **length)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[Completion]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if isinstance(params, list):
            plist = params
        else:
            plist = [params or self.default_sampling_params()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        results: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, plist, strict=True):
            rid = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(rid, prompt, p)  # type: ignore[arg-type]
            outs = [CompletionOutput(i, "", [], None) for i in range(p.n)]
            results[rid] = Completion(rid, prompt, outs)  # type: ignore[arg-type]
            order.append(rid)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                comp = results[out.request_id]
                c = comp.outputs[out.index]
                c.text, c.token_ids = out.text, out.token_ids
                c.logprobs.extend(out.delta_logprobs)
                c.finish_reason = out.finish_reason
                comp.num_prompt_tokens = out.num_prompt_tokens
                comp.num_cached_tokens = max(comp.num_cached_tokens, out.num_cached_tokens)
        for rid, why in self.engine.take_failures():  # a grammar that did not compile
            raise RequestError(f"request {rid} failed: {why}")
        return [results[r] for r in order]

    def chat(
        self,
        conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
    ) -> list[Completion]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot chat")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)  # type: ignore[arg-type]
            for c in conversations
        ]
        return self.generate(prompts, params)
