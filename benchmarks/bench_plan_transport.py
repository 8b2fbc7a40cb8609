"""Step-plan transports between two processes of one machine: gloo broadcasts vs the shared-memory ring.

What a decode step pays (fuserve/parallel/plan_broadcast.py): rank 0's time inside `send` (on its
critical path, before it queues its own forward), and the delivery latency, from the start of `send` to
the worker holding the decoded StepPlan. Rank 0 sends one plan every `--gap-ms` (a decode step's
length), so the worker is already waiting, as in serving. The ring is measured with the worker's busy
spin (the GPU setting) and with sleep polls only (an idle worker, and the CPU setting's regime).
No GPU needed: plans are host data. time.perf_counter is CLOCK_MONOTONIC, one clock for both processes.

    python benchmarks/bench_plan_transport.py [--reps 400] [--gap-ms 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp
from bench_decode import commit

from fuserve.parallel.plan_broadcast import PlanReceiver, PlanSender, RingPlanReceiver, RingPlanSender
from fuserve.parallel.plan_ring import PlanRing
from fuserve.workers.step_plan import StepPlan

BLOCK_SIZE = 16


def decode_plan(batch: int, context: int, keys: bool = True) -> StepPlan:
    """With `keys` the tables cross as diffs (plan_diff.py): after the first plan one word a sequence."""
    blocks = -(-context // BLOCK_SIZE)
    return StepPlan(
        input_ids=[7] * batch,
        positions=[context - 1] * batch,
        slot_mapping=list(range(batch)),
        query_start_loc=list(range(batch + 1)),
        context_lens=[context] * batch,
        block_tables=[list(range(b * blocks, (b + 1) * blocks)) for b in range(batch)],
        sample_rows=list(range(batch)),
        seq_keys=list(range(batch)) if keys else [],
        argmax_only=True,
    )


def cases() -> list[tuple[str, StepPlan]]:
    return [
        ("decode b1 ctx256", decode_plan(1, 256)),
        ("decode b8 ctx1024", decode_plan(8, 1024)),
        ("decode b64 ctx1024", decode_plan(64, 1024)),
        ("decode b64 ctx1024 whole tables", decode_plan(64, 1024, keys=False)),
        ("decode b64 ctx4096", decode_plan(64, 4096)),
        ("decode b64 ctx4096 whole tables", decode_plan(64, 4096, keys=False)),
    ]


def _worker(rank: int, port: int, spin_s: float, reps: int, gap_s: float, queue: Any) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=dt.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    rows: list[dict[str, Any]] = []
    if rank == 0:
        gloo = PlanSender(dist.group.WORLD, 60.0, lambda err: None)
        ring = RingPlanSender(PlanRing.create(num_readers=1), timeout_s=60.0)
        store.set("ring", str(ring.ring.path))
    else:
        gloo_rx = PlanReceiver(dist.group.WORLD)
        ring_rx = RingPlanReceiver(PlanRing.attach(store.get("ring").decode(), reader=0), spin_s)
    for name, plan in cases():
        for transport in ("gloo", "shm"):
            dist.barrier()
            if rank == 0:
                sender = gloo if transport == "gloo" else ring
                starts, sends = [], []
                for _ in range(reps):
                    time.sleep(gap_s)
                    t0 = time.perf_counter()
                    sender.send(plan)
                    sends.append(time.perf_counter() - t0)
                    starts.append(t0)
                got = [None]
                dist.broadcast_object_list(got, src=1)
                delivered = [t1 - t0 for t0, t1 in zip(starts, got[0], strict=True)]
                rows.append(
                    dict(
                        plan=name,
                        transport=transport,
                        words=16 + sum(len(v) if isinstance(v, list) else 1 for v in vars(plan).values()),
                        send_us=1e6 * statistics.median(sends),
                        delivered_us=1e6 * statistics.median(delivered),
                        delivered_p90_us=1e6 * statistics.quantiles(delivered, n=10)[-1],
                    )
                )
            else:
                receiver = gloo_rx if transport == "gloo" else ring_rx
                done = []
                for _ in range(reps):
                    got_plan = receiver.recv()
                    done.append(time.perf_counter())
                    assert got_plan == plan
                dist.broadcast_object_list([done], src=1)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        ring.close(send_shutdown=False)
        queue.put(rows)


def measure(spin_s: float, reps: int, gap_s: float) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, spin_s, reps, gap_s, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    for row in rows:
        row["worker_spin_s"] = spin_s
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = ap.parse_args()
    rows = measure(0.05, args.reps, args.gap_ms / 1e3) + measure(0.0, args.reps, args.gap_ms / 1e3)
    print(f"{'plan':20} {'transport':9} {'spin':>5} {'send us':>8} {'delivered us':>13} {'p90':>7}")
    for r in rows:
        print(
            f"{r['plan']:20} {r['transport']:9} {r['worker_spin_s']:5g} {r['send_us']:8.1f} "
            f"{r['delivered_us']:13.1f} {r['delivered_p90_us']:7.1f}"
        )
    for spin in (0.05, 0.0):
        for name, _ in cases():
            g = next(
                r
                for r in rows
                if r["plan"] == name and r["transport"] == "gloo" and r["worker_spin_s"] == spin
            )
            m = next(
                r
                for r in rows
                if r["plan"] == name and r["transport"] == "shm" and r["worker_spin_s"] == spin
            )
            print(
                f"{name} (worker spin {spin:g} s): shm / gloo send {m['send_us'] / g['send_us']:.2f}, "
                f"delivered {m['delivered_us'] / g['delivered_us']:.2f}"
            )
    today = dt.date.today().isoformat()
    out = Path(args.out) / f"plan-transport-{today}-cpu.json"
    meta = dict(
        bench="plan_transport",
        device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        date=today,
        commit=commit(),
        reps=args.reps,
        gap_ms=args.gap_ms,
    )
    out.write_text(json.dumps(dict(**meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
