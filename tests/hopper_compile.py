"""Compile the tensor-parallel and sampling kernels for sm_90 (Hopper) on any machine, GPU or not.

The CPU tests run kernels in Triton's interpreter, which accepts code the compiler refuses (a plain
Python global read inside a kernel, a variable whose type changes in a branch). Compiling for an H100
target here (Triton's front end, then the bundled ptxas) catches those before a GPU run does.
Run as a script: `python tests/hopper_compile.py` prints one line per kernel, exits 1 on a failure.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# argument name -> Triton type where it is not a bf16 tensor (pointers) or an int32 (sizes, strides)
TYPES = {
    "data_ptrs": "*i64",
    "flag_ptrs": "*i64",
    "slot_ptrs": "*i64",
    "counter_ptr": "*i32",
    "status_ptr": "i64",
    "part_val_ptr": "*fp32",
    "part_idx_ptr": "*i32",
    "eps": "fp32",
}


def compile_for_hopper(kernel: Any, constexprs: dict[str, Any], types: dict[str, str] | None = None) -> None:
    fn = kernel
    while not isinstance(fn, JITFunction):  # under @triton.autotune, the JITFunction inside
        fn = fn.fn
    overrides = {**TYPES, **(types or {})}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = overrides.get(name, "*bf16" if name.endswith("_ptr") else "i32")
    triton.compile(ASTSource(fn, signature, constexprs), target=HOPPER)


def main() -> int:
    from fuserve.parallel import all_reduce_rmsnorm, gemv_push
    from fuserve.workers.kernels import (
        argmax,
        fp8_rows,
        gemv,
        nucleus_threshold,
        paged_decode_attention,
        paged_prefill_attention,
        quant_gemm,
        quant_gemv,
        rmsnorm,
        rotary,
        silu_mul,
    )

    pdl = {"USE_PDL": True}
    gemv_tile = {"BLOCK_N": 8, "BLOCK_K": 512, "LINE": 64}
    prefetch = {"L2_PREFETCH": True}
    kernels = {
        "gemv": (gemv._gemv_kernel, {"HAS_BIAS": True, **gemv_tile, "L2_PREFETCH": False, **pdl}, None),
        "gemv + L2 prefetch": (gemv._gemv_kernel, {"HAS_BIAS": False, **gemv_tile, **prefetch, **pdl}, None),
        "gemv_push": (
            gemv_push._gemv_push_kernel,
            {"HAS_BIAS": False, "WORLD": 2, **gemv_tile, **prefetch, **pdl},
            None,
        ),
        "pushed_add_rmsnorm": (
            gemv_push._pushed_add_rmsnorm_kernel,
            {"WORLD": 2, "BLOCK_H": 4096, **pdl},
            None,
        ),
        "all_reduce_add_rmsnorm": (
            all_reduce_rmsnorm._all_reduce_add_rmsnorm_kernel,
            {"WORLD": 2, "BLOCK_H": 4096, "PREFETCH": False, **pdl},
            None,
        ),
        "all_reduce_add_rmsnorm + next weight's prefetch": (
            all_reduce_rmsnorm._all_reduce_add_rmsnorm_kernel,
            {"WORLD": 2, "BLOCK_H": 4096, "PREFETCH": True, **pdl},
            {"prefetch_ptr": "*u8"},
        ),
        "argmax chunks": (argmax._chunk_max_kernel, {"CHUNK": 2048, **pdl}, None),
        "argmax pick": (
            argmax._pick_chunk_kernel,
            {"CHUNKS_PAD": 64, "KEYED": False, **pdl},
            {"out_ptr": "*i64"},
        ),
        "argmax pick keys": (
            argmax._pick_chunk_kernel,
            {"CHUNKS_PAD": 64, "KEYED": True, **pdl},
            {"out_ptr": "*i64"},
        ),
        "nucleus threshold": (
            nucleus_threshold._nucleus_threshold_kernel,
            {
                "ROUNDS": nucleus_threshold.ROUNDS,
                "PIVOTS": nucleus_threshold.PIVOTS,
                "ONE_BITS": nucleus_threshold.ONE_BITS,
                "BLOCK": nucleus_threshold.BLOCK,
            },
            {"probs_ptr": "*fp32", "target_ptr": "*fp32", "known_ptr": "*fp32", "out_ptr": "*fp32"},
        ),
    }
    quant_tile = {"BLOCK_N": 8, "BLOCK_K": 1024}  # one of quant_gemv._TILES
    gemm_tile = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
    for wname, wtype, fp8 in (("int8", "*i8", False), ("fp8", "*u8", True)):
        kernels[f"quant_gemv {wname}"] = (
            quant_gemv._quant_gemv_kernel,
            {"HAS_BIAS": True, "FP8": fp8, **quant_tile, **pdl},
            {"w_ptr": wtype, "scale_ptr": "*fp32"},
        )
        kernels[f"quant_gemm {wname}"] = (
            quant_gemm._quant_gemm_kernel,
            {"HAS_BIAS": False, "FP8": fp8, "IEEE_FP32": False, **gemm_tile},
            {"w_ptr": wtype, "scale_ptr": "*fp32"},
        )
        kernels[f"quant_gemm {wname}, 2-15 rows"] = (  # the narrowest tile of the small-M configs
            quant_gemm._quant_gemm_kernel,
            {"HAS_BIAS": False, "FP8": fp8, "IEEE_FP32": False, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 512},
            {"w_ptr": wtype, "scale_ptr": "*fp32"},
        )
    fp8_cache = {"k_cache_ptr": "*u8", "v_cache_ptr": "*u8", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    index = {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "scale_log2": "fp32"}
    attention = {"HEAD_DIM": 128, "BLOCK_SIZE": 16, "UPCAST": False, "DOT_PRECISION": "tf32", "FP8_KV": True}
    pair_words = {"k_cache_ptr": "*i16", "v_cache_ptr": "*i16"}
    # True: decode graphs that serve verify steps with alternatives; pairs: the cache read as 16-bit words
    for own, pairs in ((False, False), (True, False), (False, True), (True, True)):
        kernels[f"paged decode, fp8 KV{', last key slots' if own else ''}{', pairs' if pairs else ''}"] = (
            paged_decode_attention._paged_decode_split_kernel,
            {
                "GROUP": 4,
                "GROUP_PAD": 16,
                "BLOCK_N": 64,
                "SINGLE_SPLIT": False,
                "LAST_KEY_SLOTS": own,
                "FP8_PAIRS": pairs,
                **attention,
                **pdl,
            },
            {
                **fp8_cache,
                **(pair_words if pairs else {}),
                **index,
                "part_m_ptr": "*fp32",
                "part_l_ptr": "*fp32",
                "part_acc_ptr": "*fp32",
                "last_key_slots_ptr": "*i64",
            },
        )
    # tile map: the CUDA-graph launch of a mixed step (cuda_graphs.MixedGraphs); positions: a verify step
    # with alternatives (speculative/alternatives.py)
    for tile_map, positions in ((False, False), (True, False), (False, True)):
        kernels[
            f"paged prefill, fp8 KV{', tile map' if tile_map else ''}{', positions' if positions else ''}"
        ] = (
            paged_prefill_attention._paged_prefill_kernel,
            {
                "GROUP": 4,
                "GROUP_PAD": 4,
                "BLOCK_Q": 16,
                "BLOCK_N": 64,
                "TILE_MAP": tile_map,
                "HAS_POSITIONS": positions,
                **attention,
            },
            {
                **fp8_cache,
                **index,
                "query_start_loc_ptr": "*i32",
                "tile_map_ptr": "*i32",
                "query_positions_ptr": "*i64",
            },
        )
    kernels["rotary + fp8 KV write"] = (
        rotary._rotary_kv_write_kernel,
        {"HEAD_DIM": 128, "HALF_PAD": 64, "Q_HEADS_PAD": 32, "KV_HEADS_PAD": 8, "FP8_KV": True, **pdl},
        {
            **fp8_cache,
            "positions_ptr": "*i64",
            "slot_mapping_ptr": "*i64",
            "cos_ptr": "*fp32",
            "sin_ptr": "*fp32",
        },
    )
    # the FP8 W8A8 producers: normed / silu*up written as e4m3 with one fp32 scale per token
    fp8_out = {"scale_ptr": "*fp32", "eps": "fp32"}
    for residual in (False, True):
        kernels[f"rmsnorm, fp8 out{', residual' if residual else ''}"] = (
            rmsnorm._rmsnorm_kernel,
            {"HAS_RESIDUAL": residual, "FP8_OUT": True, "BLOCK_H": 4096, **pdl},
            {**fp8_out, "out_ptr": "*fp8e4nv"},
        )
    kernels["quantize_rows_fp8"] = (
        fp8_rows._quantize_rows_fp8_kernel,
        {"BLOCK": 2048, **pdl},
        {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
    )
    for block, one_pass in ((2048, False), (16384, True)):  # rows walked twice; rows read once whole
        kernels[f"silu_mul, fp8 out{', one pass' if one_pass else ''}"] = (
            silu_mul._silu_mul_fp8_kernel,
            {"BLOCK": block, "ONE_PASS": one_pass, **pdl},
            {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
        )
    failed = 0
    for name, (kernel, constexprs, types) in kernels.items():
        try:
            compile_for_hopper(kernel, constexprs, types)
            print(f"ok {name}")
        except Exception as err:
            failed += 1
            print(f"FAILED {name}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
