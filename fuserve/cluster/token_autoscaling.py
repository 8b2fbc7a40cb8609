"""Autoscaling on what the engines report, not on what Serve counts.

Serve's default policy scales on ongoing requests per replica. For an LLM a request is a poor unit: one
asks for 10 tokens, another for 8,000, and a replica's TTFT grows with the prefill and decode work
ahead of a new request, whatever the count. Each Engine replica reports its outstanding tokens (prompt
tokens still to prefill plus output tokens still to decode, the figure the length-aware router
balances) through `record_autoscaling_stats`; `OutstandingTokensPolicy` asks for enough replicas that
each holds about `target_outstanding_tokens`:

    desired = ceil(sum over replicas of outstanding tokens / target_outstanding_tokens)

`EngineRequestsPolicy` is Serve's rule on requests (`target_ongoing_requests`), counted by the engines.
A replica with `serve.frontend_processes` > 1 serves most requests in processes Serve does not know
(router/frontend_processes.py): Serve's own count sees none of them, so its policy would never add a
replica however loaded; the engine core counts every process's requests.

Serve wraps a policy with the deployment's bounds, scaling factors and up/down-scale delays, and
averages each replica's reports over `look_back_period_s`. Serve pickles this module by value for
its controller, so it imports nothing beyond the standard library.

Ray 2.60 starts a replica's report pusher only when the replica starts with autoscaling on: replicas
that were running when a config switched a fixed count to autoscaling never report. While any
running replica has not reported, a policy falls back to Serve's own estimate on requests
(`target_ongoing_requests`), which every replica's handle counts.
"""

from __future__ import annotations

import math
from typing import Any

OUTSTANDING_TOKENS = "outstanding_tokens"  # the keys EngineIngress.record_autoscaling_stats reports
ENGINE_REQUESTS = "engine_requests"


def _desired(ctx: Any, metric: str, target: float) -> tuple[int, dict[str, Any]]:
    """`ctx`: Serve's AutoscalingContext. Enough replicas that each reports about `target` of `metric`."""
    per_replica = (ctx.aggregated_metrics or {}).get(metric) or {}
    if set(ctx.running_replicas) <= set(per_replica):
        desired = math.ceil(sum(per_replica[r] for r in ctx.running_replicas) / target)
    elif ctx.config is not None:  # some replica does not report (yet): count requests
        desired = math.ceil(ctx.total_num_requests / ctx.config.target_ongoing_requests)
    else:
        desired = ctx.target_num_replicas
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return max(lo, min(hi, desired)), ctx.policy_state


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


class OutstandingTokensPolicy:
    def __init__(self, target_outstanding_tokens: float) -> None:
        self.target = _positive("target_outstanding_tokens", target_outstanding_tokens)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return _desired(ctx, OUTSTANDING_TOKENS, self.target)


class EngineRequestsPolicy:
    def __init__(self, target_ongoing_requests: float) -> None:
        self.target = _positive("target_ongoing_requests", target_ongoing_requests)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return _desired(ctx, ENGINE_REQUESTS, self.target)
