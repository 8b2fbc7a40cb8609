"""The engine-core process: the engine loop alone in its own process, fed and drained over ZMQ.

    frontend --AddRequest/AbortRequest (ipc PUSH)--> [input thread: decode] --queue--> loop
    loop: apply inputs -> engine.step() -> StepOutputs --queue--> [output thread: encode, send]
                                                                   --(ipc PUSH)--> frontend
    (several frontend processes: one socket pair each; each step's outputs split by the process that
    sent the request, workers/output_routing.py)

Why a process of its own: in the replica process the engine loop shared one GIL with uvicorn, the
SSE writers and Serve's own machinery, and every request's Python work stretched the step (vLLM v1
and SGLang split it out for the same reason). Why IO threads: decoding inputs and encoding the
step's one output message happen while the main thread waits on the GPU, not on its path.

The process is spawned (never forked: a forked CUDA context is unusable), starts with no CUDA state
of the frontend's, and exits on Shutdown, when the frontend's process goes away, or after sending
CoreDead when the engine fails.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import traceback
from dataclasses import dataclass

import msgspec
import zmq

from fuserve.configs import FuserveConfig
from fuserve.core_messages import (
    AbortRequest,
    AddRequest,
    Attach,
    CoreDead,
    CoreInput,
    CoreReady,
    CoreStats,
    Detach,
    RequestFailure,
    SeqOutput,
    Shutdown,
    StepOutputs,
    input_decoder,
)
from fuserve.gc_tuning import quiet_gc
from fuserve.workers.engine import LLMEngine
from fuserve.workers.kernels.compile_watch import watch_compiles
from fuserve.workers.output_routing import OutputRouting
from fuserve.workers.outputs import RequestOutput

IDLE_POLL_S = 0.5  # an idle loop wakes this often to notice a vanished frontend
_STOP = object()


@dataclass
class RayPlacement:
    """Where the replica sits in Ray. Its engine core is no Ray worker, so for tensor parallelism it
    joins the cluster as a driver of its own and starts ranks 1..N-1 in the replica's placement group
    (Serve reserved one bundle per rank for it). The workers belong to that driver's job, so they end
    when the engine core does."""

    address: str
    namespace: str
    placement_group_id: str | None
    app_name: str | None = None  # the Serve app the replica belongs to (its draft deployment's too)


def replica_placement() -> RayPlacement | None:
    """Called in the frontend: the facts its engine core needs to place tensor-parallel workers."""
    import ray
    from ray.util.placement_group import get_current_placement_group

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    group = get_current_placement_group()
    try:
        from ray import serve

        app_name: str | None = serve.get_replica_context().app_name
    except Exception:  # not in a Serve replica
        app_name = None
    return RayPlacement(
        ctx.gcs_address, ctx.namespace, group.id.hex() if group is not None else None, app_name
    )


def build_engine(config: FuserveConfig, placement: RayPlacement | None) -> LLMEngine:
    proposer = None
    if config.speculative.deploys_draft:  # else the engine builds an in-engine draft itself
        from fuserve.speculative.draft_factory import build_draft_proposer  # it imports this module

        proposer = build_draft_proposer(config, placement)
    if config.parallel.tensor_parallel_size == 1 or placement is None:
        # tensor parallel without Ray placement: offline start
        return LLMEngine(config, detokenize=False, proposer=proposer)
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    from fuserve.parallel.worker_group import WorkerGroup

    if not ray.is_initialized():  # the draft proposer may have joined already
        ray.init(address=placement.address, namespace=placement.namespace, log_to_driver=False)
    group = None
    if placement.placement_group_id is not None:
        group = PlacementGroup(PlacementGroupID.from_hex(placement.placement_group_id))
    workers = WorkerGroup.start(config, placement_group=group)
    return LLMEngine(config, workers=workers, detokenize=False, proposer=proposer)


def seq_output(out: RequestOutput) -> SeqOutput:
    return SeqOutput(
        request_id=out.request_id,
        index=out.index,
        token_ids=out.delta_token_ids,
        finish_reason=out.finish_reason if out.finished else None,
        logprobs=out.delta_logprobs,
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
    )


class EngineCore:
    """The loop over one LLMEngine; inputs and outputs cross thread-safe queues. Each output is
    (frontend index, message): with one frontend process everything goes to index 0 untouched."""

    def __init__(self, engine: LLMEngine, parent_pid: int, num_frontends: int = 1) -> None:
        self.engine = engine
        self.parent_pid = parent_pid
        self.inputs: queue.Queue = queue.Queue()
        self.outputs: queue.Queue = queue.Queue()
        self.routing = OutputRouting(num_frontends) if num_frontends > 1 else None

    def frontend_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def _apply(self, item: CoreInput, failures: list[RequestFailure]) -> bool:
        """One input; False for Shutdown."""
        engine, routing = self.engine, self.routing
        if isinstance(item, AddRequest):
            if routing is not None:
                routing.add(item.request_id, item.frontend)
            try:
                engine.add_request(item.request_id, item.prompt_token_ids, item.params, item.arrival_time)
            except Exception as err:  # a bad request fails alone
                failures.append(RequestFailure(item.request_id, str(err)))
        elif isinstance(item, AbortRequest):
            engine.abort(item.request_id, item.indices)
            if routing is not None and not engine.has_request(item.request_id):
                routing.forget(item.request_id)
        elif isinstance(item, Attach):
            if routing is not None:
                routing.attach(item.frontend)
        elif isinstance(item, Detach):
            if routing is not None:
                for rid in routing.detach(item.frontend):
                    engine.abort(rid)
        else:  # Shutdown
            return False
        return True

    def _put(self, outs: list[RequestOutput], failures: list[RequestFailure], stats: CoreStats) -> None:
        seqs = [seq_output(o) for o in outs]
        if self.routing is None:
            self.outputs.put((0, StepOutputs(seqs, failures, stats)))
        else:
            for part in self.routing.split(seqs, failures, stats, self.engine.has_request):
                self.outputs.put(part)

    def run(self) -> None:
        engine = self.engine
        while True:
            failures: list[RequestFailure] = []
            busy = engine.has_unfinished()
            items = []
            if not busy:  # nothing to step: sleep until an input comes
                try:
                    items.append(self.inputs.get(timeout=IDLE_POLL_S))
                except queue.Empty:
                    pass
            while True:
                try:
                    items.append(self.inputs.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if not self._apply(item, failures):
                    return
            if not self.frontend_alive():  # no one to serve: never outlive the replica
                return
            outs = engine.step() if engine.has_unfinished() else []
            failures += [RequestFailure(rid, why) for rid, why in engine.take_failures()]
            if outs or failures or items:  # items alone (aborts): the frontends should see the freed blocks
                self._put(outs, failures, engine.stats())


def _read_inputs(socket: zmq.Socket, into: queue.Queue) -> None:
    decoder = input_decoder()
    try:
        while True:
            msg = decoder.decode(socket.recv())
            into.put(msg)
            if isinstance(msg, Shutdown):
                return
    except zmq.ContextTerminated:
        pass
    finally:
        socket.close(linger=0)


def _exit(ctx: zmq.Context, out_socks: list[zmq.Socket], code: int) -> None:
    """Lets the last message (CoreDead, say) leave before the process does, but never waits long."""
    for sock in out_socks:
        sock.close(linger=2000)
    closer = threading.Thread(target=ctx.term, daemon=True)
    closer.start()
    closer.join(timeout=3)
    os._exit(code)


def _write_outputs(sockets: list[zmq.Socket], source: queue.Queue) -> None:
    """(index, message) to that frontend's socket; index None: to every frontend (CoreDead)."""
    encoder = msgspec.msgpack.Encoder()
    buf = bytearray()
    while True:
        item = source.get()
        if item is _STOP:
            return
        index, msg = item
        encoder.encode_into(msg, buf)
        for sock in sockets if index is None else (sockets[index],):
            sock.send(buf, copy=True)


