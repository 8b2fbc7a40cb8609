"""Tensor parallel on CPU: gloo groups, real Ray worker actors, the same greedy tokens as one device.

Covers: each rank reads only its slices (KV heads replicated when ranks > KV heads, a vocab that does not
split evenly); the step-plan codec; TP=2 == TP=1 token for token through the Ray actor path (chunked
prefill, preemption, plans bigger than one broadcast); a killed worker failing the engine and the
AsyncEngine's in-flight request within seconds; no process or placement group left behind; and the
known Ray traps: a worker that fails or hangs at startup, resources that never come, GPUs that are not
there, a Serve replica without placement-group bundles, workers forked instead of spawned.
The GPU half (marker `gpu`, two GPUs) is at the bottom.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import torch
from checkpoints import make_checkpoint
from safetensors import safe_open

from fuserve import LLM, SamplingParams
from fuserve.configs import FuserveConfig, config_from_dict
from fuserve.parallel import placement as placement_mod
from fuserve.parallel.placement import PlacementError, check_gpu_visible, reserve_placement
from fuserve.parallel.plan_broadcast import (
    FIRST_NUMEL,
    HEADER_NUMEL,
    PlanSender,
    RingPlanSender,
    decode_plan,
    encode_plan,
)
from fuserve.parallel.plan_ring import PlanRing
from fuserve.parallel.process_group import destroy_tp_context, fresh_group_names, init_tp_context
from fuserve.parallel.tp_context import TPContext
from fuserve.parallel.worker_group import WorkerGroup, WorkerGroupError
from fuserve.workers.async_engine import AsyncEngine, EngineDeadError
from fuserve.workers.engine import LLMEngine
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.kernels.switches import KernelSwitches, set_switches, switches
from fuserve.workers.models import loader as loader_module
from fuserve.workers.models.loader import build_model, resolve_source
from fuserve.workers.step_plan import StepPlan

TESTS_DIR = str(Path(__file__).parent)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
ARGMAX = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # no logprobs: argmax-only plans


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},  # workers import parallel_faulty_workers
    )
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _default_kernel_switches() -> Any:
    """A test's engines set this process's kernel switches from their configs; later tests (and kernel
    tests in the same pytest process) start from the defaults again."""
    yield
    set_switches(KernelSwitches())


@pytest.fixture(scope="module")
def llama_kv2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp") / "llama", "llama3", seed=2)


@pytest.fixture(scope="module")
def qwen_kv1_odd_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One KV head for two ranks (replicated), a vocab of 385 (ranks hold 193 + 192 rows), tied
    embeddings and QKV biases."""
    return make_checkpoint(
        tmp_path_factory.mktemp("tp") / "qwen", "qwen2", seed=3, num_key_value_heads=1, vocab_size=385
    )


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def tp_config(folder: Path, tp: int, **sections: dict[str, Any]) -> FuserveConfig:
    data: dict[str, Any] = {
        "model": {"path": str(folder), "max_model_len": 128},
        "cache": {"block_size": 4, "num_blocks": 48},
        "scheduler": {"max_num_batched_tokens": 24, "max_num_seqs": 8},
        "parallel": {"tensor_parallel_size": tp, "init_timeout_s": 20},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


def prompts(vocab: int, lengths: tuple[int, ...] = (1, 5, 19, 40, 70)) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, min(vocab, 256), (n,), generator=g).tolist() for n in lengths]


