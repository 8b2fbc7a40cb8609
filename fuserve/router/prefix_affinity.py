"""Ray Serve LLM's prefix-cache-affinity policy, on fuserve's prefix keys: a baseline to compare with.

Ray Serve LLM's `PrefixCacheAffinityRouter` (ray/llm/_internal/serve/routing_policies/prefix_aware,
read in ray 2.60, default settings) keeps a prefix tree of the prompt text each replica was sent and:
  1. when the replicas' queue lengths differ by no more than `imbalanced_threshold` (default: any
     difference): takes the replicas whose tree matches the largest share of the prompt, if that share
     is >= `match_rate_threshold` (0.1); else the replicas holding the least text ("smallest tenants");
  2. otherwise (imbalanced): power of two choices over all replicas;
  3. of the chosen, two at random, the one with the shorter queue.
Here prompt text is replaced by prefix keys (routing_policy.prefix_keys), and each replica's "tree" is
the keys this router sent it; `serve.router: prefix_affinity` serves with it, and the simulator
(benchmarks/route_sim.py) replays it. Pure Python.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

from fuserve.router.routing_policy import cached_blocks

MATCH_RATE_THRESHOLD = 0.1


@dataclass
class AffinityCandidate:
    replica_id: str
    queue_len: int  # requests running or waiting there
    known_prefixes: Container[int] = field(default_factory=frozenset)
    tenant_tokens: int = 0  # prompt tokens this router has sent it (the size of its tree)


def rank_by_prefix_affinity(
    candidates: Sequence[AffinityCandidate],
    keys: Sequence[int],
    prompt_tokens: int,
    block_size: int,
    rng: random.Random,
    imbalanced_threshold: float = float("inf"),
    match_rate_threshold: float = MATCH_RATE_THRESHOLD,
) -> list[str]:
    """Replica ids, the choice first, then the rest by queue length (fallbacks when it is full)."""
    if not candidates:
        return []
    queues = [c.queue_len for c in candidates]
    pool = list(candidates)
    if max(queues) - min(queues) <= imbalanced_threshold:
        rate = {
            c.replica_id: cached_blocks(keys, c.known_prefixes) * block_size / max(prompt_tokens, 1)
            for c in candidates
        }
        best = max(rate.values())
        if best >= match_rate_threshold:
            pool = [c for c in candidates if rate[c.replica_id] == best]
        else:
            least = min(c.tenant_tokens for c in candidates)
            pool = [c for c in candidates if c.tenant_tokens == least]
    pair = rng.sample(pool, 2) if len(pool) > 1 else pool
    first = min(pair, key=lambda c: c.queue_len)
    rest = sorted((c for c in candidates if c is not first), key=lambda c: (c.queue_len, c.replica_id))
    return [first.replica_id] + [c.replica_id for c in rest]
