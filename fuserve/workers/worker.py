"""One rank's share of the model on its device: weights, KV cache, CUDA graphs and the model runner.

Every tensor-parallel rank builds the same Worker (rank 0 in the engine's process, ranks 1..N-1 in
their Ray actors, fuserve/parallel/tp_worker.py), so the collectives inside the build (the profiling
forward, the KV-cache sizing, the graph capture) pair up. The scheduler, the block manager and the
tokenizer belong to the engine (rank 0), not here. The build starts by setting the process's kernel
switches from the config (kernels/switches.py), so every rank launches the same kernels.
"""

from __future__ import annotations

import logging

import torch

from fuserve.configs import FuserveConfig
from fuserve.parallel.tp_context import TPContext
from fuserve.speculative.feature_draft_file import is_feature_draft
from fuserve.workers.cuda_graphs import DecodeGraphs, MixedGraphs
from fuserve.workers.kernels import switches as kernel_switches
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.kv_cache import (
    KVBudget,
    allocate_kv_cache,
    bytes_per_block,
    gpu_kv_budget,
    num_blocks_for,
)
from fuserve.workers.kv_scales import CALIBRATION_TOKENS, calibrate_kv_scales
from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.models.build_manifest import check_manifest
from fuserve.workers.models.fidelity import check_implemented
from fuserve.workers.models.llama import LlamaArch
from fuserve.workers.models.loader import ModelSource, build_model, quant_scheme, resolve_source
from fuserve.workers.sampler import SampledBatch
from fuserve.workers.step_plan import StepPlan

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("fuserve")


def mixed_graph_max_tokens(config: FuserveConfig) -> int:
    """The largest step with prompt tokens that replays a CUDA graph: the config's bound, within the
    step budget (a bucket past it could never be used)."""
    return min(config.kernels.cuda_graph_max_tokens, config.scheduler.max_num_batched_tokens)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA GPU is visible; set model.device: cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[choice]


def pick_ops(choice: str, device: torch.device) -> KernelOps:
    if choice == "on" or (choice == "auto" and device.type == "cuda"):
        return KernelOps.triton()
    return KernelOps.reference()


