"""Linear and embedding layers that hold one tensor-parallel shard of their weight.

Each parameter carries a `weight_loader` that takes the full checkpoint tensor (or a lazy
safetensors slice) and copies in only this rank's part, so loading never materialises a whole
tensor on a rank that needs a slice of it. Fused weights (QKV, gate/up) load their pieces by
shard id into their place in the fused parameter.
  ColumnParallelLinear    output features split across ranks (no communication)
  MergedColumnParallel    several column-parallel outputs in one GEMM (gate/up)
  QKVParallelLinear       q, k, v heads split across ranks; KV heads replicated when ranks > kv heads
  RowParallelLinear       input features split; one all-reduce sums the partial outputs (or the caller
                          does, fused with its residual add and RMSNorm; for one decode row the GEMV
                          itself pushes its partial to the peers)
  VocabParallelEmbedding  vocab rows split; out-of-range ids give zeros, all-reduce fills them in
  ParallelLMHead          vocab rows split; logits gathered on rank 0 only (the only rank that samples),
                          or for greedy rows each rank's argmax, max-reduced into the token on every rank

With a `WeightQuant` the linear layers hold 8-bit weights and one fp32 scale per output row
(`weight_scale`; models/quant_scheme.py): each checkpoint slice is quantized as it is copied in, so a
full-precision checkpoint converts on load without a full-precision copy of the model. Under FP8 W8A8
a layer's input may come already quantized per token (`Fp8Activations`) from the kernel that produced
it; `takes_fp8_input` says when the layer wants that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fuserve.parallel.tp_context import Partial, TPContext
from fuserve.parallel.vocab_parallel_argmax import vocab_parallel_argmax
from fuserve.workers.kernels.quant_linear import takes_fp8_input
from fuserve.workers.models.quant_scheme import Fp8Activations, QuantScheme, quantize_rows

WeightLoader = Callable[..., None]
# y = x @ W^T + b; the model passes its kernel choice (e.g. a bandwidth-bound GEMV for decode).
LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# y = x @ dequant(qweight, scale)^T + b, called (x, qweight, scale, bias, quantize_activations)
QuantLinearFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class WeightQuant:
    """How a linear layer holds and multiplies 8-bit weights: the scheme and the kernel choice."""

    scheme: QuantScheme
    linear: QuantLinearFn


class _Linear(nn.Module):
    """The weight (full precision, or 8-bit with per-row scales) and the product shared by the
    column- and row-parallel layers."""

    def _make_weight(self, rows: int, cols: int, quant: WeightQuant | None) -> None:
        self.quant = quant
        dtype = quant.scheme.weight_dtype if quant is not None else None
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.load  # type: ignore[attr-defined]
        self.weight_scale = None
        if quant is not None:
            self.weight_scale = nn.Parameter(torch.empty(rows, dtype=torch.float32), requires_grad=False)

    def load(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        raise NotImplementedError

    def _store_rows(self, offset: int, size: int, value: torch.Tensor) -> None:
        """Weight rows [offset, offset + size) from a full-precision slice of that many rows, quantized
        if the weight is 8-bit."""
        rows = self.weight.data.narrow(0, offset, size)
        if tuple(rows.shape) != tuple(value.shape):
            raise ValueError(
                f"checkpoint shape {tuple(value.shape)} does not fit parameter {tuple(rows.shape)}"
            )
        if self.quant is None:
            rows.copy_(value)
            return
        assert self.weight_scale is not None
        q, scale = quantize_rows(value.to(rows.device), self.quant.scheme)
        rows.copy_(q)
        self.weight_scale.data.narrow(0, offset, size).copy_(scale)

    def takes_fp8_input(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether `rows` rows of input in `dtype` should come quantized (`Fp8Activations`): FP8 W8A8
        where this layer would quantize them itself (kernels/quant_linear.py)."""
        if self.quant is None or not self.quant.scheme.quantize_activations:
            return False
        return takes_fp8_input(rows, dtype, device, self.weight, True)

    def _matmul(self, x: torch.Tensor | Fp8Activations, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is None:
            assert isinstance(x, torch.Tensor), "only an 8-bit layer takes quantized activations"
            return self.linear(x, self.weight, bias)
        act = self.quant.scheme.quantize_activations
        return self.quant.linear(x, self.weight, self.weight_scale, bias, act)


def _shape(src: Any) -> tuple[int, ...]:
    return tuple(src.get_shape()) if hasattr(src, "get_shape") else tuple(src.shape)


def _narrow(src: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows or columns [start, start+length) of a tensor or a safetensors slice, read lazily."""
    index = [slice(None)] * len(_shape(src))
    index[dim] = slice(start, start + length)
    return src[tuple(index)]


def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint shape {tuple(value.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(value)


def load_replicated(param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
    """Every rank holds the whole tensor (norms, replicated biases)."""
    _copy(param, src[:])


def _divide(total: int, size: int, what: str) -> int:
    if total % size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({size})")
    return total // size


class ColumnParallelLinear(_Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPContext,
        linear: LinearFn = F.linear,
        quant: WeightQuant | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.linear = linear
        self.out_per_rank = _divide(out_features, tp.size, "output features")
        self._make_weight(self.out_per_rank, in_features, quant)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.load  # type: ignore[attr-defined]

    def load(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        value = _narrow(src, 0, self.tp.rank * self.out_per_rank, self.out_per_rank)
        if param is self.weight:
            self._store_rows(0, self.out_per_rank, value)
        else:
            _copy(param, value)

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        bias: bool,
        tp: TPContext,
        linear: LinearFn = F.linear,
        quant: WeightQuant | None = None,
    ) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp, linear, quant)

    def load(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        per_rank = [_divide(s, self.tp.size, "merged output features") for s in self.out_sizes]
        offset = sum(per_rank[: int(shard_id)])
        size = per_rank[int(shard_id)]
        value = _narrow(src, 0, self.tp.rank * size, size)
        if param is self.weight:
            self._store_rows(offset, size, value)
        else:
            _copy(param.data.narrow(0, offset, size), value)


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPContext,
        linear: LinearFn = F.linear,
        quant: WeightQuant | None = None,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp.size, "attention heads")
        # More ranks than KV heads: each rank keeps the one KV head its query heads use.
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        if tp.size > num_kv_heads and tp.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size {tp.size} must divide or be a multiple of {num_kv_heads}")
        if tp.size <= num_kv_heads:
            _divide(num_kv_heads, tp.size, "key/value heads")
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, tp, linear, quant)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def load(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, rank_block = 0, self.q_size, self.tp.rank
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, rank_block = self.kv_size, self.tp.rank // self.kv_replicas
        value = _narrow(src, 0, rank_block * size, size)
        if param is self.weight:
            self._store_rows(offset, size, value)
        else:
            _copy(param.data.narrow(0, offset, size), value)


class RowParallelLinear(_Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPContext,
        linear: LinearFn = F.linear,
        reduce_output: bool = True,
        quant: WeightQuant | None = None,
    ) -> None:
        """`reduce_output=False` returns this rank's partial sum for the caller to reduce (fused with
        what follows, see TPContext.all_reduce_add_rmsnorm); the bias then joins rank 0's part only."""
        super().__init__()
        self.tp = tp
        self.linear = linear
        self.reduce_output = reduce_output
        self.in_per_rank = _divide(in_features, tp.size, "input features")
        self._make_weight(out_features, self.in_per_rank, quant)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = load_replicated  # type: ignore[attr-defined]

    def load(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        value = _narrow(src, 1, self.tp.rank * self.in_per_rank, self.in_per_rank)
        self._store_rows(0, self.weight.shape[0], value)

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor | Partial:
        if not self.reduce_output:
            bias = self.bias if self.tp.rank == 0 else None
            if self.quant is not None:  # the pushing GEMV reads full-precision weights only
                return self._matmul(x, bias)
            assert isinstance(x, torch.Tensor)
            return self.tp.row_parallel_partial(x, self.weight, bias, self.linear)
        y = self.tp.all_reduce(self._matmul(x, None))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPContext, linear: LinearFn = F.linear) -> None:
        super().__init__()
        self.tp = tp
        self.linear = linear  # used by the LM head subclass
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden), requires_grad=False)
        self.weight.weight_loader = self.load  # type: ignore[attr-defined]

    def load(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        rows = max(0, min(self.per_rank, _shape(src)[0] - self.start))
        if rows:
            _copy(param.data.narrow(0, 0, rows), _narrow(src, 0, self.start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        tp: TPContext,
        linear: LinearFn = F.linear,
        quant: WeightQuant | None = None,
    ) -> None:
        """`quant`: the head in 8 bits (one scale per vocabulary row), multiplied weight-only: at batch 1
        the head is the largest single matrix a step reads (Llama-3-8B: 1.05 GB in bf16)."""
        super().__init__(vocab_size, hidden, tp, linear)
        self.quant = quant
        self.weight_scale = None
        if quant is not None:
            rows = self.per_rank
            self.weight = nn.Parameter(
                torch.zeros(rows, hidden, dtype=quant.scheme.weight_dtype), requires_grad=False
            )
            self.weight.weight_loader = self.load  # type: ignore[attr-defined]
            self.weight_scale = nn.Parameter(torch.ones(rows, dtype=torch.float32), requires_grad=False)

    def load(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        if self.quant is None:
            super().load(param, src, shard_id)
            return
        assert self.weight_scale is not None
        rows = max(0, min(self.per_rank, _shape(src)[0] - self.start))
        if rows:
            value = _narrow(src, 0, self.start, rows).to(param.device)
            q, scale = quantize_rows(value, self.quant.scheme)
            param.data.narrow(0, 0, rows).copy_(q)
            self.weight_scale.data.narrow(0, 0, rows).copy_(scale)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return self.linear(hidden, self.weight, None)
        return self.quant.linear(hidden, self.weight, self.weight_scale, None, False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """hidden [S, H] -> logits [S, vocab] on rank 0; [S, 0] on the other ranks."""
        logits = self._logits(hidden)
        return self.tp.gather_last_dim(logits)[..., : self.vocab_size]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Collective: hidden [S, H] -> each row's argmax token [S] int64 on every rank, from this rank's
        logits slice alone (vocab_parallel_argmax.py); the padding rows past the vocabulary never win."""
        logits = self._logits(hidden)
        real = max(0, min(self.per_rank, self.vocab_size - self.start))
        return vocab_parallel_argmax(logits[:, :real], self.start, self.tp)
