"""The draft channel's cost per engine step, and a draft round's cost where the draft can sit.

1. `channel`: round trip of one DraftRound/DraftReply (DraftProposer -> DraftServer in another
   process -> back) with an empty draft (it answers k zeros at once), over the Unix socket (`unix`,
   the default on one machine), ZMQ ipc and tcp, for batches of 1/8/32/64 sequences (each round: one
   new token per sequence, k = 4); back to back and with `--gaps-ms` of idle between rounds (a verify
   step's: both ends' cores may sleep), with the server spinning 0 and 50 ms (speculative.
   channel_spin_ms), and the client too (an engine core's does not). Target on the GPU machine: p50
   <= 0.5 ms at every batch.
2. `draft_round`: a whole round with a real draft (Llama-3.2-1B shape, random bf16 weights,
   load_format dummy) through the channel: the new tokens' forward plus k - 1 decode steps (CUDA
   graphs), batch 1/8/32/64, context 512, two drafts accepted per round. Placements: the draft alone
   on GPU 0; on GPU 0 while this process keeps GPU 0 busy with a bandwidth-bound GEMV loop standing
   for the target's decode (`colocated`); on GPU 1 with the same load on GPU 0 (`second_gpu`, when
   there are two GPUs).

    python benchmarks/bench_spec_channel.py --out $OUT/spec_channel.json     # GPU machine
    python benchmarks/bench_spec_channel.py --smoke --out /tmp/spec.json     # tiny, CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_decode import LLAMA3_8B, commit, device_name  # noqa: E402
from bench_decode import TINY as DECODE_TINY  # noqa: E402

from fuserve.configs import config_from_dict  # noqa: E402
from fuserve.speculative.draft_client import DraftProposer  # noqa: E402
from fuserve.speculative.draft_server import DraftServer, start_draft_server  # noqa: E402
from fuserve.speculative.proposer import Proposer, ProposeRequest  # noqa: E402

K = 4
BATCHES = (1, 8, 32, 64)
# Llama-3.2-1B: Llama-3-8B's vocab, heads and RoPE at a quarter of the width and half the depth, tied
LLAMA32_1B: dict[str, Any] = dict(
    LLAMA3_8B,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
TINY = dict(DECODE_TINY, max_position_embeddings=4096, tie_word_embeddings=True)


class EmptyDraft:
    """Drafts k zeros at once: what is left is the channel."""

    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]:
        return [[0] * r.k for r in requests]

    def release(self, seq_ids: list[str]) -> None:
        pass


def serve_empty(conn: Any, spin_s: float) -> None:
    import tempfile

    server = DraftServer(EmptyDraft(), "127.0.0.1", tempfile.mkdtemp(prefix="fuserve-bench-"), spin_s)
    conn.send(server.address)
    server.serve(lambda: True)


def percentiles(times_ms: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(times_ms, n=100)
    return {"ms_p50": statistics.median(times_ms), "ms_p90": qs[89], "ms_p99": qs[98]}


def time_rounds(
    proposer: Proposer,
    batch: int,
    rounds: int,
    context: list[list[int]],
    accept: int,
    k: int = K,
    gap_s: float = 0.0,
) -> list[float]:
    """Rounds as the engine sends them, ms each, `gap_s` of sleep before each (the verify step's
    idle); each keeps `accept` drafts and adds one token. The prompts go first, untimed, in a round
    with k = 1: a draft prefills only for sequences that draft, so with k = 0 the first timed round
    carried the whole prefill."""
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, s in enumerate(ids):
        proposer.propose([ProposeRequest(s, 0, context[i], 1)])
    lens = [len(c) for c in context]
    new = [[7] for _ in ids]
    times = []
    for _ in range(rounds):
        reqs = [ProposeRequest(s, lens[i], new[i], k) for i, s in enumerate(ids)]
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        drafts = proposer.propose(reqs)
        times.append(1e3 * (time.perf_counter() - t0))
        for i, d in enumerate(drafts):
            assert d is not None, "the draft dropped a sequence it was sent"
            lens[i] += len(new[i])
            new[i] = d[:accept] + [7]
    proposer.release(ids)
    return times


def bench_channel(rounds: int, gaps_ms: list[float], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows per spin (the server's; the client's too where `client_spin`), transport, gap and batch; a
    row with a gap runs at most 400 rounds."""
    rows = []
    for spin_s, client_spin in ((0.0, False), (0.05, False), (0.05, True)):
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=serve_empty, args=(theirs, spin_s), daemon=True)
        proc.start()
        address = ours.recv()
        try:
            for transport in ("auto", "ipc", "tcp"):
                name = "unix" if transport == "auto" else transport
                proposer = DraftProposer(
                    lambda a=address: a, timeout_s=5.0, transport=transport, spin=client_spin
                )
                proposer.wait_connected(10)
                for gap_ms in gaps_ms:
                    n = rounds if gap_ms == 0 else min(rounds, 400)
                    for batch in BATCHES:
                        times = time_rounds(proposer, batch, n, [[1, 2, 3]] * batch, 0, gap_s=gap_ms / 1e3)
                        rows.append({**base, "bench": "spec_channel", "engine": "fuserve", "transport": name,
                                     "spin_ms": 1e3 * spin_s, "client_spin": client_spin, "gap_ms": gap_ms,
                                     "batch": batch, "k": K, "rounds": n, **percentiles(times)})  # fmt: skip
                        both = " both" if client_spin else ""
                        print(f"channel {name:4s} spin {1e3 * spin_s:2.0f} ms{both} "
                              f"gap {gap_ms:g} ms batch {batch:3d}: p50 {rows[-1]['ms_p50']:.3f} ms, "
                              f"p99 {rows[-1]['ms_p99']:.3f} ms")  # fmt: skip
                proposer.close()
        finally:
            proc.kill()
    return rows


