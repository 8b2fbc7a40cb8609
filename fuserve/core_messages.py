"""The contract between a replica's frontend process and its engine-core process.

    frontend --AddRequest / AbortRequest / Shutdown--> engine core     (ZMQ PUSH -> PULL)
    frontend <--CoreReady, then one StepOutputs per engine step--      (ZMQ PULL <- PUSH)
             <--CoreDead when the engine loop fails

A replica may run several frontend processes (`serve.frontend_processes`), each with its own pair of
sockets: the replica's own (index 0) gets CoreReady; the others Attach, and each gets a StepOutputs
per step with its own requests' outputs and the engine's stats.

msgspec structs (array-like, so a message is a msgpack array, not a map of field names): one
StepOutputs carries every sequence's new token ids of that step and the replica's stats, so the
cost per step does not grow with a message per stream. Nothing here imports torch: the frontend
and the router read these types without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from fuserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine stopped (its loop failed or its process died); this replica cannot serve until it is
    replaced (HTTP 503)."""


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float | None = None
    frontend: int = 0  # which of the replica's frontend processes sent it (its outputs go back there)


class AbortRequest(msgspec.Struct, tag="abort", array_like=True):
    request_id: str
    indices: list[int] | None = None  # which of its n sequences; None: all of them


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class Attach(msgspec.Struct, tag="attach", array_like=True):
    """A frontend process beside the replica's own (index >= 1) is listening for its step messages;
    until it says so the core sends it nothing, so a frontend that never started queues nothing."""

    frontend: int


class Detach(msgspec.Struct, tag="detach", array_like=True):
    """That frontend process is gone (sent by the replica's own frontend, which watches it): the core
    aborts its requests and sends it nothing more."""

    frontend: int


CoreInput = AddRequest | AbortRequest | Attach | Detach | Shutdown


class SeqOutput(msgspec.Struct, array_like=True):
    """One sequence's progress in one step. Text is the frontend's business: it detokenizes."""

    request_id: str
    index: int
    token_ids: list[int]
    finish_reason: str | None = None  # set once, on the sequence's last output
    logprobs: list[TokenLogprobs] = []
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class RequestFailure(msgspec.Struct, array_like=True):
    """A request the engine refused when it arrived; the others keep running."""

    request_id: str
    message: str


class SpecCounters(msgspec.Struct, array_like=True):
    """Speculative decoding since the engine started (speculative/stats.py). A "verify" is one
    speculating sequence in one step: it checks its drafts and keeps 1 + (drafts accepted) tokens."""

    num_rounds: int = 0  # proposer calls (one per step that wanted drafts)
    num_verify_steps: int = 0  # steps with at least one speculating sequence
    num_verifies: int = 0
    num_drafts: int = 0  # drafts the target checked
    num_accepted: int = 0  # of those, kept
    reached_at: list[int] = []  # [i]: verifies that checked a draft at position i + 1 (all before it kept)
    accepted_at: list[int] = []  # [i]: drafts at position i + 1 that were kept
    k_counts: list[int] = []  # [k]: times k drafts were asked of the proposer for a sequence
    draft_seconds: float = 0.0  # in proposer calls (for a draft model: its forwards and the channel)
    channel_seconds: float = 0.0  # of which the channel's round trip, when the proposer reports it
    verify_seconds: float = 0.0  # steps with speculating sequences, less their proposer call
    num_alternatives: int = 0  # second-best tokens the target checked beside drafts (alternatives.py)
    num_alternatives_kept: int = 0  # of those, kept (each in place of a rejected draft)
    num_ahead_hits: int = 0  # sequence-rounds a draft answered from drafts made during the verify
    num_rounds_overlapped: int = 0  # rounds read after a plain step run meanwhile (draft_overlap)
    num_drafted_across: int = 0  # sequence-steps that verified such a round's drafts (after the plain step)


class CoreStats(msgspec.Struct, array_like=True):
    num_waiting: int = 0
    num_running: int = 0
    outstanding_tokens: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    num_steps: int = 0
    step_seconds_total: float = 0.0  # wall time inside engine.step(), summed
    device_wait_seconds_total: float = 0.0  # of it, waiting for the device to finish a step
    # the device's own time for those steps (CUDA events: first kernel to read-back); 0 off CUDA
    device_busy_seconds_total: float = 0.0
    prefill_device_busy_seconds_total: float = 0.0  # of it, the steps that carried prefill tokens
    prefill_steps: int = 0  # steps that carried prefill tokens
    prefill_step_seconds_total: float = 0.0  # wall time of those steps
    cpu_seconds_total: float = 0.0  # the engine-core process's CPU time
    # For the router's TTFT model (router/ttft_model.py): this engine's step cost, fitted from its own
    # steps (workers/step_cost_meter.py), and its queue in the scheduler's terms (workers/routing_summary.py)
    step_base_s: float = 0.0
    step_seq_s: float = 0.0
    step_token_s: float = 0.0
    running_prefill_tokens: int = 0
    num_decoding: int = 0
    waiting_queue: list[tuple[float, int, int]] = []  # (priority, prefill, output) in admission order
    decode_left: list[int] = []
    inflight_prefill_tokens: int = -1  # prefill tokens of the step running while these were taken; -1: none
    taken_at: float = 0.0  # time.time() when these were taken
    step_cost_samples: int = 0  # steps behind the step cost (0: the meter's prior alone)
    spec: SpecCounters | None = None  # None: speculation is off
    num_requests_added: int = 0  # requests taken in, ever (router/unadmitted_sends.py)
    num_requests: int = 0  # requests in the engine now, from every frontend process (autoscaling)
    gc_seconds_total: float = 0.0  # the engine's process's time in Python's garbage collector (gc_tuning.py)


class StepOutputs(msgspec.Struct, tag="step", array_like=True):
    outputs: list[SeqOutput]
    failures: list[RequestFailure]
    stats: CoreStats


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    """What the frontend needs to know of the model to check and shape requests."""

    model_name: str
    max_model_len: int
    block_size: int
    has_tokenizer: bool
    sampling_defaults: dict[str, float | int]
    default_max_tokens: int | None
    pid: int
    stats: CoreStats


class CoreDead(msgspec.Struct, tag="dead", array_like=True):
    error: str


CoreOutput = StepOutputs | CoreReady | CoreDead


def input_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(CoreInput)


def output_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(CoreOutput)
