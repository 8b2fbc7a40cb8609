"""Which engine replica should take a request: least outstanding work, counting its cache hits.

Pure Python on plain data, so the policy is unit-tested without Ray (tests/test_router.py); the
Ray Serve adapter (`length_aware_router.py`) only gathers the inputs and applies the ranking.

    prefix_keys(prompt ids)  -> chained hashes of the leading full KV blocks (every block's up to
                                16, then sparser: KEY_BLOCKS)
    rank_replicas(candidates, keys, tie, block_size) -> replica ids, best first:
        1. cost(replica) = its outstanding tokens (prefill still to do + tokens still to decode)
           minus the prompt tokens this request would find in its prefix cache there
        2. near-tied with the cheapest = within max(tie.tokens, tie.fraction * that cost)
        3. among near-ties: the longest cached prefix, then a rendezvous hash of the request's
           prefix (so a new prefix lands on a stable replica), then the lower cost
        4. the rest follow by cost, as fallbacks when the preferred replica's queue is full

A cached prefix is worth exactly the prefill it saves, so affinity can never pile requests onto
one replica beyond that: a chat's shared 32-token system prompt buys 32 tokens of imbalance, a
long shared document buys more. Hashes cover whole blocks because the engine's prefix cache reuses
KV only in full blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TieBreak:
    """How close two loads must be for prefix affinity to decide between them."""

    tokens: int = 64
    fraction: float = 0.05

    def margin(self, least_load: int) -> float:
        return max(self.tokens, self.fraction * least_load)


@dataclass
class RoutingHint:
    """A request's cost and prompt prefix, for a caller that routes without sending an `EngineRequest`.

    Behind Serve's HAProxy ingress the engine replica itself parses the body, so nothing reaches the
    length-aware router but this hint: the HAProxy-side router (`cluster/ingress_routing.py`)
    tokenizes the body, builds one, and passes it to `DeploymentHandle.choose_replica`. Plain data
    and stdlib only, so it costs nothing to import wherever the router runs.
    """

    work_tokens: int  # sum over sequences of (prompt + max output tokens): the request's cost
    prefix_keys: list[int] = field(default_factory=list)  # prefix_keys() of the (first) prompt
    block_size: int = 16  # tokens per prefix key (the engine's KV block size)
    prompt_tokens: int = 0  # of the (first) prompt; 0: unknown (the TTFT model then takes work_tokens)
    max_tokens: int = 0  # output tokens each sequence may generate


@dataclass
class Candidate:
    """One replica as the policy sees it."""

    replica_id: str
    load: int  # outstanding tokens, best estimate
    known_prefixes: Container[int] = field(default_factory=frozenset)


def _is_key_block(n: int) -> bool:
    """Whether the first `n` full blocks get a key: every block up to 16, every 4th up to 64, then
    every 16th. A long chat history (8k tokens: 512 blocks) costs 56 keys, not 512, and its cached
    length is still known to within 16 blocks."""
    return n <= 16 or (n <= 64 and n % 4 == 0) or n % 16 == 0


KEY_BLOCKS = [n for n in range(1, 4097) if _is_key_block(n)]  # key i covers KEY_BLOCKS[i] blocks


def prefix_keys(token_ids: Sequence[int], block_size: int, max_blocks: int = 512) -> list[int]:
    """Chained hashes of the leading full blocks (like the engine's block hashes); key i identifies
    the first KEY_BLOCKS[i] blocks.

    Python's `hash` of int tuples is the same in every process (no per-process salt for ints),
    so keys computed by any ingress replica agree with the keys the engine replicas report.
    """
    keys: list[int] = []
    h = 0
    for n in range(1, min(len(token_ids) // block_size, max_blocks) + 1):
        start = (n - 1) * block_size
        h = hash((h, *token_ids[start : start + block_size]))
        if _is_key_block(n):
            keys.append(h)
    return keys


def prefix_depth(keys: Sequence[int], known: Container[int]) -> int:
    """How many leading blocks of the request a replica holds (keys are chained: stop at a miss)."""
    depth = 0
    for key in keys:
        if key not in known:
            break
        depth += 1
    return depth


def cached_blocks(keys: Sequence[int], known: Container[int]) -> int:
    """How many leading blocks of the request a replica holds, as far as its keys tell."""
    depth = prefix_depth(keys, known)
    return KEY_BLOCKS[depth - 1] if depth else 0


def _rendezvous(key: int, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{key}:{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rank_replicas(
    candidates: Sequence[Candidate], keys: Sequence[int], tie: TieBreak, block_size: int = 16
) -> list[str]:
    """Replica ids, most preferred first. Empty candidates give an empty list."""
    if not candidates:
        return []
    depth = {c.replica_id: cached_blocks(keys, c.known_prefixes) if keys else 0 for c in candidates}
    cost = {c.replica_id: c.load - depth[c.replica_id] * block_size for c in candidates}
    least = min(cost.values())
    limit = least + tie.margin(max(least, 0))
    near = [c for c in candidates if cost[c.replica_id] <= limit]
    rest = sorted(
        (c for c in candidates if cost[c.replica_id] > limit),
        key=lambda c: (cost[c.replica_id], c.replica_id),
    )
    deepest = keys[-1] if keys else None

    def preference(c: Candidate) -> tuple:
        spread = _rendezvous(deepest, c.replica_id) if deepest is not None else 0
        return (-depth[c.replica_id], -spread, cost[c.replica_id], c.replica_id)

    near.sort(key=preference)
    return [c.replica_id for c in near] + [c.replica_id for c in rest]


class RecentPrefixes:
    """A bounded LRU set of prefix keys: what one replica has recently prefilled."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()

    def add(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def snapshot(self) -> list[int]:
        return list(self._keys)


POPULAR_SENDS = 8  # in this many routed requests, a prefix key is shared (a system prompt), not a history


class PrefixPopularity:
    """How many routed requests carried each prefix key (bounded LRU counts), so that a prefix many
    requests share, such as a system prompt, tells apart from one conversation's history: one miss
    caches the shared one on a replica for all that follow, so it is not worth piling requests onto
    the replica that happens to hold it first (ttft_model: `RequestShape.shared_tokens`)."""

    def __init__(self, capacity: int = 8192, popular: int = POPULAR_SENDS) -> None:
        self.capacity = capacity
        self.popular = popular
        self._counts: OrderedDict[int, int] = OrderedDict()

    def add(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1
            self._counts.move_to_end(key)
        while len(self._counts) > self.capacity:
            self._counts.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return self._counts.get(key, 0) >= self.popular  # type: ignore[call-overload]

    def shared_tokens(self, keys: Sequence[int], block_size: int) -> int:
        """Tokens of the request's leading prefix that is popular (0 if none)."""
        return cached_blocks(keys, self) * block_size
