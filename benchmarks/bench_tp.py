"""Tensor parallel: TP=N vs TP=1 decode, and the all-reduce and plan broadcast measured alone.

Llama-3-8B shape (or 70B with --model llama3-70b), random bf16 weights (load_format dummy), prompt P +
N new tokens, CUDA graphs on. Three parts, each its own rows in the JSON (DESIGN.md's schema):
  allreduce       one process per GPU, each masked to its GPU as Ray masks an actor: one decode step's
                  all-reduces (2 per layer + the embedding's) of [batch, hidden] bf16, chained, eager and
                  replayed from a CUDA graph, NCCL vs the one-shot P2P kernel, and one-shot + add_rmsnorm
                  vs the fused all-reduce + add + RMSNorm kernel that replaces it; us per op and per step
  plan-broadcast  rank 0's cost to send one decode step's plan to the other ranks over gloo
  decode          each engine of --engines (EngineSpec: TP=1, TP=N with NCCL only, TP=N with the one-shot
                  all-reduce, and A/B variants of it) in a fresh process: batch-1 ms/token and batch-64
                  output tok/s, against the per-GPU weight-read floor and TP=1
The targets (issue 14): TP=2 batch-1 ms/token <= 0.6 x TP=1, batch-64 tok/s >= 1.6 x TP=1.

    python benchmarks/bench_tp.py --out $OUT/tp.json          # two GPUs (nvidia-h200-x2)
    python benchmarks/bench_tp.py --model llama3-70b --engines auto --gpu-memory-utilization 0.9 \
        --skip-collectives --out $OUT/tp-70b.json             # two H200s: 70B does not fit one GPU
    python benchmarks/bench_tp.py --smoke                     # tiny shapes on CPU over gloo: the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_decode import (
    LLAMA3_8B,
    TINY,
    commit,
    copy_bandwidth,
    device_name,
    dummy_engine_config,
    median_ms,
    prompts,
    time_decode,
    weight_bytes,
)

LLAMA3_70B: dict[str, Any] = dict(
    LLAMA3_8B,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
)
MODELS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "tiny": TINY}


# ---- all-reduce and plan broadcast, alone ------------------------------------------------------------
def _collective_worker(
    rank: int, size: int, port: int, cfg: dict, batches: list[int], gpus: list[str], queue: Any
) -> None:
    """One rank of the stand-alone measurements; rank 0 reports rows through `queue`. `gpus`: the
    parent's visible GPUs (empty on CPU); this rank sees only its own, as Ray masks a worker actor."""
    import faulthandler

    # a rank stuck in a collective prints every thread's stack and exits, rather than waiting silently
    limit_s = float(os.environ.get("FUSERVE_COLLECTIVES_TIMEOUT_S", "600"))
    faulthandler.dump_traceback_later(limit_s, exit=True)
    cuda = bool(gpus)
    if cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[rank]  # before anything starts CUDA in this process
    from fuserve.parallel.plan_broadcast import PlanReceiver, PlanSender
    from fuserve.parallel.process_group import destroy_tp_context, init_tp_context
    from fuserve.workers.kernels.gemv import gemv
    from fuserve.workers.kernels.rmsnorm import fused_add_rmsnorm
    from fuserve.workers.step_plan import StepPlan

    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=dt.timedelta(seconds=300))
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"collectives: {size} ranks forming the group", flush=True)
    # two_shot off: the rows named one-shot and fused run those kernels at any N (two-shot has its own)
    tp = init_tp_context(store, rank, size, device, dtype, 300.0, "auto", two_shot=False)
    say(f"collectives: group formed, one-shot {'on' if tp.fast_all_reduce else 'off'}", flush=True)
    ops_per_step = 2 * cfg["num_hidden_layers"] + 1  # o_proj + down_proj per layer, + the embedding
    chain = min(ops_per_step, 64)  # all-reduces per timed call (one graph); per step scales it
    rows: list[dict[str, Any]] = []

    def nccl(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    hidden = cfg["hidden_size"]
    weight = torch.ones(hidden, dtype=dtype, device=device)
    # torch's symmetric-memory ops last: a chained op that never finishes (fuserve's GEMV push did, at
    # four ranks, 2026-11-26) must not cost the rows measured before it
    passes = ["engine"] + (["symm"] if cuda and os.environ.get("FUSERVE_BENCH_SYMM_OPS", "1") == "1" else [])
    for part in passes:
        symm = {}
        if part == "symm":
            symm = _symmetric_ops(tp, max(batches) * hidden, dtype, device)
            say(f"collectives: symmetric-memory ops {sorted(symm)}", flush=True)
        for batch in batches:
            x = torch.zeros(batch, hidden, dtype=dtype, device=device)
            residual = torch.zeros_like(x)
            if part == "symm":
                impls: dict[str, Any] = symm
                fast = None
            else:
                impls = {"nccl" if cuda else "gloo": nccl}
                fast = tp.fast_all_reduce
            if fast is not None and fast.fits(x):
                impls["one-shot"] = fast
                impls["one-shot+norm"] = lambda y, f=fast, r=residual: fused_add_rmsnorm(
                    f(y), r, weight, 1e-5
                )[0]
            if fast is not None and fast.fits_add_rmsnorm(x):  # what replaces one-shot+norm in the model
                impls["fused"] = lambda y, f=fast, r=residual: f.add_rmsnorm(y, r, weight, 1e-5)[0]
            w = torch.randn(hidden, hidden, dtype=dtype, device=device) / hidden**0.5
            if fast is not None and fast.fits_gemv_push(x, w):  # batch 1: a row-parallel GEMV, then the sum
                impls["gemv+fused"] = lambda y, f=fast, r=residual, w=w: f.add_rmsnorm(
                    gemv(y, w), r, weight, 1e-5
                )[0]
                impls["gemv-push"] = lambda y, f=fast, r=residual, w=w: f.pushed_add_rmsnorm(
                    f.gemv_push(y, w, None), r, weight, 1e-5
                )[0]
            for name, op in impls.items():

                def steps(op: Any = op, x: torch.Tensor = x) -> torch.Tensor:
                    y = x
                    for _ in range(chain):
                        y = op(y)
                    return y

                modes = {"eager": steps}
                if cuda:
                    for _ in range(3):
                        steps()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        steps()
                    modes["graph"] = graph.replay
                for mode, fn in modes.items():
                    for _ in range(5):
                        fn()
                    dist.barrier(group=tp.cpu_group)
                    ms = median_ms(fn, 50 if cuda else 10, cuda)
                    say(f"allreduce {name} {mode} batch {batch}: {1e3 * ms / chain:.1f} us/op", flush=True)
                    rows.append(
                        dict(
                            bench="allreduce",
                            engine=name,
                            mode=mode,
                            batch=batch,
                            bytes=x.numel() * x.element_size(),
                            us_per_op=1e3 * ms / chain,
                            us_per_step=1e3 * ms / chain * ops_per_step,
                            ops_per_step=ops_per_step,
                        )
                    )
                    if rank == 0:  # what is measured so far survives a later op that never finishes
                        queue.put(list(rows))
    # Plan broadcast: one decode step's plan (context 256 tokens, 16-token blocks) from rank 0.
    for batch in batches:
        ctx, blocks = 256, 16
        plan = StepPlan(
            input_ids=[1] * batch,
            positions=[ctx - 1] * batch,
            slot_mapping=list(range(batch)),
            query_start_loc=list(range(batch + 1)),
            context_lens=[ctx] * batch,
            block_tables=[list(range(b * blocks, (b + 1) * blocks)) for b in range(batch)],
            sample_rows=list(range(batch)),
        )
        reps = 200
        dist.barrier(group=tp.cpu_group)
        if rank == 0:
            sender = PlanSender(tp.cpu_group, 60.0, lambda err: None)
            times = []
            for _ in range(reps):
                dist.barrier(group=tp.cpu_group)  # the receivers are waiting, as in a decode step
                t0 = time.perf_counter()
                sender.send(plan)
                times.append(time.perf_counter() - t0)
            rows.append(
                dict(
                    bench="plan-broadcast",
                    engine="gloo",
                    batch=batch,
                    us_per_step=1e6 * statistics.median(times),
                )
            )
        else:
            receiver = PlanReceiver(tp.cpu_group)
            for _ in range(reps):
                dist.barrier(group=tp.cpu_group)
                assert receiver.recv() == plan
    dist.barrier(group=tp.cpu_group)
    destroy_tp_context()
    if rank == 0:
        queue.put(rows)


def _symmetric_ops(tp: Any, max_numel: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """torch's symmetric-memory all-reduces over one buffer of the largest message, whatever the engine's
    size rule: `one-shot-any` (each rank reads all N-1 peers: latency-bound sizes) and `two-shot`
    (reduce-scatter + all-gather over P2P: each rank reads 1/N of each peer), to find where each one
    stops paying against NCCL at this N (issue 22). Same group as the engine's one-shot buffer, so the
    process's one-rendezvous-per-group limit does not apply."""
    import torch.distributed._symmetric_memory as symm_mem

    from fuserve.parallel.one_shot_all_reduce import one_shot_sum, two_shot_sum

    if tp.fast_all_reduce is None:
        return {}
    name = tp.fast_all_reduce.group_name
    buf = symm_mem.empty(max_numel, dtype=dtype, device=device)
    symm_mem.rendezvous(buf, name)

    ops = {
        "one-shot-any": lambda x: one_shot_sum(x, buf, name),
        "two-shot": lambda x: two_shot_sum(x, buf, name),
    }
    probe = torch.ones(tp.size * 64, dtype=dtype, device=device)
    for key in list(ops):
        try:  # an op this torch or this machine lacks is left out, and says why
            dist.barrier(group=tp.cpu_group)
            got = ops[key](probe).clone()
            torch.cuda.synchronize()
            if not bool((got == tp.size).all()):
                raise RuntimeError("wrong sum")
        except Exception as err:
            print(f"allreduce {key} left out: {type(err).__name__}: {err}", flush=True)
            del ops[key]
    return ops


def measure_collectives(
    cfg: dict, size: int, batches: list[int], timeout_s: float = 150.0
) -> list[dict[str, Any]]:
    """The rows rank 0 measured; the ranks are stopped after `timeout_s` (a chained op that never
    finishes: the GEMV push did, after the GPU tests on the same machine, 2026-11-26), keeping the rows
    measured before it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpus: list[str] = []
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if len(gpus) < size:
            raise SystemExit(f"--tp {size} needs {size} GPUs, this machine shows {len(gpus)}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    ranks = mp.start_processes(
        _collective_worker,
        args=(size, port, cfg, batches, gpus, queue),
        nprocs=size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    while not ranks.join(timeout=1):
        while not queue.empty():
            rows = queue.get()
        if time.monotonic() > deadline:
            print(f"collectives: stopped after {timeout_s:g} s; {len(rows)} rows kept", flush=True)
            for p in ranks.processes:
                p.kill()
            break
    while not queue.empty():
        rows = queue.get()
    for r in rows:
        print(r, flush=True)
    return rows


# ---- engine decode -----------------------------------------------------------------------------------
def profile_decode(
    engine: Any, prompt_len: int, vocab: int, batch: int = 1, steps: int = 40
) -> dict[str, Any]:
    """Rank 0's GPU kernels over `steps` decode steps of `batch` sequences (torch.profiler): per kernel
    name the calls and microseconds per step, and how much of the steps' wall time the GPU was busy."""
    from fuserve.sampling_params import SamplingParams

    room = engine.config.model.max_model_len - prompt_len  # --smoke's short contexts hold fewer steps
    steps = min(steps, room - 11)
    params = SamplingParams(max_tokens=room, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, prompt_len, vocab, seed=7)):
        engine.add_request(f"profile-{i}-{time.monotonic_ns()}", prompt, params)
    for _ in range(10):
        engine.step()
    row = _profile_steps(engine.step, lambda n: n >= steps, f"rank 0, decode batch {batch}")
    while engine.has_unfinished():
        engine.step()
    return dict(row, bench="tp-profile", batch=batch)


def profile_prefill(engine: Any, prompt_len: int, vocab: int, batch: int) -> dict[str, Any]:
    """Rank 0's GPU kernels over the steps that prefill `batch` prompts (until every one has its first
    token): where a tensor-parallel prefill goes that does not halve with the ranks."""
    from fuserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, prompt_len, vocab, seed=11)):
        engine.add_request(f"prefill-{i}-{time.monotonic_ns()}", prompt, params)
    started: set[str] = set()

    def step() -> None:
        started.update(o.request_id for o in engine.step())

    def done(_: int) -> bool:
        return len(started) >= batch or not engine.has_unfinished()

    row = _profile_steps(step, done, f"rank 0, prefill of {batch} x {prompt_len} tokens")
    while engine.has_unfinished():
        engine.step()
    return dict(row, bench="tp-profile-prefill", batch=batch, prompt_len=prompt_len)


