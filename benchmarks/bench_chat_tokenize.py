"""The routing hint's cost on multi-turn chat bodies, with chat prompts tokenized piece by piece
(fuserve/workers/chat_segments.py) against whole texts, on this machine's CPU.

Conversations of the default model's chat template grow turn by turn (each turn sends the whole
history, as OpenAI clients do); the HAProxy router's `HintBuilder` (the replica's frontend tokenizes the
same way) answers every turn of every conversation in arrival order, interleaved across conversations.

    python benchmarks/bench_chat_tokenize.py --out benchmarks/results/chat-tokenize-DATE-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

WORDS = (
    "the router reads each request body and decides which replica serves it while the engine keeps "
    "its cache warm for the next turn of the same conversation with code like x = f(y) + 2026"
).split()


def bodies(conversations: int, turns: int, seed: int) -> list[tuple[int, bytes, int]]:
    """(turn, body, conversation) for every turn, conversations interleaved turn by turn."""
    rng = random.Random(seed)
    histories = [
        [{"role": "system", "content": "You are a helpful assistant."}] for _ in range(conversations)
    ]
    out = []
    for turn in range(turns):
        for c, msgs in enumerate(histories):
            msgs.append(
                {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 200)))}
            )
            out.append((turn, json.dumps({"model": "m", "messages": msgs, "max_tokens": 64}).encode(), c))
            msgs.append(
                {
                    "role": "assistant",
                    "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(48, 160))),
                }
            )
    return out


def run(piecewise: bool, items: list[tuple[int, bytes, int]]) -> list[dict[str, Any]]:
    from fuserve.cluster.ingress_routing import HintBuilder
    from fuserve.configs import FuserveConfig

    hints = HintBuilder(FuserveConfig())  # the default model's tokenizer and template
    assert hints.tokenizer is not None
    if not piecewise:
        hints.tokenizer.segments = None
    elif hints.tokenizer.segments is None:
        raise SystemExit("the default model's tokenizer does not take the piecewise path")
    rows = []
    for turn, body, _ in items:
        t0 = time.perf_counter()
        hint = hints(body)
        rows.append(
            dict(turn=turn, ms=1e3 * (time.perf_counter() - t0), tokens=hint.prompt_tokens if hint else 0)
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    items = bodies(args.conversations, args.turns, args.seed)
    results = []
    for piecewise in (False, True):
        rows = run(piecewise, items)
        by_turn = {}
        for turn in range(args.turns):
            sel = [r for r in rows if r["turn"] == turn]
            by_turn[turn] = dict(
                ms_p50=statistics.median(r["ms"] for r in sel),
                tokens_p50=statistics.median(r["tokens"] for r in sel),
            )
        total_ms = sum(r["ms"] for r in rows)
        total_tokens = sum(r["tokens"] for r in rows)
        results.append(
            dict(
                bench="chat_tokenize",
                piecewise=piecewise,
                requests=len(rows),
                ms_total=total_ms,
                us_per_prompt_token=1e3 * total_ms / total_tokens,
                ms_p99=sorted(r["ms"] for r in rows)[int(0.99 * (len(rows) - 1))],
                by_turn=by_turn,
            )
        )
        print(
            f"piecewise={piecewise}: {len(rows)} hints, {total_ms:.0f} ms in all, "
            f"{results[-1]['us_per_prompt_token']:.2f} us a prompt token; turn: ms p50 (tokens) "
            + ", ".join(f"{t}: {v['ms_p50']:.2f} ({v['tokens_p50']:.0f})" for t, v in by_turn.items())
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = dict(
        device=f"cpu ({platform.processor() or platform.machine()})",
        date=datetime.date.today().isoformat(),
        commit=commit,
    )
    out = Path(args.out or f"benchmarks/results/chat-tokenize-{meta['date']}-cpu.json")
    out.write_text(json.dumps([dict(r, **meta) for r in results], indent=1))
    print(
        f"speed-up of the piecewise path: {results[0]['ms_total'] / results[1]['ms_total']:.1f}x; wrote {out}"
    )


if __name__ == "__main__":
    main()
