"""Which implementation of each fused op the model calls: Triton kernels or their torch references.

Chosen once when the model is built (Triton on GPU, references on CPU unless forced), so the model
code has one path and tests can run either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelOps:
    rmsnorm: Callable
    fused_add_rmsnorm: Callable
    rotary_kv_write: Callable
    silu_mul: Callable
    # the same three with their output quantized per token to e4m3 for an FP8 W8A8 layer: (q, scale, ...)
    rmsnorm_fp8: Callable
    fused_add_rmsnorm_fp8: Callable
    silu_mul_fp8: Callable
    paged_decode_attention: Callable
    paged_prefill_attention: Callable
    linear: Callable
    quant_linear: Callable  # 8-bit weights (kernels/quant_linear.py)
    name: str

    @classmethod
    def reference(cls) -> KernelOps:
        from fuserve.workers.kernels import cpu_linear, quant_linear, rmsnorm, rotary, silu_mul
        from fuserve.workers.kernels import paged_decode_attention as dec
        from fuserve.workers.kernels import paged_prefill_attention as pre

        return cls(
            rmsnorm=rmsnorm.rmsnorm_ref,
            fused_add_rmsnorm=rmsnorm.fused_add_rmsnorm_ref,
            rotary_kv_write=rotary.rotary_kv_write_ref,
            silu_mul=silu_mul.silu_mul_ref,
            rmsnorm_fp8=rmsnorm.rmsnorm_fp8_ref,
            fused_add_rmsnorm_fp8=rmsnorm.fused_add_rmsnorm_fp8_ref,
            silu_mul_fp8=silu_mul.silu_mul_fp8_ref,
            paged_decode_attention=dec.paged_decode_attention_ref,
            paged_prefill_attention=pre.paged_prefill_attention_ref,
            linear=cpu_linear.linear,  # oneDNN on the CPU: a few rows cost about what one does
            quant_linear=quant_linear.quant_linear_ref,
            name="torch-ref",
        )

    @classmethod
    def triton(cls) -> KernelOps:
        from fuserve.workers.kernels import gemv, quant_linear, rmsnorm, rotary, silu_mul
        from fuserve.workers.kernels import paged_decode_attention as dec
        from fuserve.workers.kernels import paged_prefill_attention as pre

        return cls(
            rmsnorm=rmsnorm.rmsnorm,
            fused_add_rmsnorm=rmsnorm.fused_add_rmsnorm,
            rotary_kv_write=rotary.rotary_kv_write,
            silu_mul=silu_mul.silu_mul,
            rmsnorm_fp8=rmsnorm.rmsnorm_fp8,
            fused_add_rmsnorm_fp8=rmsnorm.fused_add_rmsnorm_fp8,
            silu_mul_fp8=silu_mul.silu_mul_fp8,
            paged_decode_attention=dec.paged_decode_attention,
            paged_prefill_attention=pre.paged_prefill_attention,
            linear=gemv.linear,
            quant_linear=quant_linear.quant_linear,
            name="triton",
        )
