"""The frontend's own types: a request as it enters the engine core client, what each stream yields,
what /metrics and the length-aware router read of a replica, and what the frontend knows of the model.

A request carries its routing estimates (`work_tokens`, `prefix_keys`) in the open, so the router can
read them from a pending request without parsing anything. A stream carries only deltas: a cumulative
text would make each message grow with the output and the whole stream quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuserve.core_messages import CoreStats, TokenLogprobs
from fuserve.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    work_tokens: int  # n * (prompt + max_tokens): the router's estimate of this request's cost
    prefix_keys: list[int] = field(default_factory=list)  # routing_policy.prefix_keys of the prompt
    block_size: int = 16  # tokens per prefix key (the engine's KV block size)


@dataclass
class ReplicaStats:
    """One engine replica's state, as /metrics and the router see it."""

    replica_id: str
    engine: CoreStats = field(default_factory=CoreStats)  # its engine core's, from the last step
    frontend_cpu_seconds_total: float = 0.0
    frontend_gc_seconds_total: float = 0.0  # of its CPU time, in Python's garbage collector
    healthy: bool = True
    timestamp: float = 0.0  # time.time() on the replica when taken


@dataclass
class EngineDelta:
    """One sequence's progress in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    replica_id: str = ""
    received_at: float = 0.0  # perf_counter when the core's message holding it reached the frontend


@dataclass
class ModelInfo:
    model_name: str
    max_model_len: int
    block_size: int
    has_tokenizer: bool
    # the model's own defaults for sampling settings a request leaves unset (generation_config.py)
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)
    default_max_tokens: int | None = None  # generation_config.json's max_new_tokens