class Worker:
    def __init__(self, config: FuserveConfig, tp: TPContext) -> None:
        self.switches = kernel_switches.apply_config(config)  # before the first kernel of this build
        self.config = config
        self.tp = tp
        self.device = pick_device(config.model.device)
        self.dtype = pick_dtype(config.model.dtype, self.device)
        self.source: ModelSource = resolve_source(config.model)
        if self.source.manifest is not None:
            assert self.source.path is not None
            check_manifest(
                self.source.manifest,
                self.source.path,
                config.parallel.tensor_parallel_size,
                config.model.quantization,
                config.model.max_model_len,
                config.model.build_source,
                config.cache.kv_cache_dtype,
            )
        self.arch = LlamaArch.from_hf(self.source.hf_config)
        self.max_model_len = min(
            config.model.max_model_len or self.arch.max_position_embeddings, self.arch.max_position_embeddings
        )
        check_implemented(self.source.hf_config, self.max_model_len)
        ops = pick_ops(config.kernels.use_triton, self.device)
        earlier = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.model = build_model(
            self.source,
            tp,
            ops,
            self.dtype,
            self.device,
            self.max_model_len,
            config.model.seed,
            quant_scheme(self.source, config.model),
        )
        # a step's largest all-reduce (its prefill's), set up before the profile step runs one
        tp.reserve_large_messages(config.scheduler.max_num_batched_tokens * self.arch.hidden_size)
        cache_cfg = config.cache
        bs = cache_cfg.block_size
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        kv_choice = cache_cfg.kv_cache_dtype
        if kv_choice == "auto" and self.source.manifest is not None:
            kv_choice = self.source.manifest.kv_cache_dtype
        self.kv_dtype = torch.float8_e4m3fn if kv_choice == "fp8" else self.dtype
        self.kv_scales_from: str | None = None  # an fp8 cache's: "build" | "start-up"
        if kv_choice == "fp8":
            self.kv_scales_from = self._fp8_kv_scales(bs)
        # Same answer on every rank (config and device type agree), so the token broadcasts pair up.
        choice = config.scheduler.async_scheduling
        self.async_scheduling = choice == "on" or (choice == "auto" and self.device.type == "cuda")
        runner = ModelRunner(self.model, self.device, bs, tp=tp, share_tokens=self.async_scheduling)
        per_block = bytes_per_block(self.arch, num_kv_heads, bs, self.kv_dtype)
        self.kv_budget: KVBudget | None = None
        if self.device.type == "cuda" and cache_cfg.num_blocks is None:
            weights = torch.cuda.memory_allocated(self.device) - earlier
            self._profile(runner, num_kv_heads)
            self.kv_budget = gpu_kv_budget(cache_cfg, per_block, earlier, weights, self.device)
            log.info("rank %d: %s", tp.rank, self.kv_budget.describe())
        # Every rank must hold the same block ids: the smallest pool that fits on every GPU.
        self.num_blocks = tp.min_across_ranks(num_blocks_for(cache_cfg, per_block, self.kv_budget))
        if tp.rank == 0:
            per_token = per_block // bs
            log.info(
                "KV cache: %d blocks x %d = %d tokens, %s, %d bytes per token per rank (%d in %s)",
                self.num_blocks,
                bs,
                self.num_blocks * bs,
                str(self.kv_dtype).removeprefix("torch."),
                per_token,
                per_token * self.dtype.itemsize // self.kv_dtype.itemsize,
                str(self.dtype).removeprefix("torch."),
            )
        if self.num_blocks * bs < self.max_model_len:
            raise RuntimeError(
                f"the KV cache holds {self.num_blocks * bs} tokens, fewer than max_model_len "
                f"{self.max_model_len}; lower model.max_model_len or give the cache more memory"
            )
        self.kv_cache = allocate_kv_cache(
            self.arch, num_kv_heads, self.num_blocks, bs, self.kv_dtype, self.device
        )
        self.model.bind_kv_cache(self.kv_cache.k, self.kv_cache.v)
        # a feature-reading draft is known from the config, so the graphs are captured keeping features
        spec = config.speculative
        self.model.keep_features = spec.method == "draft" and is_feature_draft(spec.draft)
        if self.device.type == "cuda" and config.kernels.cuda_graphs:
            runner.mixed_graphs, runner.graphs = self._capture_graphs(-(-self.max_model_len // bs))
        self.runner = runner

    def _capture_graphs(self, max_blocks: int) -> tuple[MixedGraphs | None, DecodeGraphs]:
        """The mixed-step graphs (if any) and the decode graphs, sharing one memory pool: the mixed ones
        first, as their largest bucket holds the most activations."""
        config = self.config
        spec, sched = config.speculative, config.scheduler
        max_tokens = mixed_graph_max_tokens(config)
        mixed, pool = None, None
        if max_tokens > 1:
            mixed = MixedGraphs(self.model, self.device, max_blocks, max_tokens, sched.max_num_seqs)
            pool = mixed.capture()
        k = spec.num_speculative_tokens if spec.method != "none" else 0
        rows = 1 + k * (2 if spec.second_best else 1)  # verify: a row per token
        max_batch = min(config.kernels.cuda_graph_max_batch, sched.max_num_seqs * rows)
        # with alternatives, a verify row's last key may sit at another slot than its position's
        decode = DecodeGraphs(
            self.model,
            self.device,
            max_blocks,
            max_batch,
            own_last_keys=spec.second_best,
            head=self.tp.size == 1,  # its argmax over the whole vocabulary is one device's
        )
        decode.capture(pool)
        return mixed, decode

    def _fp8_kv_scales(self, block_size: int) -> str:
        """Where this rank's FP8 KV scales come from: a built folder's (loaded with its weights), else
        a start-up calibration on random tokens. Logged, and returned ("build" | "start-up")."""
        manifest = self.source.manifest
        if manifest is not None and manifest.kv_scales:
            if self.tp.rank == 0:
                log.info("FP8 KV scales: from the build (%s)", manifest.kv_scales["calibration"])
            return "build"
        calibrate_kv_scales(self.model, block_size)
        if self.tp.rank == 0:
            log.info("FP8 KV scales: calibrated at start-up on %d random tokens", CALIBRATION_TOKENS)
        return "start-up"

    def _profile(self, runner: ModelRunner, num_kv_heads: int) -> None:
        """One forward at the largest batch the scheduler allows, so the KV cache gets what is left."""
        sched = self.config.scheduler
        per_seq = max(1, sched.max_num_batched_tokens // max(1, min(sched.max_num_seqs, 256)))
        blocks = -(-per_seq // self.config.cache.block_size)
        scratch = allocate_kv_cache(
            self.arch, num_kv_heads, blocks, self.config.cache.block_size, self.dtype, self.device
        )
        self.model.bind_kv_cache(scratch.k, scratch.v)
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.profile(sched.max_num_batched_tokens, min(sched.max_num_seqs, 256), blocks)
        torch.cuda.synchronize(self.device)
        del scratch
        empty = [torch.empty(0)] * self.arch.num_layers
        self.model.bind_kv_cache(empty, empty)

    def set_keep_features(self, on: bool) -> None:
        """Whether steps hand back every row's feature (a feature-reading draft speculates). CUDA graphs
        replay only what they captured, so graphs captured without features are captured again with
        them (a draft attached after start-up, as benchmarks and tests attach one); under tensor
        parallelism every rank would have to, so there the config must name the draft from the start."""
        runner = self.runner
        graphs = [g for g in (runner.graphs, runner.mixed_graphs) if g is not None]
        self.model.keep_features = on
        if not on:
            self.model.features = None
            return
        if all(g.keeps_features for g in graphs):
            return
        if self.tp.size > 1:
            self.model.keep_features = False
            raise ValueError(
                "a feature-reading draft under tensor parallelism needs the target's CUDA graphs captured "
                "keeping features on every rank: name the draft in the config's speculative.draft "
                "(method: draft), or set kernels.cuda_graphs: false"
            )
        for g in graphs:
            g.release()
        bs = self.config.cache.block_size
        runner.mixed_graphs, runner.graphs = self._capture_graphs(-(-self.max_model_len // bs))

    def launch(self, plan: StepPlan, prev: SampledBatch | None) -> SampledBatch | None:
        """Rank 0: queue the step on the device (its sampled tokens come back later)."""
        return self.runner.launch(plan, prev)

    def launch_logits(self, plan: StepPlan, prev: SampledBatch | None) -> torch.Tensor | None:
        """Rank 0: queue the step's forward and logits only (its sampling waits on grammar masks)."""
        return self.runner.launch_logits(plan, prev)

    def sample(self, plan: StepPlan, logits: torch.Tensor, bitmask: torch.Tensor | None) -> SampledBatch:
        """Rank 0: queue the masked sampling of logits from `launch_logits`."""
        return self.runner.sample(plan, logits, bitmask)

    def follow(self, plan: StepPlan) -> None:
        """Ranks 1..N-1: the same step, for its collectives; rank 0 samples."""
        self.runner.follow(plan)

    def shutdown(self) -> None:
        """The CUDA graphs go before the NCCL communicator they captured. The weights and the KV pool
        are let go here, not when the last reference to the worker goes: a caller that keeps one (or a
        reference cycle that waits for a full collection) would otherwise hold the GPU memory that the
        next engine in this process counts as taken (its KV pool shrank by one model's weights)."""
        if not hasattr(self, "runner"):
            return
        for graphs in (self.runner.graphs, self.runner.mixed_graphs):
            if graphs is not None:
                graphs.release()
        del self.runner, self.model, self.kv_cache