def wait_until(condition: Any, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def gone(pids: list[int]) -> bool:
    """No process left with these ids (a zombie awaiting its parent counts as gone)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def live_placement_groups() -> list[str]:
    return [
        pg["placement_group_id"]
        for pg in ray.util.placement_group_table().values()
        if pg["state"] != "REMOVED"
    ]


# ---- sharded loading (no processes: a TPContext of rank r builds rank r's shard) --------------------
class RecordingSlice:
    """A safetensors slice that counts the elements each read returns."""

    def __init__(self, name: str, inner: Any, reads: Counter) -> None:
        self.name, self.inner, self.reads = name, inner, reads

    def get_shape(self) -> list[int]:
        return self.inner.get_shape()

    def __getitem__(self, index: Any) -> torch.Tensor:
        t = self.inner[index]
        self.reads[self.name] += t.numel()
        return t


def build_rank(folder: Path, rank: int, size: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Counter]:
    reads: Counter = Counter()
    original = loader_module.iter_safetensors
    monkeypatch.setattr(
        loader_module,
        "iter_safetensors",
        lambda path: ((n, RecordingSlice(n, s, reads)) for n, s in original(path)),
    )
    source = resolve_source(config_from_dict({"model": {"path": str(folder)}}).model)
    model = build_model(
        source, TPContext(rank, size), KernelOps.reference(), torch.float32, torch.device("cpu"), 64
    )
    monkeypatch.setattr(loader_module, "iter_safetensors", original)
    return model, reads


def test_each_rank_reads_only_its_slices(qwen_kv1_odd_vocab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with safe_open(str(next(qwen_kv1_odd_vocab.glob("*.safetensors"))), "pt") as f:
        full = {k: f.get_tensor(k) for k in f.keys()}
    shards = [build_rank(qwen_kv1_odd_vocab, r, 2, monkeypatch) for r in range(2)]
    a0 = [m.model.layers[0].self_attn for m, _ in shards]
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    for _, reads in shards:
        assert reads[q] == full[q].numel() // 2, "a column-parallel weight reads half its rows"
        assert reads[k] == full[k].numel(), "the single KV head is read whole by both ranks"
        assert (
            reads["model.layers.0.self_attn.o_proj.weight"]
            == full["model.layers.0.self_attn.o_proj.weight"].numel() // 2
        )
        assert sum(reads.values()) < 0.6 * sum(t.numel() for t in full.values())
    # Shards reassemble into the checkpoint; KV heads are replicated, not split.
    qkv = [attn.qkv_proj.weight for attn in a0]
    q_size, kv_size = a0[0].qkv_proj.q_size, a0[0].qkv_proj.kv_size
    torch.testing.assert_close(torch.cat([w[:q_size] for w in qkv]), full[q])
    for w in qkv:
        torch.testing.assert_close(w[q_size : q_size + kv_size], full[k])
    torch.testing.assert_close(
        torch.cat([attn.o_proj.weight for attn in a0], dim=1), full["model.layers.0.self_attn.o_proj.weight"]
    )
    emb = [m.model.embed_tokens.weight for m, _ in shards]
    assert [e.shape[0] for e in emb] == [193, 193]
    torch.testing.assert_close(torch.cat(emb)[:385], full["model.embed_tokens.weight"])
    assert not emb[1][192:].any(), "the padding row past the vocab stays zero"


def test_gguf_shard_is_a_slice_of_the_dequantized_tensor() -> None:
    """GGUF tensors are dequantized whole, then narrowed: rank 2 of 3 on SmolLM2 (9 heads, 3 KV heads)."""
    from fuserve.workers.models.gguf_loader import iter_gguf_tensors

    source = resolve_source(config_from_dict({}).model)
    cpu = torch.device("cpu")
    shard = build_model(source, TPContext(2, 3), KernelOps.reference(), torch.float32, cpu, 64)
    q, down = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    wanted = {q, down}
    full = {}
    for name, tensor in iter_gguf_tensors(source.path, torch.float32):
        if name in wanted:
            full[name] = tensor
        if len(full) == len(wanted):
            break
    layer = shard.model.layers[1]
    torch.testing.assert_close(layer.self_attn.qkv_proj.weight[:192], full[q][384:])  # heads 6..8 of 9
    torch.testing.assert_close(layer.mlp.down_proj.weight, full[down][:, 1024:])  # inputs 1024..1535


class FakeFastAllReduce:
    """Takes messages of up to 4 elements and doubles them (a stand-in for the one-shot kernel)."""

    def __init__(self) -> None:
        self.calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() <= 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


def test_each_group_formed_in_a_process_takes_new_names() -> None:
    """torch keeps symmetric memory's store per group name for the life of a process, and names restart
    at 0 once the default group is destroyed: a group named like an earlier one in the same process
    would rendezvous through a dead store (a hang on GPUs). Each formation starts from fresh names."""
    import torch.distributed as dist

    names: list[str] = []
    for _ in range(3):
        first = fresh_group_names()
        tp = init_tp_context(dist.HashStore(), 0, 1, torch.device("cpu"), torch.float32, 10.0, "nccl", first)
        names += [tp.group.group_name, tp.cpu_group.group_name]
        assert tp.group.group_name == str(first)
        destroy_tp_context()
    assert len(set(names)) == len(names), names


def test_a_process_sets_up_symmetric_memory_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's symmetric-memory rendezvous keys come from a per-process counter: a process that already
    did one would wait forever for fresh workers' keys. Such a rank declines before anyone enters the
    rendezvous, and the group agrees on NCCL; so does a dtype the kernel does not take."""
    import torch.distributed as dist

    from fuserve.parallel import one_shot_all_reduce
    from fuserve.parallel.one_shot_all_reduce import OneShotAllReduce

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("entered the rendezvous")

    monkeypatch.setattr(OneShotAllReduce, "__init__", never)
    tp = init_tp_context(
        dist.HashStore(), 0, 1, torch.device("cpu"), torch.float32, 10.0, "nccl", fresh_group_names()
    )
    try:
        monkeypatch.setattr(one_shot_all_reduce, "_rendezvous_started", True)
        assert OneShotAllReduce.create(tp.group, tp.cpu_group, torch.device("cpu"), torch.bfloat16) is None
        monkeypatch.setattr(one_shot_all_reduce, "_rendezvous_started", False)
        assert OneShotAllReduce.create(tp.group, tp.cpu_group, torch.device("cpu"), torch.float16) is None
    finally:
        destroy_tp_context()


def test_a_rank_that_gives_up_forming_the_group_names_where_everyone_is() -> None:
    import torch.distributed as dist

    from fuserve.parallel.process_group import GroupFormationError, StartupPhases

    store = dist.HashStore()
    StartupPhases(store, 1, 3).store.set("fuserve/phase/1", "the first NCCL all-reduce")
    phases = StartupPhases(store, 0, 3)
    with pytest.raises(GroupFormationError) as err:
        with phases.phase("the gloo group's first barrier"):
            raise TimeoutError("Socket Timeout")
    assert str(err.value).startswith("rank 0 gave up in the gloo group's first barrier after 0.0 s")
    assert "TimeoutError: Socket Timeout" in str(err.value)
    assert str(err.value).endswith("rank 1 at the first NCCL all-reduce, rank 2 at not joined")


def test_plan_ring_timeout_names_the_worker_that_stopped_reading(tmp_path: Path) -> None:
    ring = PlanRing.create(num_readers=2, num_slots=2, slot_numel=4)
    readers = [PlanRing.attach(ring.path, reader=r) for r in range(2)]
    try:
        for seq in range(2):
            ring.send([seq])
            readers[0].recv_chunk()
        assert ring.lagging_ranks() == [2]
        with pytest.raises(TimeoutError, match=r"worker rank\(s\) \[2\] stopped taking plans"):
            ring.send([2], timeout_s=0.1)
    finally:
        ring.unlink()


def test_small_all_reduces_take_the_fast_path() -> None:
    """Messages the fast path accepts never reach the process group (none exists here)."""
    fast = FakeFastAllReduce()
    tp = TPContext(rank=0, size=2, fast_all_reduce=fast)
    torch.testing.assert_close(tp.all_reduce(torch.ones(4)), torch.full((4,), 2.0))
    assert fast.calls == 1
    with pytest.raises((ValueError, RuntimeError)):  # a large one goes to torch.distributed: not set up
        tp.all_reduce(torch.ones(8))
    x = torch.ones(8)
    assert TPContext().all_reduce(x) is x, "one rank: the identity, no copy"


# ---- step plans ---------------------------------------------------------------------------------
def test_plan_codec_round_trip() -> None:
    plan = StepPlan(
        input_ids=[5, 6, 7, 8],
        positions=[0, 1, 2, 9],
        slot_mapping=[4, 5, 6, 13],
        query_start_loc=[0, 3, 4],
        context_lens=[3, 10],
        block_tables=[[1], [2, 3, 7]],
        sample_rows=[0, 1],
        fill_positions=[3],
        fill_rows=[1],
        argmax_only=True,
    )
    counts, payload = encode_plan(plan)
    decoded = decode_plan(counts, payload)
    assert decoded == plan and decoded.argmax_only is True
    empty_tables = StepPlan(
        input_ids=[1], positions=[0], slot_mapping=[-1], query_start_loc=[0, 1], context_lens=[1],
        block_tables=[[]], sample_rows=[],
    )  # fmt: skip
    assert decode_plan(*encode_plan(empty_tables)) == empty_tables


# ---- TP=2 through Ray actors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        # chunked prefill (24-token budget) and preemption (48 blocks of 4) on both ranks; plans through
        # the shared-memory ring (the default on one node)
        dict(fixture="llama_kv2", sections={}, lengths=(1, 5, 19, 40, 70)),
        # async scheduling: plans carry placeholders that every rank fills from rank 0's broadcast draws;
        # kernel switches and all-reduce choices that are not the defaults, which every rank must take
        dict(
            fixture="llama_kv2",
            sections=dict(
                scheduler={"async_scheduling": "on"},
                kernels={"pdl": False, "l2_prefetch_mb": 4},
                parallel={"all_reduce": "nccl"},
            ),
            lengths=(1, 5, 19, 40, 70),
        ),
        # 1 KV head for 2 ranks, odd vocab; plans over gloo, where a 300-token budget puts all prompts
        # in one prefill step, whose plan is too big for one broadcast
        dict(
            fixture="qwen_kv1_odd_vocab",
            sections=dict(
                model={"max_model_len": 192},
                scheduler={"max_num_batched_tokens": 300},
                cache={"num_blocks": 128},
                parallel={"plan_transport": "gloo"},
            ),
            lengths=(1, 5, 19, 40, 70, 120),
        ),
        # n-gram speculation (in the argmax-only half): plans carry drafts, every rank takes logits at each
        dict(
            fixture="llama_kv2",
            sections=dict(speculative={"method": "ngram", "adaptive": False, "ngram_min": 1}),
            lengths=(1, 5, 19, 40, 70),
        ),
    ],
    ids=["llama-kv2", "llama-kv2-async-switches", "qwen-kv1-vocab385", "llama-kv2-ngram"],
)
def test_tp2_greedy_equals_tp1(
    ray_cluster: None, request: pytest.FixtureRequest, case: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = request.getfixturevalue(case["fixture"])
    ps = prompts(385, case["lengths"])
    want = LLM(tp_config(folder, 1, **case["sections"])).generate(ps, GREEDY)
    sent: list[StepPlan] = []
    for sender in (PlanSender, RingPlanSender):
        send = sender.send
        monkeypatch.setattr(
            sender, "send", lambda self, plan, send=send: (sent.append(plan), send(self, plan))[1]
        )
    config = tp_config(folder, 2, **case["sections"])
    llm = LLM(config)
    group = llm.engine.workers
    assert group is not None and group.tp.size == 2
    # Every rank runs with the config's kernel switches: rank 0 here, each worker as it reported them
    # (init_group, an actor call) after setting them from its copy of the config, not its environment.
    configured = KernelSwitches.from_config(config)
    assert switches() == configured
    assert [info["kernel_switches"] for info in group.infos] == [dataclasses.asdict(configured)]
    over_gloo = case["sections"].get("parallel", {}).get("plan_transport") == "gloo"
    assert isinstance(group.sender, PlanSender if over_gloo else RingPlanSender)
    # the ring's name is gone once every rank mapped it: a crash from here on leaves nothing in /dev/shm
    assert not list(Path("/dev/shm").glob(f"fuserve-plans-{os.getpid()}-*"))
    got = llm.generate(ps, GREEDY)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert [lp.logprob for lp in g.outputs[0].logprobs] == pytest.approx(
            [lp.logprob for lp in w.outputs[0].logprobs], abs=1e-4
        )
    assert not any(p.argmax_only for p in sent), "logprobs need the gathered logits"
    if case["fixture"] == "llama_kv2":
        assert llm.engine.stats().num_preemptions > 0
    else:
        longest = max(len(encode_plan(p)[1]) for p in sent)
        assert longest > FIRST_NUMEL - HEADER_NUMEL, "no plan took the two-broadcast path"
    filled = sum(len(p.fill_positions) for p in sent)
    assert (filled > 0) == (llm.engine.async_scheduling), "placeholders iff async scheduling"
    # Without logprobs each rank takes the argmax of its own logits slice and one max-all-reduce gives
    # every rank the tokens: no logits gather, and no broadcast of rank 0's draws for the placeholders.
    sent.clear()
    for w, a in zip(want, llm.generate(ps, ARGMAX), strict=True):
        assert a.outputs[0].token_ids == w.outputs[0].token_ids
    assert all(p.argmax_only for p in sent if p.sample_rows)
    if "speculative" in case["sections"]:
        assert any(sum(p.num_drafts) for p in sent), "no step verified drafts"
    # Spawned by Ray's raylet, not forked from this process (a fork would copy its threads and locks).
    for pid in group.worker_pids:
        assert psutil.Process(pid).ppid() != os.getpid()
    # One group per process: a second one is refused before anything starts.
    with pytest.raises(WorkerGroupError, match="already belongs to a tensor-parallel group"):
        WorkerGroup.start(tp_config(folder, 2))
    llm.engine.shutdown()
    assert wait_until(lambda: gone(group.worker_pids), 10), "worker processes outlived shutdown"
    assert live_placement_groups() == []
    llm.engine.shutdown()  # twice is fine


def test_tp4_greedy_equals_tp1(ray_cluster: None, tmp_path: Path) -> None:
    """Four ranks, two KV heads (each held by two ranks), a vocab of 387 (rows 97 + 97 + 97 + 96): the
    same greedy tokens as one device, through the shared-memory plan ring to three worker actors,
    with preemptions in a small KV pool. The code TP=8 runs too (issue 22)."""
    folder = make_checkpoint(tmp_path / "llama", "llama3", seed=4, vocab_size=387)
    ps = prompts(387, (1, 7, 23, 50))
    sections = dict(cache={"num_blocks": 40})
    want = LLM(tp_config(folder, 1, **sections)).generate(ps, GREEDY)
    llm = LLM(tp_config(folder, 4, **sections))
    group = llm.engine.workers
    assert group is not None and group.tp.size == 4 and len(group.worker_pids) == 3
    assert isinstance(group.sender, RingPlanSender)
    got = llm.generate(ps, GREEDY)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert [lp.logprob for lp in g.outputs[0].logprobs] == pytest.approx(
            [lp.logprob for lp in w.outputs[0].logprobs], abs=1e-4
        )
    assert llm.engine.stats().num_preemptions > 0
    for w, a in zip(want, llm.generate(ps, ARGMAX), strict=True):  # the keyed argmax over 4 vocab slices
        assert a.outputs[0].token_ids == w.outputs[0].token_ids
    llm.engine.shutdown()
    assert wait_until(lambda: gone(group.worker_pids), 10), "worker processes outlived shutdown"
    assert live_placement_groups() == []


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        # on two GPUs rank 0's GPU is left waiting in an all-reduce for the dead peer: the request must
        # still fail now, and shutdown must still end the group
        pytest.param("cuda", marks=[pytest.mark.gpu, two_gpus]),
    ],
)
def test_killed_worker_fails_in_flight_requests(ray_cluster: None, llama_kv2: Path, device: str) -> None:
    """On GPUs in a fresh process: rank 0's GPU stays busy in the dead peer's all-reduce (torch's one-shot
    kernel waits at its barrier with no timeout) until its process exits. Run in this one, it shared
    GPU 0 with every later test of the session (a TP=2 comparison after it failed once in three runs on
    two H100s, 2026-11-27)."""
    if device == "cuda":
        _gpu_check_in_a_fresh_process(["killed-worker", str(llama_kv2)])
        return
    killed_worker_fails_in_flight_requests(llama_kv2, device)