def _profile_steps(step: Callable[[], Any], done: Callable[[int], bool], title: str) -> dict[str, Any]:
    """Profile calls of `step` until `done(calls so far)`; per kernel name the calls and us per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()  # on the CPU (--smoke) the table holds CPU ops
    if gpu:
        torch.cuda.synchronize()
    n = 0
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        while not done(n):
            step()
            n += 1
        if gpu:
            torch.cuda.synchronize()
        wall_us = 1e6 * (time.perf_counter() - t0)
    device = DeviceType.CUDA if gpu else DeviceType.CPU
    kernels = [e for e in prof.events() if e.device_type == device]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:60], []).append(e.device_time if gpu else e.cpu_time)
    table = sorted(((name, len(ts) / n, sum(ts) / n) for name, ts in by_name.items()), key=lambda r: -r[2])
    busy = sum(sum(ts) for ts in by_name.values()) / n
    # with PDL kernels overlap, so the sum over-counts: the union of their intervals is the busy time
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    covered, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    print(
        f"\n{title}: {n} steps, {wall_us / n:.0f} us per step, kernels {busy:.0f} us summed, GPU busy "
        f"{covered / n:.0f} us (union)"
    )
    print(f"{'kernel':<62}{'calls':>7}{'us/step':>9}{'us/call':>9}")
    for name, calls, us in table[:25]:
        print(f"{name:<62}{calls:>7.1f}{us:>9.1f}{us / calls:>9.2f}")
    return dict(
        steps=n,
        us_per_step=wall_us / n,
        gpu_busy_us_per_step=busy,
        gpu_union_us_per_step=covered / n,
        kernels=[dict(name=k, calls_per_step=c, us_per_step=u) for k, c, u in table],
    )


@dataclass(frozen=True)
class EngineSpec:
    """One engine configuration to time, written `base[+option...]` on the command line:
    base      tp1 | nccl (TP=N, NCCL for every all-reduce) | auto (one-shot, fused, GEMV push, two-shot)
    options   gloo-plans (step plans over gloo, not the shared-memory ring), no-keyed (greedy plans
              gather the logits on rank 0 instead of each rank's keyed argmax), l2=MB
              (kernels.l2_prefetch_mb, the L2 prefetch budget), ar=MB (kernels.all_reduce_prefetch_mb, what
              the fused all-reduce prefetches of the next layer's weights)
    The GEMV push and two-shot won their A/Bs and lost their switches (benchmarks/NOTES.md, 2026-11-26).
    The base is parallel.all_reduce (tp1: one rank), and the options set config fields, never the
    environment: every rank takes them from the same config.
    Each one runs in a fresh process: torch's symmetric memory pairs a process with fresh workers only
    once (fuserve/parallel/one_shot_all_reduce.py), and a fresh CUDA context keeps runs independent."""

    base: str
    gloo_plans: bool = False
    keyed_argmax: bool = True
    l2_prefetch_mb: float | None = None  # None: the config's default (kernels.l2_prefetch_mb unset)
    all_reduce_prefetch_mb: float | None = None  # None: the default (kernels.all_reduce_prefetch_mb unset)

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        base, *options = text.split("+")
        if base not in ("tp1", "nccl", "auto"):
            raise SystemExit(f"engine {text!r}: the base is one of tp1, nccl, auto")
        spec = cls(base)
        for option in options:
            if option == "gloo-plans":
                spec = dataclasses.replace(spec, gloo_plans=True)
            elif option == "no-keyed":
                spec = dataclasses.replace(spec, keyed_argmax=False)
            elif option.startswith("l2="):
                spec = dataclasses.replace(spec, l2_prefetch_mb=float(option[3:]))
            elif option.startswith("ar="):
                spec = dataclasses.replace(spec, all_reduce_prefetch_mb=float(option[3:]))
            else:
                raise SystemExit(f"engine {text!r}: unknown option {option!r}")
        return spec


def run_engine(
    cfg: dict,
    spec: EngineSpec,
    tp_size: int,
    batches: list[int],
    prompt_len: int,
    output_len: int,
    smoke: bool,
    profile: bool = False,
    gpu_memory_utilization: float = 0.6,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    from fuserve.configs import config_from_dict
    from fuserve.gc_tuning import quiet_gc
    from fuserve.parallel.plan_broadcast import RingPlanSender
    from fuserve.parallel.worker_group import WorkerGroup
    from fuserve.workers import step_plan
    from fuserve.workers.engine import LLMEngine
    from fuserve.workers.kernels.l2_prefetch import l2_prefetch_budget
    from fuserve.workers.kernels.pdl import pdl_enabled
    from fuserve.workers.kernels.switches import switches

    tp = 1 if spec.base == "tp1" else tp_size
    if not spec.keyed_argmax:  # plans never say argmax_only: rank 0 gathers the logits and broadcasts draws
        step_plan.argmax_only = lambda rows: False  # type: ignore[assignment]
    config = config_from_dict(
        dummy_engine_config(
            cfg,
            batches,
            prompt_len,
            output_len,
            smoke,
            cache={"gpu_memory_utilization": gpu_memory_utilization},
            parallel={
                "tensor_parallel_size": tp,
                "init_timeout_s": float(os.environ.get("BENCH_INIT_TIMEOUT_S", "300")),
                "plan_transport": "gloo" if spec.gloo_plans else "auto",
                "all_reduce": "nccl" if spec.base == "tp1" else spec.base,
            },
            # every rank takes these from the config (fuserve/workers/kernels/switches.py)
            kernels={
                name: value
                for name, value in (
                    ("l2_prefetch_mb", spec.l2_prefetch_mb),
                    ("all_reduce_prefetch_mb", spec.all_reduce_prefetch_mb),
                )
                if value is not None
            },
        )
    )
    t0 = time.perf_counter()
    workers = WorkerGroup.start(config) if tp > 1 else None
    engine = LLMEngine(config, workers=workers)
    init_s = time.perf_counter() - t0
    quiet_gc()  # as the served engine core does after start-up (and every rank >= 1, tp_worker.py)
    one_shot = workers is not None and workers.tp.fast_all_reduce is not None
    backend = "oneshot" if one_shot else ("gloo" if smoke else "nccl")
    if spec.base == "auto" and not one_shot and not smoke:
        raise RuntimeError(f"{spec}: the one-shot all-reduce did not start (see the warnings above)")
    plans = "-" if workers is None else ("shm" if isinstance(workers.sender, RingPlanSender) else "gloo")
    name = (
        "fuserve-tp1" if tp == 1 else f"fuserve-tp{tp}-{backend}" + ("-gloo-plans" if plans == "gloo" else "")
    )
    if not spec.keyed_argmax:
        name += "-gather-argmax"
    fast = workers.tp.fast_all_reduce if one_shot else None
    two_shot = fast is not None and fast.two_shot_buffer is not None
    fused = fast is not None and fast.two_shot_above > 0  # below four ranks: the fused kernel for decode
    if two_shot:
        name += "-twoshot-prefill" if fused else "-twoshot"
    # what the kernels do, not what was asked: PDL needs a compiled sm_90+ GPU, and prefetch needs PDL
    pdl = torch.cuda.is_available() and pdl_enabled(torch.empty(0, device="cuda"))
    l2_prefetch_mb = l2_prefetch_budget() / 2**20 if pdl else 0.0
    if l2_prefetch_mb:
        name += f"-l2pf{l2_prefetch_mb:g}"
    # only the fused all-reduce + RMSNorm prefetches
    all_reduce_prefetch_mb = switches().all_reduce_prefetch_bytes / 2**20 if fused else 0.0
    if all_reduce_prefetch_mb:
        name += f"-arpf{all_reduce_prefetch_mb:g}"
    rows = []
    # a warm-up pass over every batch, dropped: the largest batch's 4,096-token prefill steps compile
    # kernels of their own (a warm-up of batch 1 alone left ~50 ms of them in TP=2's batch-64 row)
    for i, batch in enumerate(batches + batches):
        if i < len(batches):
            time_decode(engine, batch, prompt_len, output_len, cfg["vocab_size"])
            continue
        timing = median_of_runs(
            [time_decode(engine, batch, prompt_len, output_len, cfg["vocab_size"]) for _ in range(repeats)]
        )
        rows.append(
            dict(
                bench="tp-decode",
                engine=name,
                tp=tp,
                one_shot=one_shot,
                keyed_argmax=spec.keyed_argmax,
                async_scheduling=engine.async_scheduling,
                plan_transport=plans,
                pdl=pdl,
                l2_prefetch_mb=l2_prefetch_mb,
                all_reduce_prefetch_mb=all_reduce_prefetch_mb,
                batch=batch,
                prompt_len=prompt_len,
                output_len=output_len,
                **timing,
                init_s=init_s,
            )
        )
        print(rows[-1], flush=True)
    if profile:
        for batch in sorted({1, max(batches)}):
            rows.append(
                dict(profile_decode(engine, prompt_len, cfg["vocab_size"], batch), engine=name, tp=tp)
            )
        rows.append(
            dict(profile_prefill(engine, prompt_len, cfg["vocab_size"], max(batches)), engine=name, tp=tp)
        )
    t0 = time.perf_counter()
    engine.shutdown()
    print(f"{name} shut down in {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated timings of one batch: the run with the median output tok/s (whole runs swing with the
    prefill steps, 2026-11-27), and every run's tok/s, step and TTFT beside it."""
    ordered = sorted(runs, key=lambda r: r["output_tok_s"])
    mid = dict(ordered[len(ordered) // 2])
    if len(runs) > 1:
        for key in ("output_tok_s", "ms_per_token", "ttft_ms"):
            mid[f"{key}_runs"] = [round(r[key], 3) for r in runs]
        for key in ("step_ms", "started_at"):  # a slow run's steps too, not only the median run's
            mid[f"{key}_runs"] = [r[key] for r in runs]
    return mid


def _engine_child(queue: Any, ray_address: str, kwargs: dict[str, Any]) -> None:
    """A fresh process for one engine: joins the parent's Ray cluster, times, sends its rows back."""
    import ray

    ray.init(address=ray_address, log_to_driver=False)
    try:
        queue.put(run_engine(**kwargs))
    except BaseException as err:
        queue.put(f"{type(err).__name__}: {err}")
        raise


def run_engine_isolated(timeout_s: float, **kwargs: Any) -> list[dict[str, Any]]:
    """run_engine in a spawned process, at most timeout_s; a failure or timeout is printed and gives no
    rows, so the engines after it still run."""
    import queue as queue_module

    import ray

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(
        target=_engine_child, args=(results, ray.get_runtime_context().gcs_address, kwargs), daemon=False
    )
    child.start()
    try:
        got = results.get(timeout=timeout_s)
    except queue_module.Empty:
        got = f"no result within {timeout_s:g} s"
    # a child that delivered has only Ray's exit left, which can hang: on the two-H100 run of 2026-11-26 a
    # 30 s wait for it let the call's time limit end the script before the 70B rows reached the JSON
    child.join(timeout=5)
    if child.is_alive():
        child.kill()
        child.join()
    if isinstance(got, str):
        print(f"engine {kwargs['spec']} FAILED: {got}", flush=True)
        return []
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each batch after the warm-up; the row is the run with the median tok/s",
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--engines",
        default="tp1,nccl,auto",
        help="comma-separated engines to time, in order (EngineSpec: e.g. auto+gloo-plans, auto+l2=8)",
    )
    ap.add_argument("--skip-collectives", action="store_true")
    ap.add_argument(
        "--collectives-timeout-s", type=float, default=150.0, help="stop the all-reduce-alone part after this"
    )
    ap.add_argument(
        "--collective-batches", default="", help="more batch sizes for the all-reduce alone (crossovers)"
    )
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--engine-timeout-s", type=float, default=300.0, help="one engine's whole run, at most")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="start no engine that would end past this many seconds"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU over gloo: checks the script runs"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile rank 0's decode kernels (batch 1 and the largest)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = time.monotonic()
    cfg = TINY if args.smoke else MODELS[args.model]
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        args.model, batches, args.prompt_len, args.output_len = "tiny", [1, 2], 8, 6
    from fuserve.parallel.process_group import GPU_ENV

    for key, value in GPU_ENV.items():  # multicast off everywhere, before anything starts NCCL
        os.environ.setdefault(key, value)
    meta = dict(model=args.model, device=device_name(), date=dt.date.today().isoformat(), commit=commit())
    out = Path(
        args.out or ("/tmp/tp-smoke.json" if args.smoke else f"benchmarks/results/tp-{meta['date']}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    bw = copy_bandwidth()
    meta["copy_tb_s"] = bw / 1e12
    if not args.skip_collectives:
        extra = [int(b) for b in args.collective_batches.split(",")] if args.collective_batches else []
        rows += measure_collectives(
            cfg, args.tp, sorted({1, 8, *batches, *extra}), args.collectives_timeout_s
        )
        finish(rows, meta, cfg, bw, out)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engines' processes size their KV caches from what is free
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, num_cpus=max(4, 2 * args.tp) if args.smoke else None)
    longest = 0.0
    for text in filter(None, args.engines.split(",")):
        spec = EngineSpec.parse(text)
        if args.smoke and spec.base == "auto":
            continue  # no one-shot on CPU
        elapsed = time.monotonic() - started
        if args.budget_s is not None and elapsed + 1.2 * longest > args.budget_s:
            print(f"engine {text} skipped: {elapsed:.0f} s gone of a {args.budget_s:g} s budget", flush=True)
            continue
        t0 = time.monotonic()
        limit = (
            args.engine_timeout_s
            if args.budget_s is None
            else min(args.engine_timeout_s, args.budget_s - elapsed)
        )
        rows += run_engine_isolated(
            limit,
            cfg=cfg,
            spec=spec,
            tp_size=args.tp,
            batches=batches,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            smoke=args.smoke,
            profile=args.profile,
            gpu_memory_utilization=args.gpu_memory_utilization,
            repeats=args.repeats,
        )
        longest = max(longest, time.monotonic() - t0)
        finish(rows, meta, cfg, bw, out)  # after every engine: a run cut short keeps what it measured
    finish(rows, meta, cfg, bw, out)
    print_tables(rows)


def finish(rows: list[dict[str, Any]], meta: dict[str, Any], cfg: dict, bw: float, out: Path) -> None:
    """Stamp every row with the run's facts and its ratios (to the floor, to TP=1), and write the JSON."""
    tp1 = {r["batch"]: r for r in rows if r["bench"] == "tp-decode" and r["engine"] == "fuserve-tp1"}
    for r in rows:
        r.update(meta)
        if r["bench"] == "tp-decode":
            floor_ms = 1e3 * weight_bytes(cfg) / r["tp"] / bw  # per-GPU weight bytes / bandwidth
            r["floor_ms"] = floor_ms
            r["frac_of_floor"] = floor_ms / r["ms_per_token"] if r["batch"] == 1 else None
            base = tp1.get(r["batch"])
            r["speedup"] = base["ms_per_token"] / r["ms_per_token"] if base else None
            r["ms_vs_tp1"] = r["ms_per_token"] / base["ms_per_token"] if base else None
            r["tok_s_vs_tp1"] = r["output_tok_s"] / base["output_tok_s"] if base else None
    out.write_text(json.dumps(rows, indent=1))


def print_tables(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'collective':<15}{'mode':<7}{'batch':>6}{'KiB':>8}{'us/op':>9}{'us/step':>9}")
    for r in rows:
        if r["bench"] == "allreduce":
            print(
                f"{r['engine']:<15}{r['mode']:<7}{r['batch']:>6}{r['bytes'] / 1024:>8.0f}"
                f"{r['us_per_op']:>9.1f}{r['us_per_step']:>9.0f}"
            )
    for r in rows:
        if r["bench"] == "plan-broadcast":
            print(f"plan broadcast, batch {r['batch']}: {r['us_per_step']:.0f} us per step on rank 0")
    print(
        f"\n{'engine':<40}{'batch':>6}{'ms/token':>10}{'tok/s':>9}{'floor ms':>9}{'x floor':>8}"
        f"{'ms/TP1':>8}{'tok/TP1':>8}"
    )
    for r in rows:
        if r["bench"] == "tp-decode":
            print(
                f"{r['engine']:<40}{r['batch']:>6}{r['ms_per_token']:>10.2f}{r['output_tok_s']:>9.0f}"
                f"{r['floor_ms']:>9.2f}{(r['frac_of_floor'] or 0):>8.2f}{(r['ms_vs_tp1'] or 0):>8.2f}"
                f"{(r['tok_s_vs_tp1'] or 0):>8.2f}"
            )


if __name__ == "__main__":
    main()
