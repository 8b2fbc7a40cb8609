"""Where an engine's wall time goes, by phase of its step loop: for a benchmark row, the host's seconds in
each of the engine's calls (speculation's round, the scheduler, the plan, the launch, the read-back's
processing), the seconds it waited for the device, and the device's busy seconds, so that the time the GPU
sat idle is put on the host work that kept it waiting.

Bench-only: the methods are wrapped on the instances (and `build_step_plan` in the engine's module) for the
timed window and restored after, so that the engine carries no timers of its own."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import fuserve.workers.engine as engine_module
from fuserve.workers.engine import LLMEngine
from fuserve.workers.sampler import SampledBatch

# calls inside the phases (the launch's parts; the wait for a draft's pending reply, in the read-back under
# synthetic acceptance or in propose_behind), timed apart and not added to the loop's phases
NESTED = "in."
DRAFT_WAIT = NESTED + "collect_pending"


class PhaseTimes:
    """`with PhaseTimes(engine) as phases:` ... then `phases.report(tokens)`: ms a token by phase."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._restore: list[Callable[[], None]] = []

    def _wrap(
        self,
        owner: Any,
        attr: str,
        label: str,
        kind: Callable[[tuple[Any, ...]], str] | None = None,
        waited: Callable[[], float] | None = None,
    ) -> None:
        """Time `owner.attr`; `kind(args)` splits the label by the call's kind (a verify step or not);
        `waited()`, a running total of seconds spent waiting for the device, is taken out of each call
        and kept apart as `<label>_wait`, and so is the time inside it spent waiting for a draft's reply
        (`collect_pending`), as `<label>_draft`: that is the draft's time, not this host's."""
        original = getattr(owner, attr)
        seconds, calls = self.seconds, self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            name = label if kind is None else f"{label}_{kind(args)}"
            w0 = waited() if waited is not None else 0.0
            d0 = seconds.get(DRAFT_WAIT, 0.0)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                if waited is not None:
                    wait = waited() - w0
                    spent -= wait
                    seconds[name + "_wait"] = seconds.get(name + "_wait", 0.0) + wait
                draft = seconds.get(DRAFT_WAIT, 0.0) - d0
                if draft > 0.0 and name != DRAFT_WAIT:
                    spent -= draft
                    seconds[name + "_draft"] = seconds.get(name + "_draft", 0.0) + draft
                seconds[name] = seconds.get(name, 0.0) + spent
                calls[name] = calls.get(name, 0) + 1

        own = isinstance(owner, type) or owner is engine_module or attr in vars(owner)
        setattr(owner, attr, timed)
        if own:  # a class's, a module's, or an instance's own attribute: put back as it was
            self._restore.append(lambda: setattr(owner, attr, original))
        else:  # the instance's wrapper goes: its class's method shows through again
            self._restore.append(lambda: delattr(owner, attr))

    def __enter__(self) -> PhaseTimes:
        try:
            self._install()
        except BaseException:
            self._undo()
            raise
        e = self.engine
        self._before = (
            e.step_seconds_total,
            e.device_wait_seconds_total,
            e.device_busy_seconds_total,
            time.perf_counter(),
        )
        return self

    def _undo(self) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()

    def _install(self) -> None:
        """The wrappers. `SampledBatch.start_copy` is wrapped on its class: every engine and draft of the
        process counts there; the guided path's split launch (`executor.forward`, `sample`) is not timed
        (its time shows as unaccounted)."""
        e = self.engine
        self._wrap(
            e,
            "_complete",
            "complete",
            lambda a: "verify" if a[0][0].has_drafts else "plain",
            lambda: e.device_wait_seconds_total,
        )
        self._wrap(e.scheduler, "schedule", "schedule")
        self._wrap(engine_module, "build_step_plan", "plan")
        self._wrap(e.executor, "execute", "launch", _launch_kind)
        runner = getattr(getattr(e.executor, "worker", None), "runner", None)
        if runner is not None:  # one device: the launch's parts
            self._wrap(runner, "forward_plan", NESTED + "forward")
            for graphs in (runner.graphs, runner.mixed_graphs):
                if graphs is not None:
                    self._wrap(graphs, "run", NESTED + "graph_run")
            self._wrap(runner.model, "greedy_tokens", NESTED + "greedy")
            self._wrap(runner.model, "compute_logits", NESTED + "logits")
            self._wrap(runner.sampler, "sample", NESTED + "sampler")
            self._wrap(SampledBatch, "start_copy", NESTED + "start_copy")
        if e.speculation is not None:
            for attr in ("propose", "propose_behind", "redraft_missed", "wants_drafts"):
                self._wrap(e.speculation, attr, attr)
            self._wrap(e.speculation, "collect_pending", DRAFT_WAIT)

    def __exit__(self, *exc: object) -> None:
        e = self.engine
        step0, wait0, busy0, t0 = self._before
        self.wall_s = time.perf_counter() - t0
        self.step_s = e.step_seconds_total - step0
        self.wait_s = e.device_wait_seconds_total - wait0
        self.busy_s = e.device_busy_seconds_total - busy0
        self._undo()

    def report(self, tokens: int) -> dict[str, float]:
        """ms a token of `tokens`, every sequence's together (at batch B, B times fewer than a sequence's
        ms a token): each phase's host time (the read-back's without its wait, which is kept apart by the
        kind of step read back, and each without its waits for the draft: `_draft`), the parts of the
        launch, the wait for the device, the device's busy time and its idle time (wall less busy), and
        the step loop's time no phase holds."""
        per = 1e3 / max(tokens, 1)
        phases = {
            k: v
            for k, v in self.seconds.items()
            if not k.startswith(NESTED) and not k.endswith(("_wait", "_draft"))
        }
        drafts = sum(v for k, v in self.seconds.items() if k.endswith("_draft"))
        out = {f"{name}_ms": s * per for name, s in self.seconds.items()}
        out.update(
            device_wait_ms=self.wait_s * per,
            device_busy_ms=self.busy_s * per,
            device_idle_ms=max(self.wall_s - self.busy_s, 0.0) * per,
            step_ms=self.step_s * per,
            draft_wait_ms=drafts * per,
            unaccounted_ms=max(self.step_s - self.wait_s - drafts - sum(phases.values()), 0.0) * per,
            wall_ms=self.wall_s * per,
        )
        out.update({f"{name}_calls": float(n) for name, n in self.calls.items()})
        return out


def _launch_kind(args: tuple[Any, ...]) -> str:
    """A launched plan's kind: a verify step (drafts), one with prompt tokens, or a plain decode."""
    plan = args[0]
    if any(plan.num_drafts):
        return "verify"
    return "prompt" if plan.max_query_len > 1 else "plain"