def killed_worker_fails_in_flight_requests(folder: Path, device: str) -> None:
    """Also run by parallel_gpu_checks.py (its own process, connected to the test's Ray cluster)."""
    llama_kv2 = folder
    model = {"max_model_len": 512, "device": device}
    if device == "cuda":
        model["dtype"] = "bfloat16"
    engine = AsyncEngine(tp_config(llama_kv2, 2, model=model, cache={"num_blocks": 160}))
    group = engine.engine.workers
    assert group is not None

    async def generate_then_kill() -> float:
        params = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
        stream = engine.generate([1, 2, 3], params)
        await stream.__anext__()
        ray.kill(group.actors[1])
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="worker rank 1 died"):
            async for _ in stream:
                pass
        return time.monotonic() - t0

    elapsed = asyncio.run(asyncio.wait_for(generate_then_kill(), timeout=30))
    assert elapsed < 10, f"the in-flight request took {elapsed:.1f} s to fail"
    assert not engine.healthy and not engine.engine.healthy

    async def new_request() -> None:
        async for _ in engine.generate([4, 5], SamplingParams(max_tokens=2)):
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(new_request())
    t0 = time.monotonic()
    engine.shutdown()
    engine.engine.shutdown()
    print(f"shutdown after the worker died took {time.monotonic() - t0:.1f} s on {device}")
    assert wait_until(lambda: gone(group.worker_pids), 10)
    assert live_placement_groups() == []