def gemv_load(stop: threading.Event, device: str) -> None:
    """Keeps `device` busy the way a target's decode does: bandwidth-bound GEMVs over ~1 GiB."""
    import torch

    weights = [torch.randn(14336, 4096, dtype=torch.bfloat16, device=device) for _ in range(9)]
    x = torch.randn(4096, 1, dtype=torch.bfloat16, device=device)
    while not stop.is_set():
        for w in weights:
            w @ x
        torch.cuda.synchronize(device)


def bench_draft(
    placements: list[str], smoke: bool, rounds: int, base: dict[str, Any]
) -> list[dict[str, Any]]:
    rows = []
    context_len = 32 if smoke else 512
    batches = (1, 8) if smoke else BATCHES
    blocks = -(-(context_len + rounds * (K + 1) + 2 * K) // 16) * max(batches)
    for placement in placements:
        gpu = {"gpu0": "0", "colocated": "0", "second_gpu": "1"}.get(placement)
        config = config_from_dict(
            {
                "cache": {"num_blocks": blocks},
                "scheduler": {"max_num_seqs": max(batches)},
                "speculative": {
                    "method": "draft",
                    "draft": {"load_format": "dummy", "hf_config": TINY if smoke else LLAMA32_1B,
                              "max_model_len": 4096, "dtype": "float32" if smoke else "bfloat16"},
                    "placement": {"device": "cpu" if gpu is None else "cuda", "gpu_memory_utilization": 0.3},
                },
            }
        )  # fmt: skip
        old = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # the spawned draft server sees one GPU
        try:
            server = start_draft_server(config, "127.0.0.1", timeout_s=600)
        finally:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
        stop = threading.Event()
        load = None
        if placement in ("colocated", "second_gpu"):
            load = threading.Thread(target=gemv_load, args=(stop, "cuda:0"), daemon=True)
            load.start()
        proposer = DraftProposer(lambda s=server: s.address, timeout_s=30.0)
        proposer.wait_connected(10)
        try:
            for batch in batches:
                context = [[(i * 31 + j) % 500 for j in range(context_len)] for i in range(batch)]
                time_rounds(proposer, batch, 3, context, accept=2)  # warm-up: Triton compiles
                times = time_rounds(proposer, batch, rounds, context, accept=2)
                p = percentiles(times)
                model = "tiny" if smoke else "llama3.2-1b-shape"
                rows.append({**base, "bench": "spec_draft_round", "engine": "fuserve", "model": model,
                             "placement": placement, "batch": batch, "k": K, "context_len": context_len,
                             "rounds": rounds, **p, "ms_per_draft_token": p["ms_p50"] / K})  # fmt: skip
                print(f"draft {placement:10s} batch {batch:3d}: p50 {p['ms_p50']:.3f} ms/round")
        finally:
            stop.set()
            proposer.close()
            server.stop()
            if load is not None:
                load.join(10)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny draft, CPU, few rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--gaps-ms", default="0,5", help="idle between the channel's rounds, comma-separated")
    ap.add_argument("--channel-only", action="store_true", help="skip the rounds with a real draft")
    ap.add_argument("--out", type=Path, default=None, help="JSON rows (default: stdout only)")
    args = ap.parse_args()
    import torch

    rounds = args.rounds or (30 if args.smoke else 300)
    base = {"device": device_name(), "date": dt.date.today().isoformat(), "commit": commit()}
    gaps_ms = [float(g) for g in args.gaps_ms.split(",")]
    rows = bench_channel(rounds if args.smoke else 2000, gaps_ms, base)
    gpus = 0 if args.channel_only else torch.cuda.device_count()
    placements = (
        ["cpu"] if args.smoke or gpus == 0 else ["gpu0", "colocated"] + (["second_gpu"] if gpus > 1 else [])
    )
    if not args.channel_only:
        rows += bench_draft(placements, args.smoke, rounds, base)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
