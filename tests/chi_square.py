"""Pearson's chi-square goodness-of-fit, without scipy: the statistic and its critical value.

The critical value uses the Wilson-Hilferty cube-root normal approximation, within ~1% of the exact
quantile for the degrees of freedom these tests use (>= 3), far inside the margins they test at.
"""

from __future__ import annotations

from statistics import NormalDist


def chi_square(
    observed: list[int], expected_probs: list[float], min_expected: float = 5.0
) -> tuple[float, int]:
    """(statistic, degrees of freedom); cells expected below `min_expected` are pooled into one."""
    n = sum(observed)
    cells: list[tuple[float, float]] = []
    pooled_obs, pooled_exp = 0.0, 0.0
    for o, p in zip(observed, expected_probs, strict=True):
        if n * p < min_expected:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + n * p
        else:
            cells.append((o, n * p))
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    elif pooled_obs > 0:
        return float("inf"), max(len(cells) - 1, 1)  # draws where the target puts no mass
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return stat, len(cells) - 1


def critical_value(df: int, significance: float) -> float:
    """The chi-square quantile at 1 - significance."""
    z = NormalDist().inv_cdf(1.0 - significance)
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * h**0.5) ** 3