def test_worker_killed_while_idle_fails_next_step(ray_cluster: None, llama_kv2: Path) -> None:
    engine = LLMEngine(tp_config(llama_kv2, 2))
    group = engine.workers
    assert group is not None
    ray.kill(group.actors[1])
    assert wait_until(lambda: not engine.healthy, 10), "the watchdog did not notice the dead worker"
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4))
    t0 = time.monotonic()
    with pytest.raises(WorkerGroupError, match="worker rank 1 died"):
        engine.step()
    assert time.monotonic() - t0 < 1
    engine.shutdown()
    assert live_placement_groups() == []


def test_a_step_that_never_finishes_fails_the_group(ray_cluster: None, llama_kv2: Path) -> None:
    """Rank 0 waits for a step's device work at most step_timeout_s (a peer alive but stuck in a
    collective), then fails the group naming the collectives and which workers took the plan."""
    engine = LLMEngine(tp_config(llama_kv2, 2))
    group = engine.workers
    assert group is not None and group.step_timeout_s == 10  # half of init_timeout_s 20
    group.step_timeout_s = 0.2
    t0 = time.monotonic()
    with pytest.raises(
        WorkerGroupError, match=r"step did not finish on its GPU within 0.2 s.*every worker had"
    ):
        group.wait(lambda: False, "step")
    assert time.monotonic() - t0 < 5
    assert not engine.healthy
    engine.shutdown()
    assert wait_until(lambda: gone(group.worker_pids), 10)
    assert live_placement_groups() == []


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_idle_longer_than_the_collective_timeout(ray_cluster: None, llama_kv2: Path, transport: str) -> None:
    """An idle replica is normal: over gloo rank 0's heartbeats keep the workers' wait under its timeout;
    over shared memory the workers poll with sleeps, which end on nothing but a plan."""
    engine = LLMEngine(tp_config(llama_kv2, 2, parallel={"init_timeout_s": 5, "plan_transport": transport}))
    time.sleep(7)
    assert engine.healthy
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].finished and len(outputs[-1].token_ids) == 4
    engine.shutdown()