def _report_compile(kernel: str, seconds: float) -> None:
    print(
        f"fuserve engine core: a kernel compiled while serving ({seconds:.2f} s): {kernel}", file=sys.stderr
    )


def run_engine_core(
    config_json: str,
    input_addrs: list[str],
    output_addrs: list[str],
    parent_pid: int,
    placement: RayPlacement | None,
) -> None:
    """The spawned process's entry point: one (input, output) address pair per frontend process, the
    replica's own first. Ctrl-C reaches the whole process group; the frontend decides when this process
    ends (after draining), so SIGINT is ignored here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    out_socks = []
    for addr in output_addrs:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDHWM, 0)  # a lagging frontend must never stall the engine loop's writer
        sock.connect(addr)
        out_socks.append(sock)
    in_sock = ctx.socket(zmq.PULL)  # fair-queued across the frontends
    for addr in input_addrs:
        in_sock.connect(addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        engine = build_engine(FuserveConfig.model_validate_json(config_json), placement)
    except BaseException as err:
        traceback.print_exc()
        dead = CoreDead(f"the engine failed to start: {type(err).__name__}: {err}")
        out_socks[0].send(encoder.encode(dead))
        in_sock.close(linger=0)
        _exit(ctx, out_socks, 1)
    quiet_gc()
    core = EngineCore(engine, parent_pid, len(output_addrs))
    watch_compiles(_report_compile)
    gen = engine.generation
    out_socks[0].send(
        encoder.encode(
            CoreReady(
                model_name=engine.model_name,
                max_model_len=engine.max_model_len,
                block_size=engine.config.cache.block_size,
                has_tokenizer=engine.tokenizer is not None,
                sampling_defaults=dict(gen.sampling_defaults),
                default_max_tokens=gen.max_new_tokens,
                pid=os.getpid(),
                stats=engine.stats(),
            )
        )
    )
    threading.Thread(target=_read_inputs, args=(in_sock, core.inputs), daemon=True, name="core-in").start()
    writer = threading.Thread(target=_write_outputs, args=(out_socks, core.outputs), name="core-out")
    writer.start()
    code = 0
    try:
        core.run()
    except BaseException as err:
        traceback.print_exc()
        core.outputs.put((None, CoreDead(f"the engine failed and stopped: {type(err).__name__}: {err}")))
        code = 1
    core.outputs.put(_STOP)
    writer.join(timeout=5)
    try:
        engine.shutdown()
    finally:
        _exit(ctx, out_socks, code)
