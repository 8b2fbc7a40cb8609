"""Batch-1 GEMV on 8-bit weights (quant_gemv.py) against the bf16 GEMV, on Llama-3-8B's shapes, in TB/s
and as a share of the copy bandwidth measured in the same run; checked against its torch reference first.
A tensor-core variant measured here lost and was removed (benchmarks/NOTES.md, issue 18).

    python benchmarks/bench_quant_gemv.py            # GPU, ~2-3 min with autotuning; JSON to $OUT
"""

from __future__ import annotations

import datetime as dt
import json
import os

import torch
from bench_decode import commit
from bench_gemv import SHAPES, bench, copy_bandwidth, time_rotating

from fuserve.workers.kernels.gemv import gemv
from fuserve.workers.kernels.quant_gemv import quant_gemv, quant_gemv_ref
from fuserve.workers.models.quant_scheme import SCHEMES, quantize_rows

COPIES = 4  # weight copies cycled through, so that no shape is served from L2


def main() -> None:
    assert torch.cuda.is_available(), "a GPU benchmark"
    dev = torch.device("cuda")
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s")
    rows = []
    base = {
        "bench": "quant_gemv",
        "device": torch.cuda.get_device_name(),
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "copy_tb_s": copy / 1e12,
    }
    for name, (n, k) in SHAPES.items():
        if name == "lm_head":
            continue  # stays in bf16 under every scheme
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(COPIES)]
        ms = time_rotating(lambda x, w: gemv(x, w), x, w16)
        rows.append(
            {
                **base,
                "shape": name,
                "n": n,
                "k": k,
                "kernel": "gemv_bf16",
                "us": ms * 1e3,
                "tb_s": n * k * 2 / (ms * 1e-3) / 1e12,
            }
        )
        for scheme in ("int8-wo", "fp8-wo"):
            qs = [quantize_rows(w, SCHEMES[scheme]) for w in w16]
            want = quant_gemv_ref(x, *qs[0])
            for kname, fn in (("quant_gemv", quant_gemv),):
                got = fn(x, *qs[0])
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                assert err < 2e-2, f"{kname} {scheme} {name}: relative error {err}"
                state = {"i": 0}

                def call(fn=fn, qs=qs, state=state, x=x) -> None:
                    state["i"] = (state["i"] + 1) % COPIES
                    fn(x, *qs[state["i"]])

                ms = bench(call)
                rows.append(
                    {
                        **base,
                        "shape": name,
                        "n": n,
                        "k": k,
                        "kernel": kname,
                        "scheme": scheme,
                        "us": ms * 1e3,
                        "tb_s": n * k / (ms * 1e-3) / 1e12,
                        "max_rel_err": err,
                    }
                )
        for r in rows[-3:]:
            r["x_copy"] = r["tb_s"] * 1e12 / copy
            print(
                f"{name:13s} {r['kernel']:14s} {r.get('scheme', 'bf16'):8s} {r['us']:8.1f} us "
                f"{r['tb_s']:5.2f} TB/s {r['x_copy']:.2f} x copy"
            )
    out = os.path.join(os.environ.get("OUT", "."), f"quant-gemv-{dt.date.today().isoformat()}.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