# ---- startup failures: fast, clear, nothing left behind ------------------------------------------
def test_worker_failing_at_startup_fails_fast(ray_cluster: None, llama_kv2: Path) -> None:
    from parallel_faulty_workers import RaisingWorker

    t0 = time.monotonic()
    with pytest.raises(WorkerGroupError, match="rank 1 failed to start.*cannot open its GPU"):
        WorkerGroup.start(tp_config(llama_kv2, 2), worker_cls=RaisingWorker)
    assert time.monotonic() - t0 < 15
    assert live_placement_groups() == []


def test_worker_failing_while_building_fails_engine(ray_cluster: None, llama_kv2: Path) -> None:
    from parallel_faulty_workers import FailingBuildWorker

    config = tp_config(llama_kv2, 2)
    t0 = time.monotonic()
    with pytest.raises(WorkerGroupError, match="startup: worker rank 1 raised RuntimeError.*out of memory"):
        LLMEngine(config, workers=WorkerGroup.start(config, worker_cls=FailingBuildWorker))
    assert time.monotonic() - t0 < 15, "should not wait for init_timeout_s"
    assert live_placement_groups() == []
    assert not torch.distributed.is_initialized()


def test_a_worker_that_cannot_map_the_plan_ring_fails_startup(
    ray_cluster: None, llama_kv2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker on rank 0's Ray node that does not see its /dev/shm cannot map the ring; startup fails
    fast and names the fix. Simulated by unlinking the ring right away."""
    create = PlanRing.create.__func__  # type: ignore[attr-defined]

    def create_then_unlink(cls: type, *args: Any, **kwargs: Any) -> PlanRing:
        ring = create(cls, *args, **kwargs)
        ring.unlink()
        return ring

    monkeypatch.setattr(PlanRing, "create", classmethod(create_then_unlink))
    t0 = time.monotonic()
    with pytest.raises(WorkerGroupError, match="cannot map rank 0's plan ring.*plan_transport: gloo"):
        LLMEngine(tp_config(llama_kv2, 2))
    assert time.monotonic() - t0 < 15, "should not wait for init_timeout_s"
    assert live_placement_groups() == []
    assert not torch.distributed.is_initialized()


def test_auto_takes_gloo_when_the_ring_cannot_be_made(
    ray_cluster: None, llama_kv2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan_transport auto: a /dev/shm without room means plans over gloo, not a failed replica; shm
    insists, and says why it cannot."""

    def full(cls: type, *args: Any, **kwargs: Any) -> PlanRing:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PlanRing, "create", classmethod(full))
    engine = LLMEngine(tp_config(llama_kv2, 2))
    assert engine.workers is not None and isinstance(engine.workers.sender, PlanSender)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.shutdown()
    with pytest.raises(WorkerGroupError, match="plan_transport is shm but creating it in /dev/shm failed"):
        LLMEngine(tp_config(llama_kv2, 2, parallel={"plan_transport": "shm"}))
    assert live_placement_groups() == []


