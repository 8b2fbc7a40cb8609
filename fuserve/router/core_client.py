"""The frontend's side of the engine core: spawn it, feed it, and fan its step messages out to streams.

    EngineCoreClient(config, tokenizer).start()      spawn the engine-core process, wait for CoreReady
    async for deltas in client.generate(request):    AddRequest out; this request's deltas in
    (leaving the loop early sends AbortRequest: the engine frees the request's KV blocks)

One task reads the core's messages, one per engine step for all sequences, and appends each
sequence's output to its stream's pending list. A stream's consumer takes everything pending at
once, so a client that keeps up gets each step's tokens as they come, and one that falls behind
gets them merged into fewer, larger deltas; nothing waits on a timer. Text is made here, off the
engine loop: incremental detokenization, and stop strings, which end a sequence with an abort sent
to the core. The core's death (its process gone, or CoreDead) ends every stream with
EngineDeadError at once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

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
    EngineDeadError,
    SeqOutput,
    Shutdown,
    StepOutputs,
    output_decoder,
)
from fuserve.process_liveness import pid_alive
from fuserve.router.engine_messages import EngineDelta, EngineRequest
from fuserve.sampling_params import RequestError
from fuserve.workers.detokenizer import IncrementalDetokenizer
from fuserve.workers.tokenizer import Tokenizer


@dataclass
class _Seq:
    detok: IncrementalDetokenizer | None
    finished: bool = False


@dataclass
class _Stream:
    """One request's outputs between the core's messages and its consumer. The consumer waits on a bare
    future (an asyncio.Event costs a lock-free but not free loop lookup and a future per wait anyway:
    ~6% of the frontend's CPU at 64 streams, py-spy on the CPU box, 2026-11-26)."""

    request_id: str
    seqs: list[_Seq]
    pending: list[SeqOutput | BaseException] = field(default_factory=list)
    received_at: float = 0.0  # when the last message for it arrived
    started: bool = False  # the core's messages have held output for it before
    waiter: asyncio.Future | None = None

    def put(self, item: SeqOutput | BaseException, received_at: float) -> None:
        self.pending.append(item)
        self.received_at = received_at
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[SeqOutput | BaseException]:
        """What has arrived since the last take, waiting for something if nothing has."""
        if not self.pending:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.pending = self.pending, []
        return items


def _merge(outputs: list[SeqOutput]) -> list[SeqOutput]:
    """Several steps' outputs of one sequence become one (the consumer fell behind)."""
    by_index: dict[int, SeqOutput] = {}
    for out in outputs:
        seen = by_index.get(out.index)
        if seen is None:
            by_index[out.index] = SeqOutput(
                out.request_id,
                out.index,
                list(out.token_ids),
                out.finish_reason,
                list(out.logprobs),
                out.num_prompt_tokens,
                out.num_cached_tokens,
            )
        else:
            seen.token_ids.extend(out.token_ids)
            seen.logprobs.extend(out.logprobs)
            seen.finish_reason = out.finish_reason
            seen.num_cached_tokens = max(seen.num_cached_tokens, out.num_cached_tokens)
    return list(by_index.values())


def core_addresses(directory: str, num_frontends: int) -> list[tuple[str, str]]:
    """Each frontend process's (input, output) ipc addresses, the replica's own first."""
    return [(f"ipc://{directory}/in{i}", f"ipc://{directory}/out{i}") for i in range(num_frontends)]


class EngineCoreClient:
    """One frontend process's channel to the engine core. The replica's own (`frontend` 0) spawns the
    core and owns its lifetime; the replica's other frontend processes (frontend_processes.py) attach to
    the running core (`attach_to`)."""

    def __init__(
        self,
        config: FuserveConfig,
        tokenizer: Tokenizer | None,
        replica_id: str = "local",
        *,
        num_frontends: int = 1,
        attach_to: tuple[int, str, CoreReady, int] | None = None,
    ) -> None:
        """`attach_to`: (this frontend's index, the core's socket directory, its CoreReady, its pid)."""
        self.config = config
        self.tokenizer = tokenizer
        self.replica_id = replica_id
        self.info: CoreReady | None = None
        self.stats = CoreStats()
        self.error: str | None = None
        self._streams: dict[str, _Stream] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._closing = False
        self._reader: asyncio.Task | None = None
        self.index = 0 if attach_to is None else attach_to[0]
        self._owns_dir = attach_to is None
        self._dir = tempfile.mkdtemp(prefix="fuserve-core-") if attach_to is None else attach_to[1]
        self.addresses = core_addresses(self._dir, num_frontends if attach_to is None else self.index + 1)
        in_addr, out_addr = self.addresses[self.index]
        self._sync_ctx = zmq.Context()
        self._to_core = self._sync_ctx.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.LINGER, 0)
        self._to_core.setsockopt(zmq.SNDHWM, 0)  # a burst of requests is queued, never refused here
        self._to_core.bind(in_addr)
        self._ctx = zmq.asyncio.Context()
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.setsockopt(zmq.LINGER, 0)
        self._from_core.bind(out_addr)
        self.process: multiprocessing.process.BaseProcess | None = None
        self._core_pid: int | None = None
        if attach_to is not None:
            _, _, self.info, self._core_pid = attach_to
            self.stats = self.info.stats
            return
        from fuserve.workers.engine_core import replica_placement, run_engine_core

        # the engine core joins Ray for tensor-parallel workers, or to find its draft deployment
        needs_ray = config.parallel.tensor_parallel_size > 1 or config.speculative.deploys_draft
        placement = replica_placement() if needs_ray else None
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(
                config.model_dump_json(),
                [a[0] for a in self.addresses],
                [a[1] for a in self.addresses],
                os.getpid(),
                placement,
            ),
            name="fuserve-engine-core",
            daemon=True,
        )
        self.process.start()

    @property
    def socket_dir(self) -> str:
        """Where the core's ipc sockets live: an attaching frontend process binds its pair there."""
        return self._dir

    @property
    def core_pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._core_pid

    async def start(self, timeout_s: float) -> CoreReady:
        """Waits for the engine to load its model and report; a core that dies or stalls fails here.
        An attached frontend says it is listening, and watches the core's process by its pid."""
        loop = asyncio.get_running_loop()
        if self.process is None:
            assert self.info is not None and self._core_pid is not None
            deadline = time.monotonic() + timeout_s
            while True:  # a bound PUSH refuses until the core's reconnect (~100 ms) finds this socket
                try:
                    self._send(Attach(self.index))
                    break
                except zmq.Again:
                    if time.monotonic() > deadline or not pid_alive(self._core_pid):
                        raise EngineDeadError(
                            f"the engine core (pid {self._core_pid}) did not connect to frontend "
                            f"{self.index} within {timeout_s:g} s"
                        ) from None
                    await asyncio.sleep(0.01)
            self._watch_pid(self._core_pid)
            self._reader = loop.create_task(self._read_outputs())
            return self.info
        decoder = output_decoder()
        deadline = time.monotonic() + timeout_s
        while self.info is None:
            if not self.process.is_alive():
                raise EngineDeadError(
                    f"the engine-core process exited with code {self.process.exitcode} while starting; "
                    "its log (the replica's stderr) says why"
                )
            if time.monotonic() > deadline:
                self.shutdown(timeout_s=1)
                raise EngineDeadError(f"the engine did not start within {timeout_s:g} s")
            try:
                msg = decoder.decode(await asyncio.wait_for(self._from_core.recv(), 0.5))
            except asyncio.TimeoutError:
                continue
            if isinstance(msg, CoreDead):
                self.shutdown(timeout_s=1)
                raise EngineDeadError(msg.error)
            if isinstance(msg, CoreReady):
                self.info, self.stats = msg, msg.stats
        loop.add_reader(self.process.sentinel, self._on_process_exit)
        self._reader = loop.create_task(self._read_outputs())
        return self.info

    def _watch_pid(self, pid: int) -> None:
        """A process that is not our child: a pidfd becomes readable when it exits (Linux 5.3+)."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here, or the core is already gone
            if not pid_alive(pid):
                self._fail_all(f"the engine-core process (pid {pid}) is gone")
            return
        loop = asyncio.get_running_loop()

        def gone() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            if not self._closing:
                self._fail_all(f"the engine-core process (pid {pid}) exited")

        loop.add_reader(fd, gone)

    def detach(self, frontend: int) -> None:
        """The replica's own frontend tells the core that another frontend process is gone."""
        if self.healthy:
            self._send(Detach(frontend))

    @property
    def healthy(self) -> bool:
        alive = self.process is None or self.process.is_alive()  # attached: the core's exit sets `error`
        return self.error is None and self.info is not None and alive

    # ---- requests ---------------------------------------------------------------------------------
    def _send(self, msg: CoreInput) -> None:
        self._to_core.send(self._encoder.encode(msg), flags=zmq.NOBLOCK)

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineDelta]]:
        """Deltas of this request's n sequences until all finish. Raises RequestError if the engine
        refused the request, EngineDeadError if the engine stopped."""
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running: {self.error or 'stopped'}")
        rid, params = request.request_id, request.params
        if rid in self._streams:
            raise RequestError(f"request id {rid!r} is already in use")
        seqs = [
            _Seq(
                IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
                if self.tokenizer is not None
                else None
            )
            for _ in range(params.n)
        ]
        stream = _Stream(rid, seqs)
        self._streams[rid] = stream
        self._send(AddRequest(rid, request.prompt_token_ids, params, time.monotonic(), self.index))
        try:
            unfinished = len(seqs)
            while unfinished:
                items = await stream.take()
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                outputs = _merge(items) if len(items) > 1 else items  # type: ignore[arg-type]
                deltas = []
                for out in outputs:
                    delta = self._delta(stream, out)  # type: ignore[arg-type]
                    if delta is not None:
                        deltas.append(delta)
                        unfinished -= delta.finished
                if deltas:
                    yield deltas
        finally:
            self._streams.pop(rid, None)
            if not all(s.finished for s in seqs) and self.healthy:
                self._send(AbortRequest(rid))

    def fail(self, request_id: str, err: BaseException) -> None:
        """Ends the request's stream with `err` (its deadline passed); leaving the stream aborts it."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(err, time.perf_counter())

    def _delta(self, stream: _Stream, out: SeqOutput) -> EngineDelta | None:
        seq = stream.seqs[out.index]
        if seq.finished:  # a stop string ended it; the core's last steps for it arrive late
            return None
        finish = out.finish_reason
        text = ""
        token_ids = out.token_ids
        if seq.detok is not None:
            before = len(seq.detok.ids)
            seq.detok.add(token_ids)
            if seq.detok.stopped:
                if finish is None:  # the core still runs it
                    self._send(AbortRequest(stream.request_id, [out.index]))
                # the stop string came before wherever the core ended it: outputs merged for a consumer
                # that fell behind can hold both
                finish = "stop"
                # a step may carry several tokens (speculation), a merge several steps: none after the stop
                token_ids = token_ids[: len(seq.detok.ids) - before]
            text = seq.detok.flush(final=finish is not None)
        seq.finished = finish is not None
        return EngineDelta(
            index=out.index,
            text=text,
            token_ids=token_ids,
            finished=seq.finished,
            finish_reason=finish,
            logprobs=out.logprobs,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            replica_id=self.replica_id,
            received_at=stream.received_at,
        )

    # ---- the core's messages --------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        """A failure here would leave every stream waiting forever: it fails them instead."""
        try:
            await self._fan_out()
        except asyncio.CancelledError:
            return
        except Exception as err:  # a closed socket at shutdown, or a bug
            if not self._closing:
                self._fail_all(f"the frontend lost the engine's output: {type(err).__name__}: {err}")

    async def _fan_out(self) -> None:
        decoder = output_decoder()
        streams = self._streams
        while True:
            msg = decoder.decode(await self._from_core.recv())
            now = time.perf_counter()
            if isinstance(msg, StepOutputs):
                self.stats = msg.stats
                # First tokens are woken first: the request's task then writes its response's start at
                # the head of the loop's next pass, not behind every other stream's token (sse_response.py).
                later: list[tuple[_Stream, SeqOutput]] = []
                for out in msg.outputs:
                    stream = streams.get(out.request_id)
                    if stream is None:
                        continue
                    if stream.started:
                        later.append((stream, out))
                    else:
                        stream.started = True
                        stream.put(out, now)
                for stream, out in later:
                    stream.put(out, now)
                for failure in msg.failures:
                    stream = streams.get(failure.request_id)
                    if stream is not None:
                        stream.put(RequestError(failure.message), now)
            elif isinstance(msg, CoreDead):
                self._fail_all(msg.error)
                return

    def _on_process_exit(self) -> None:
        assert self.process is not None
        asyncio.get_running_loop().remove_reader(self.process.sentinel)
        if not self._closing:
            self.process.join(timeout=1)
            self._fail_all(
                f"the engine-core process (pid {self.process.pid}) exited with code {self.process.exitcode}"
            )

    def _fail_all(self, error: str) -> None:
        if self.error is None:
            self.error = error
        now = time.perf_counter()
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError(error), now)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Asks the core to stop, then makes sure it has: no process outlives the replica. An attached
        frontend only closes its sockets: the core is the replica's own frontend's to end."""
        if self._closing:
            return
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
        if self.process is not None:
            try:
                if self.process.is_alive():
                    self._send(Shutdown())
            except zmq.ZMQError:
                pass
            self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._sync_ctx.term()
        self._ctx.term()
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
