"""Error-compensated rounding (GPTQ) onto the per-row 8-bit grids of models/quant_scheme.py.

Round-to-nearest minimizes each weight's own error; what the model feels is the layer's output error
||X W^T - X Q^T|| over real inputs X. GPTQ (Frantar et al., 2022) quantizes the input columns one at a
time and pushes each column's rounding error onto the columns not yet quantized, weighted through the
inverse of the inputs' second moment H = X^T X / n, so correlated inputs cancel much of it. Rows stay
independent, so quantizing a fused weight (QKV, gate/up) equals quantizing its pieces, and the output
is exactly what `quantize_rows` makes: 8-bit codes and one fp32 scale per row (the kernels do not
change). It works on any grid: int8's uniform steps and e4m3's 3-bit-mantissa steps alike.

Deterministic: float64 on the CPU, fixed column order (descending H diagonal, "act order"), no
randomness, so `fuserve build --calibrate gptq` writes the same bytes twice.
"""

from __future__ import annotations

import torch

from fuserve.workers.models.quant_scheme import FP8_MAX, INT8_MAX, QuantScheme

DAMP = 0.01  # fraction of the mean H diagonal added to it: keeps the inverse stable on few tokens
BLOCK = 128  # columns updated together (lazy batch updates; the result does not depend on it)


def _codes(scaled: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Values already divided by their row scale -> the nearest grid values (still float64)."""
    if scheme.weight_dtype == torch.int8:
        return scaled.round().clamp(-INT8_MAX, INT8_MAX)
    return scaled.clamp(-FP8_MAX, FP8_MAX).float().to(torch.float8_e4m3fn).double()


def row_scales(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """One fp32 scale per row: the row's amax onto the format's largest value, as `quantize_rows`."""
    amax = w.float().abs().amax(dim=1)
    return torch.where(amax > 0, amax / scheme.qmax, torch.ones_like(amax))


def gptq_quantize_rows(
    w: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp: float = DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float, hessian [K, K] (X^T X / n of the layer's inputs) -> (q [N, K] in
    scheme.weight_dtype, scale [N] fp32), minimizing the output error on inputs like X."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian is {tuple(hessian.shape)}, the weight has {k} input columns")
    scale = row_scales(w, scheme)
    s = scale.double()[:, None]
    wd = w.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: nothing to compensate through them
    h[dead, dead] = 1.0
    wd[:, dead] = 0.0  # their columns are rounded below like the rest; zero keeps them out of the update
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    wd, h = wd[:, order], h[order][:, order]
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.diagonal(h).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(wd)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = wd[:, start:end].clone()
        errs = torch.empty_like(block)
        ub = u[start:end, start:end]
        for j in range(end - start):
            col = block[:, j]
            c = _codes(col[:, None] / s, scheme)[:, 0]
            codes[:, start + j] = c
            err = (col - c * s[:, 0]) / ub[j, j]
            block[:, j:] -= err[:, None] * ub[j, j:][None, :]
            errs[:, j] = err
        wd[:, end:] -= errs @ u[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    w_orig_dead = dead.nonzero().flatten()
    if len(w_orig_dead):  # round the never-seen columns to nearest, as quantize_rows would
        codes[:, w_orig_dead] = _codes(w.double()[:, w_orig_dead] / s, scheme)
    return codes.to(scheme.weight_dtype), scale


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    """||X W^T - X (q * scale)^T|| / ||X W^T||: the relative output error of a quantized weight."""
    ref = x.double() @ w.double().T
    got = x.double() @ (q.double() * scale.double()[:, None]).T
    return float(torch.linalg.norm(ref - got) / torch.linalg.norm(ref))