def test_worker_that_never_joins_times_out(ray_cluster: None, llama_kv2: Path) -> None:
    from parallel_faulty_workers import StuckWorker

    config = tp_config(llama_kv2, 2, parallel={"init_timeout_s": 3})
    t0 = time.monotonic()
    with pytest.raises(WorkerGroupError, match=r"workers \[1\] did not start within 3 s"):
        WorkerGroup.start(config, worker_cls=StuckWorker)
    assert 3 <= time.monotonic() - t0 < 10
    assert live_placement_groups() == []


def test_unplaceable_group_times_out(ray_cluster: None, llama_kv2: Path) -> None:
    holder = ray.util.placement_group([{"CPU": 4}])  # everything the test cluster has
    assert holder.wait(10)
    try:
        t0 = time.monotonic()
        with pytest.raises(PlacementError, match="could not reserve 2 x .* within 2 s"):
            LLMEngine(tp_config(llama_kv2, 2, parallel={"init_timeout_s": 2}))
        assert time.monotonic() - t0 < 8
    finally:
        ray.util.remove_placement_group(holder)


def test_gpus_that_are_not_there(ray_cluster: None, llama_kv2: Path) -> None:
    with pytest.raises(PlacementError, match="needs a GPU but CUDA sees none"):
        LLMEngine(tp_config(llama_kv2, 2, model={"device": "cuda"}))
    with pytest.raises(PlacementError, match=r"needs 2 GPU \(the cluster has 0\)"):
        reserve_placement(2, True, "STRICT_PACK", 1)
    with pytest.raises(PlacementError, match="Ray gave it none"):
        check_gpu_visible("worker rank 1", False, "", [])
    check_gpu_visible("worker rank 1", True, "3", [3])  # visible: no error


