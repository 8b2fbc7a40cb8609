"""The engine step cost, fitted from its own steps: seconds = base + per_seq * decodes + per_token * prefill.

The router predicts each replica's time to first token from these three figures
(router/ttft_model.py StepCost). They are measured rather than configured because they depend on the
model, the device, tensor parallelism, CUDA graphs and the kernels in use; every step is a sample, so
the fit follows the replica as it warms up or as its load changes shape.

A ridge regression with forgetting: sums of x x^T and x y decay by `forget` per step (the last few
hundred steps count), and a weak prior (one pseudo-step at the default figures per feature) keeps a
coefficient defined before any step has exercised it (a replica that has only decoded still reports
a prefill cost). Features are scaled to O(1) so one prior weight fits all three. Pure Python: a 3x3
solve per `estimate()`, a few multiply-adds per step.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_SCALE = 1000.0  # tokens
DECODE_SCALE = 100.0  # sequences
OUTLIER_FACTOR = 4.0
OUTLIER_SLACK_S = 0.02
REFIT_EVERY = 8  # steps between the refits that the outlier clip predicts with


@dataclass(frozen=True)
class StepCostFit:
    base_s: float
    per_seq_s: float
    per_token_s: float
    num_samples: int


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-18:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, 4):
                    m[r][c] -= f * m[col][c]
    return [m[i][3] / m[i][i] for i in range(3)]


class StepCostMeter:
    def __init__(
        self,
        prior: tuple[float, float, float] = (0.010, 0.0001, 0.0001),
        forget: float = 0.995,
        prior_weight: float = 1.0,
        clip_outliers: bool = False,
        outlier_factor: float = OUTLIER_FACTOR,
        outlier_slack_s: float = OUTLIER_SLACK_S,
        clip_after: int = 0,
    ) -> None:
        """clip_outliers: a sample is cut to outlier_factor x the fit's prediction + outlier_slack_s, once
        `clip_after` samples are in (before them the prior predicts, which may be far off)."""
        self.forget = forget
        # theta in scaled units: seconds per (1, PREFILL_SCALE tokens, DECODE_SCALE sequences)
        self.prior = [prior[0], prior[2] * PREFILL_SCALE, prior[1] * DECODE_SCALE]
        self.prior_weight = prior_weight
        self.xx = [[0.0] * 3 for _ in range(3)]
        self.xy = [0.0] * 3
        self.num_samples = 0
        self.clip_outliers = clip_outliers
        self.outlier_factor = outlier_factor
        self.outlier_slack_s = outlier_slack_s
        self.clip_after = clip_after
        self._theta = list(self.prior)  # the fit the clip predicts with, refitted every REFIT_EVERY steps

    def observe(self, prefill_tokens: int, num_decodes: int, seconds: float) -> None:
        x = (1.0, prefill_tokens / PREFILL_SCALE, num_decodes / DECODE_SCALE)
        if self.clip_outliers and self.num_samples >= self.clip_after:
            predicted = sum(max(t, 0.0) * xi for t, xi in zip(self._theta, x, strict=True))
            seconds = min(seconds, self.outlier_factor * predicted + self.outlier_slack_s)
        f = self.forget
        for i in range(3):
            self.xy[i] = f * self.xy[i] + x[i] * seconds
            row = self.xx[i]
            for j in range(3):
                row[j] = f * row[j] + x[i] * x[j]
        self.num_samples += 1
        if self.clip_outliers and self.num_samples % REFIT_EVERY == 0:
            self._theta = self._solve()

    def _solve(self) -> list[float]:
        w = self.prior_weight
        a = [[self.xx[i][j] + (w if i == j else 0.0) for j in range(3)] for i in range(3)]
        b = [self.xy[i] + w * self.prior[i] for i in range(3)]
        return _solve3(a, b) or self.prior

    def estimate(self) -> StepCostFit:
        base, token, seq = (max(t, 0.0) for t in self._solve())
        return StepCostFit(base, seq / DECODE_SCALE, token / PREFILL_SCALE, self.num_samples)
