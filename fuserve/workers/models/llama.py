"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2) on a paged KV cache, read top to bottom.

Tokens of all sequences in a step are flattened into one batch of T rows (no padding); the
attention metadata says which rows belong to which sequence and where their K/V live.
  embed -> [rmsnorm -> qkv GEMM -> rope + KV write -> paged attention -> o_proj
            -> add + rmsnorm -> gate/up GEMM -> silu*up -> down_proj] x L -> add + rmsnorm
  logits only for the rows that sample.
Under FP8 W8A8 (with enough rows for the fp8 GEMM) the two norms and silu*up write their output as
e4m3 with per-token scales (`Fp8Activations`) for the QKV, gate/up and down GEMMs, so those layers
skip their own activation quantization; o_proj still quantizes the attention output itself.
Weights are column/row-parallel layers (fuserve.parallel.layers); with one rank they are plain.
Under tensor parallelism o_proj and down_proj return partial sums; the add + rmsnorm after each one
sums them over ranks (one fused kernel on GPU for decode-sized batches; at batch 1 the GEMV itself
pushes its partial to the peers and that kernel only sums, see fuserve/parallel/gemv_push.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fuserve.parallel.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightQuant,
    load_replicated,
)
from fuserve.parallel.tp_context import Partial, TPContext
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.models.quant_scheme import SCHEMES, Fp8Activations, QuantScheme
from fuserve.workers.models.rope import rope_tables

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaArch:
    """The architecture facts of an HF config.json, checked once."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    model_type: str

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaArch:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; fuserve runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = cfg["num_attention_heads"]
        rope_scaling = cfg.get("rope_scaling")
        theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling into one dict
        if isinstance(rope_params, dict):
            theta = rope_params.get("rope_theta", theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta if theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
        )


@dataclass
class AttentionMetadata:
    """Where each row's K/V go and which cached K/V each sequence attends to.

    slot_mapping:    [T] cache slot of each new token (block * block_size + offset), -1 = padding
    block_tables:    [B, M] block ids of each sequence
    query_start_loc: [B+1] row offsets of each sequence's new tokens
    context_lens:    [B] tokens of each sequence after this step (cached + new)
    tile_map:        [G, 2] the prefill attention's programs, for a grid fixed under a CUDA graph
    query_positions: [T] each row's position where some row's differs from its slot's (a verify step
                     with alternatives: speculative/alternatives.py); None: every row is causal
    last_key_slots:  [B] decode only: the cache slot of each row's last key, < 0 for the block table's
                     (a verify step with alternatives as decode rows: StepPlan.as_decode_rows)
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    max_query_len: int
    max_context_len: int
    tile_map: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    last_key_slots: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, tp: TPContext, ops: KernelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.eps = eps
        self.tp = tp
        self.ops = ops
        # the weight of the linear layer that reads this norm's output, for the fused all-reduce to warm
        # L2 with (a callable: a module held here would register as a submodule twice)
        self.next_weight: Callable[[], torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor | Partial, residual: torch.Tensor | None = None, fp8_out: bool = False
    ) -> tuple[torch.Tensor | Fp8Activations, torch.Tensor]:
        """Returns (normed, residual): the first call starts the residual stream from x (the embedding,
        whole); later ones get x as this rank's partial sum (o_proj, down_proj) and reduce it here, fused
        with the add and the norm where the tensor-parallel group can. `fp8_out`: normed comes quantized
        per token for an FP8 W8A8 layer (except from the fused all-reduce, whose output stays in the
        model dtype for the layer to quantize)."""
        if residual is None:
            assert isinstance(x, torch.Tensor), "the residual stream starts from the embedding"
            if fp8_out:
                q, scale = self.ops.rmsnorm_fp8(x, self.weight, self.eps)
                return Fp8Activations(q, scale, x.dtype), x
            return self.ops.rmsnorm(x, self.weight, self.eps), x
        add_rmsnorm = self._add_rmsnorm_fp8 if fp8_out else self.ops.fused_add_rmsnorm
        next_weight = self.next_weight() if self.next_weight is not None else None
        return self.tp.all_reduce_add_rmsnorm(x, residual, self.weight, self.eps, add_rmsnorm, next_weight)

    def _add_rmsnorm_fp8(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[Fp8Activations, torch.Tensor]:
        q, scale, new_residual = self.ops.fused_add_rmsnorm_fp8(x, residual, weight, eps)
        return Fp8Activations(q, scale, x.dtype), new_residual


class LlamaAttention(nn.Module):
    def __init__(self, arch: LlamaArch, tp: TPContext, ops: KernelOps, quant: WeightQuant | None) -> None:
        super().__init__()
        self.ops = ops
        self.head_dim = arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size,
            arch.head_dim,
            arch.num_heads,
            arch.num_kv_heads,
            arch.attention_bias,
            tp,
            ops.linear,
            quant,
        )
        self.o_proj = RowParallelLinear(
            arch.num_heads * arch.head_dim,
            arch.hidden_size,
            False,
            tp,
            ops.linear,
            reduce_output=False,
            quant=quant,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.scale = arch.head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # an fp8 cache's per-KV-head scales (workers/kv_scales.py calibrates them)
        self.register_buffer("k_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)

    def _kv_scales(self) -> dict[str, torch.Tensor]:
        """The cache kernels' scale arguments: only an fp8 cache takes them."""
        if self.k_cache.dtype == torch.float8_e4m3fn:
            return {"k_scale": self.k_scale, "v_scale": self.v_scale}
        return {}

    def forward(
        self,
        hidden: torch.Tensor | Fp8Activations,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor | Partial:
        """This rank's partial o_proj output, summed over ranks by the next RMSNorm."""
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hkv) D]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q = qkv[:, :q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(t, self.num_kv_heads, self.head_dim)
        scales = self._kv_scales()
        q = self.ops.rotary_kv_write(
            q, k, v, positions, cos, sin, self.k_cache, self.v_cache, meta.slot_mapping, **scales
        )
        if meta.is_decode:
            o = self.ops.paged_decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.context_lens,
                self.scale,
                last_key_slots=meta.last_key_slots,
                **scales,
            )
        else:
            o = self.ops.paged_prefill_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.context_lens,
                self.scale,
                meta.max_query_len,
                tile_map=meta.tile_map,
                query_positions=meta.query_positions,
                **scales,
            )
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, arch: LlamaArch, tp: TPContext, ops: KernelOps, quant: WeightQuant | None) -> None:
        super().__init__()
        self.ops = ops
        inter = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            arch.hidden_size, [inter, inter], False, tp, ops.linear, quant
        )
        self.down_proj = RowParallelLinear(
            inter, arch.hidden_size, False, tp, ops.linear, reduce_output=False, quant=quant
        )

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor | Partial:
        h = self.gate_up_proj(x)
        if self.down_proj.takes_fp8_input(h.shape[0], h.dtype, h.device):
            q, scale = self.ops.silu_mul_fp8(h)
            return self.down_proj(Fp8Activations(q, scale, h.dtype))
        return self.down_proj(self.ops.silu_mul(h))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch, tp: TPContext, ops: KernelOps, quant: WeightQuant | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, tp, ops, quant)
        self.mlp = LlamaMLP(arch, tp, ops, quant)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, tp, ops)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, tp, ops)
        self.input_layernorm.next_weight = lambda: self.self_attn.qkv_proj.weight
        self.post_attention_layernorm.next_weight = lambda: self.mlp.gate_up_proj.weight

    def forward(
        self,
        hidden: torch.Tensor | Partial,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor | Partial, torch.Tensor]:
        weight = self.input_layernorm.weight  # the model dtype (the rope tables are fp32)
        rows, dtype, device = positions.shape[0], weight.dtype, weight.device
        normed, residual = self.input_layernorm(
            hidden, residual, self.self_attn.qkv_proj.takes_fp8_input(rows, dtype, device)
        )
        attn = self.self_attn(normed, positions, meta, cos, sin)
        normed, residual = self.post_attention_layernorm(
            attn, residual, self.mlp.gate_up_proj.takes_fp8_input(rows, dtype, device)
        )
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: LlamaArch, tp: TPContext, ops: KernelOps, quant: WeightQuant | None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, tp, ops, quant) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, tp, ops)


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard id within a fused weight)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        arch: LlamaArch,
        tp: TPContext,
        ops: KernelOps,
        max_positions: int,
        quant: QuantScheme | None = None,
    ) -> None:
        """`quant`: 8-bit weights for the decoder layers' linear layers, and for the LM head in int8 where
        the scheme says so (the embedding stays in the model dtype; a tied head then gets its own copy)."""
        super().__init__()
        self.arch = arch
        self.quant = quant
        weight_quant = WeightQuant(quant, ops.quant_linear) if quant is not None else None
        self.model = LlamaModel(arch, tp, ops, weight_quant)
        head_quant = None
        if quant is not None and quant.int8_lm_head:
            head_quant = WeightQuant(SCHEMES["int8-wo"], ops.quant_linear)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp, ops.linear, head_quant)
        self.tied_head = arch.tie_word_embeddings and head_quant is None
        if self.tied_head:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.norm.next_weight = lambda: self.lm_head.weight
        cos, sin = rope_tables(arch.head_dim, arch.rope_theta, arch.rope_scaling, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # A feature-reading draft (speculative/feature_draft_model.py) reads the last decoder layer's
        # output before the final norm. The final fused add + norm computes that sum anyway: with the
        # flag on, `features` keeps a reference to it ([T, hidden], every row of the last forward);
        # off, nothing is kept.
        self.keep_features = False
        self.features: torch.Tensor | None = None

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        for layer, k, v in zip(self.model.layers, k_caches, v_caches, strict=True):
            layer.self_attn.k_cache = k
            layer.self_attn.v_cache = v

    def copy_kv_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's K/V at cache slots `src` to slots `dst` ([n] int64 each): a kept alternative's
        K/V to its position (speculative/alternatives.py)."""
        for layer in self.model.layers:
            for cache in (layer.self_attn.k_cache, layer.self_attn.v_cache):
                slots = cache.view(-1, *cache.shape[2:])
                slots[dst] = slots[src]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        hidden: torch.Tensor | Partial = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, positions, meta, self.rope_cos, self.rope_sin)
        normed, summed = self.model.norm(hidden, residual)
        if self.keep_features:
            self.features = summed
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's argmax token, on every tensor-parallel rank, without the logits gather."""
        return self.lm_head.greedy(hidden)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Copy checkpoint tensors (or lazy slices) into this rank's parameters; returns what loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, src in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            if name == "model.embed_tokens.weight" and self.arch.tie_word_embeddings and not self.tied_head:
                self.lm_head.load(self.lm_head.weight, src)  # the head's own 8-bit copy of the embedding
                loaded.update(("lm_head.weight", "lm_head.weight_scale"))
            target, shard = name, None
            for ckpt, (ours, shard_id) in self.packed_modules.items():
                if f".{ckpt}." in name:
                    target, shard = name.replace(f".{ckpt}.", f".{ours}."), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in a {self.arch.model_type} model")
            getattr(param, "weight_loader", load_replicated)(param, src, shard)
            loaded.add(target)
            if target + "_scale" in params:  # an 8-bit weight's loader fills its scales too
                loaded.add(target + "_scale")
        return loaded