def test_serve_replica_places_workers_in_its_bundles(ray_cluster: None, llama_kv2: Path) -> None:
    """Inside Serve: the replica's own placement group is used (no nested one), and without
    placement_group_bundles the error says what to configure."""
    from ray import serve

    config = tp_config(llama_kv2, 2)

    @serve.deployment(
        placement_group_bundles=placement_mod.rank_bundles(2, use_gpu=False),
        placement_group_strategy="STRICT_PACK",
        ray_actor_options={"num_cpus": 1},
    )
    class TPReplica:
        def __init__(self, config: FuserveConfig) -> None:
            self.engine = LLMEngine(config)

        def generate(self, prompt: list[int]) -> dict[str, Any]:
            self.engine.add_request(
                "r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            )
            tokens: list[int] = []
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    tokens = out.token_ids
            workers = self.engine.workers
            assert workers is not None
            return {"tokens": tokens, "owned": workers.placement.owned, "pids": workers.worker_pids}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class NoBundles:
        def place(self) -> str:
            try:
                reserve_placement(2, False, "STRICT_PACK", 1)
            except PlacementError as err:
                return str(err)
            return "no error"

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = LLM(tp_config(llama_kv2, 1)).generate([[3, 1, 4, 1, 5]], params)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        replica = serve.run(TPReplica.bind(config), name="tp", route_prefix=None)
        result = replica.generate.remote([3, 1, 4, 1, 5]).result(timeout_s=60)
        assert result["tokens"] == want[0].outputs[0].token_ids
        assert result["owned"] is False, "workers must go into the replica's bundles, not a new group"
        bare = serve.run(NoBundles.bind(), name="bare", route_prefix=None)
        message = bare.place.remote().result(timeout_s=60)
        assert "No current placement group found" in message and "placement_group_bundles" in message
    finally:
        serve.shutdown()
    # The replica died without engine.shutdown(): Ray ends its worker actors with it (no orphans).
    assert wait_until(lambda: gone(result["pids"]), 15)


# ---- GPU: two GPUs, NCCL, the one-shot all-reduce ------------------------------------------------


@pytest.mark.gpu
@two_gpus
def test_one_shot_all_reduce_matches_nccl() -> None:
    """Masked like Ray actors (each process sees one GPU as cuda:0): eager and inside a CUDA graph."""
    import torch.multiprocessing as mp
    from parallel_gpu_checks import check_all_reduce

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    mp.spawn(check_all_reduce, args=(2, _free_port(), gpus), nprocs=2, join=True)


@pytest.mark.gpu
@two_gpus
def test_tp2_matches_tp1_llama3_8b_shape(
    ray_cluster: None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Llama-3-8B layer shapes (2 layers, full vocab), random bf16 weights, CUDA graphs on: TP=2 greedy
    follows TP=1 until TP=1's own top-2 margin is within bf16 noise, for NCCL and the one-shot path.
    In a fresh process: this one may have set up symmetric memory already (the killed-worker test), and
    a second one-shot group in a process falls back to NCCL (one_shot_all_reduce.py)."""
    _compare_greedy_in_a_fresh_process(2, tmp_path, request)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
def test_tp4_matches_tp1_llama3_8b_shape(
    ray_cluster: None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same at TP=4, where `auto` sums with torch's two-shot kernel, and the row-parallel layers write
    their partials straight into its symmetric buffer (tp_context.SlotPartial)."""
    _compare_greedy_in_a_fresh_process(4, tmp_path, request)


def _compare_greedy_in_a_fresh_process(tp: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from checkpoints import make_random_llama
    from parallel_gpu_checks import LLAMA3_8B_SHAPE

    cache = getattr(request.config, "cache", None)  # the 3 GB checkpoint once per machine, if allowed
    folder = (cache.mkdir("tp-llama3-8b-shape") if cache is not None else tmp_path) / "l8b"
    if not (folder / "model.safetensors").exists():
        make_random_llama(folder, seed=5, **LLAMA3_8B_SHAPE)
    _gpu_check_in_a_fresh_process([f"compare-tp{tp}", str(folder)])


def _gpu_check_in_a_fresh_process(args: list[str]) -> None:
    """`python parallel_gpu_checks.py CHECK ARG RAY_ADDRESS LIMIT_S`, in this test's Ray cluster."""
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    script = str(Path(TESTS_DIR) / "parallel_gpu_checks.py")
    limit = os.environ.get("FUSERVE_GPU_CHECK_TIMEOUT_S", "270")  # the GPU script sets it under pytest's
    done = subprocess.run([sys.executable, script, *args, address, limit], capture_output=True, text=True)
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.mark.gpu
@two_gpus
def test_second_one_shot_group_in_a_process_takes_nccl(ray_cluster: None, llama_kv2: Path) -> None:
    """torch pairs a process's symmetric memory with fresh workers only once: a second one-shot group
    formed here (the killed-worker test may have formed the first) must start on NCCL within seconds and
    give the same tokens, not wait in the store until its timeout (the hang of 2026-11-23/25)."""
    from fuserve.parallel import one_shot_all_reduce

    config = tp_config(
        llama_kv2, 2, model={"device": "cuda", "dtype": "bfloat16"}, parallel={"init_timeout_s": 60}
    )
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    second = False
    while not second:  # one formation if this process already has symmetric memory, else two
        second = one_shot_all_reduce._rendezvous_started
        t0 = time.monotonic()
        llm = LLM(config)
        assert time.monotonic() - t0 < 45, "startup waited toward its timeout"
        group = llm.engine.workers
        assert group is not None
        assert (group.tp.fast_all_reduce is None) == second
        tokens = llm.generate([[3, 1, 4, 1, 5]], params)[0].outputs[0].token_ids
        assert len(tokens) == 8  # that each path computes right: test_tp2_matches_tp1_llama3_8b_shape
        llm.engine.shutdown()
    assert live_placement_groups() == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
