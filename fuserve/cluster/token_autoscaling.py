"""Autoscaling on the work queued in the engines, not on the number of requests.

Serve's default policy scales on ongoing requests per replica. For an LLM a request is a poor unit: one
asks for 10 tokens, another for 8,000, and a replica's TTFT grows with the prefill and decode work
ahead of a new request, whatever the count. Each Engine replica reports its outstanding tokens (prompt
tokens still to prefill plus output tokens still to decode, the figure the length-aware router
balances) through `record_autoscaling_stats`; this policy asks for enough replicas that each holds
about `target_outstanding_tokens`:

    desired = ceil(sum over replicas of outstanding tokens / target_outstanding_tokens)

Serve wraps the policy with the deployment's bounds, scaling factors and up/down-scale delays, and
averages each replica's reports over `look_back_period_s`. Serve pickles this module by value for
its controller, so it imports nothing beyond the standard library.

Ray 2.60 starts a replica's report pusher only when the replica starts with autoscaling on: replicas
that were running when a config switched a fixed count to autoscaling never report. While any
running replica has not reported, the policy falls back to Serve's own estimate on requests
(`target_ongoing_requests`), which every replica's handle counts.
"""

from __future__ import annotations

import math
from typing import Any

METRIC = "outstanding_tokens"  # the key EngineIngress.record_autoscaling_stats reports


class OutstandingTokensPolicy:
    def __init__(self, target_outstanding_tokens: float) -> None:
        if target_outstanding_tokens <= 0:
            raise ValueError(f"target_outstanding_tokens must be > 0, got {target_outstanding_tokens}")
        self.target = float(target_outstanding_tokens)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """`ctx`: Serve's AutoscalingContext."""
        per_replica = (ctx.aggregated_metrics or {}).get(METRIC) or {}
        if set(ctx.running_replicas) <= set(per_replica):
            desired = math.ceil(sum(per_replica[r] for r in ctx.running_replicas) / self.target)
        elif ctx.config is not None:  # some replica does not report (yet): count requests
            desired = math.ceil(ctx.total_num_requests / ctx.config.target_ongoing_requests)
        else:
            desired = ctx.target_num_replicas
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return max(lo, min(hi, desired)), ctx.policy_state
