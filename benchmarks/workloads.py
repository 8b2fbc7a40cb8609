"""Seeded serving workloads: the same requests for every router, on the GPU and in the simulator.

Prompts are token ids of exact lengths and outputs ignore EOS, so every run does the same work.

    mix         today's mix (`make_workload`): 60% short chat turns sharing a 32-token system prompt,
                20% long documents, 20% long generations
    multi_turn  chat conversations that grow: each turn's prompt is the last turn's prompt, its answer
                and a new user message, over a 256-token system prompt every conversation shares;
                turns of one conversation come `think_s` apart (prefix reuse is the point)
    heavy_tail  prompt lengths log-normal (median 192 tokens), plus 1% documents at 8k tokens
                (length-blind routing puts them where they stall everyone else's first token)
    generation  the mix's long generations only (24-64 prompt tokens, 128-192 out): a burst of them is
                bound by capacity (batch slots), not by its longest request, so it shows what a second
                replica adds (issue 15's 400-request burst; not one of the routers' WORKLOADS)

`scale` multiplies every length (CPU runs use 0.25-0.5); `rate` is requests/s of Poisson (or fixed)
arrivals, inf sends everything at t=0.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import partial

KINDS = {  # kind: (share of requests, prompt tokens range, output tokens range)
    "chat": (0.6, (24, 80), (16, 48)),
    "document": (0.2, (400, 800), (16, 32)),
    "generation": (0.2, (24, 64), (128, 192)),
}
SYSTEM_PROMPT_TOKENS = 32  # chat requests start with this shared prefix, as a chat template's system prompt
WORKLOADS = ("mix", "multi_turn", "heavy_tail")


@dataclass
class RequestSpec:
    kind: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float  # offset from the start of the run (open loop; closed-loop clients ignore it)


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    lo = min(100, vocab - 1)
    return [rng.randrange(lo, vocab - 1) for _ in range(n)]


def _gap(rng: random.Random, rate: float, arrival: str) -> float:
    if not math.isfinite(rate):
        return 0.0
    return rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate


def make_workload(
    vocab: int,
    num: int,
    rate: float,
    arrival: str,
    seed: int,
    max_model_len: int,
    scale: float,
    kinds: tuple[str, ...] = tuple(KINDS),
) -> list[RequestSpec]:
    """The mix. `scale` shrinks every length (for slow devices); `rate` inf sends everything at t=0."""
    rng = random.Random(seed)
    lo_id, hi_id = min(100, vocab - 1), vocab - 1
    system = [rng.randrange(lo_id, hi_id) for _ in range(SYSTEM_PROMPT_TOKENS)]
    weights = [KINDS[k][0] for k in kinds]
    specs, t = [], 0.0
    for _ in range(num):
        kind = rng.choices(kinds, weights)[0]
        _, (p_lo, p_hi), (o_lo, o_hi) = KINDS[kind]
        n_prompt = max(4, int(rng.randint(p_lo, p_hi) * scale))
        n_out = max(2, int(rng.randint(o_lo, o_hi) * scale))
        body = [rng.randrange(lo_id, hi_id) for _ in range(n_prompt)]
        prompt = (system + body if kind == "chat" else body)[: max_model_len - n_out - 1]
        specs.append(RequestSpec(kind, prompt, n_out, t))
        t += _gap(rng, rate, arrival)
    return specs


def make_multi_turn(
    vocab: int,
    num: int,
    rate: float,
    arrival: str,
    seed: int,
    max_model_len: int,
    scale: float,
    turns: tuple[int, int] = (3, 8),
    think_s: tuple[float, float] = (2.0, 6.0),
) -> list[RequestSpec]:
    """Conversations start at rate / (mean turns) so that requests arrive at `rate` in all; a burst
    (rate inf) sends every turn at t=0 (each turn still shares its conversation's history)."""
    rng = random.Random(seed)
    system = _ids(rng, vocab, max(8, int(256 * scale)))
    mean_turns = (turns[0] + turns[1]) / 2
    specs: list[RequestSpec] = []
    start = 0.0
    while len(specs) < num:
        history = list(system)
        t = start
        for turn in range(rng.randint(*turns)):
            history += _ids(rng, vocab, max(4, int(rng.randint(40, 200) * scale)))  # the user's message
            n_out = max(2, int(rng.randint(48, 160) * scale))
            if len(history) + n_out + 1 > max_model_len:
                break
            specs.append(RequestSpec("turn" if turn else "first_turn", list(history), n_out, t))
            history += _ids(rng, vocab, n_out)  # the assistant's answer, as the client sends it back
            if math.isfinite(rate):
                t += rng.uniform(*think_s)
        start += _gap(rng, rate / mean_turns, arrival)
    specs.sort(key=lambda s: s.arrival_s)
    return specs[:num]


def make_heavy_tail(
    vocab: int,
    num: int,
    rate: float,
    arrival: str,
    seed: int,
    max_model_len: int,
    scale: float,
    long_share: float = 0.01,
    long_tokens: int = 8000,
    system_tokens: int = 0,
) -> list[RequestSpec]:
    """`system_tokens` > 0: every prompt starts with the same system prompt of that many tokens (a
    prefix-affinity router then follows the cache instead of balancing prompt tokens)."""
    rng = random.Random(seed)
    system = _ids(random.Random(seed + 1), vocab, system_tokens)
    specs, t = [], 0.0
    for _ in range(num):
        n_out = max(2, int(rng.randint(32, 160) * scale))
        if rng.random() < long_share:
            kind, n_prompt = "long", int(long_tokens * scale)
        else:
            kind, n_prompt = "lognormal", int(min(rng.lognormvariate(math.log(192), 1.0), 4000) * scale)
        n_prompt = max(4, min(n_prompt, max_model_len - n_out - 1 - system_tokens))
        specs.append(RequestSpec(kind, system + _ids(rng, vocab, n_prompt), n_out, t))
        t += _gap(rng, rate, arrival)
    return specs


def make_named(
    name: str,
    vocab: int,
    num: int,
    rate: float,
    arrival: str,
    seed: int,
    max_model_len: int,
    scale: float,
    **shape: object,
) -> list[RequestSpec]:
    """`shape`: the maker's own keywords (multi_turn's think_s, heavy_tail's long_share, ...)."""
    makers = {
        "mix": make_workload,
        "multi_turn": make_multi_turn,
        "heavy_tail": make_heavy_tail,
        "generation": partial(make_workload, kinds=("generation",)),
    }
    if name not in makers:
        raise ValueError(f"unknown workload {name!r}: choose from {', '.join(makers)}")
    return makers[name](vocab, num, rate, arrival, seed, max_model_len, scale, **shape)  # type: ignore[operator]
