"""Which frontend process each request came from, and each one's share of a step's outputs.

A replica with several frontend processes (`serve.frontend_processes`) shares one engine core: every
process sends its requests with its index, and each step's outputs are split so that a process gets
only its own streams' tokens, plus the engine's stats. Pure Python over plain data: the engine core
keeps one of these, and tests drive it without a model.
"""

from __future__ import annotations

from collections.abc import Callable

from fuserve.core_messages import CoreStats, RequestFailure, SeqOutput, StepOutputs


class OutputRouting:
    def __init__(self, num_frontends: int) -> None:
        self.num_frontends = num_frontends
        self.attached = [i == 0 for i in range(num_frontends)]  # index 0 is the replica's own, from the start
        self._owner: dict[str, int] = {}

    def add(self, request_id: str, frontend: int) -> None:
        self._owner[request_id] = frontend

    def forget(self, request_id: str) -> None:
        self._owner.pop(request_id, None)

    def attach(self, frontend: int) -> None:
        if 0 < frontend < self.num_frontends:
            self.attached[frontend] = True

    def detach(self, frontend: int) -> list[str]:
        """Stops sending to `frontend`; returns its requests, which the core then aborts."""
        if 0 < frontend < self.num_frontends:
            self.attached[frontend] = False
        gone = [rid for rid, f in self._owner.items() if f == frontend]
        for rid in gone:
            del self._owner[rid]
        return gone

    def __len__(self) -> int:
        return len(self._owner)

    def split(
        self,
        outputs: list[SeqOutput],
        failures: list[RequestFailure],
        stats: CoreStats,
        live: Callable[[str], bool],
    ) -> list[tuple[int, StepOutputs]]:
        """One message per attached frontend (the stats go to all of them). `live(request_id)`: whether
        the engine still holds the request, asked when one of its sequences finishes, so the map
        forgets each request as it ends. Outputs of requests nobody owns (aborted while the step ran)
        are dropped: their stream is gone."""
        parts: list[list[SeqOutput]] = [[] for _ in range(self.num_frontends)]
        failed: list[list[RequestFailure]] = [[] for _ in range(self.num_frontends)]
        owner = self._owner
        for out in outputs:
            f = owner.get(out.request_id)
            if f is None:
                continue
            parts[f].append(out)
            if out.finish_reason is not None and not live(out.request_id):
                del owner[out.request_id]
        for failure in failures:
            f = owner.pop(failure.request_id, None)
            if f is not None:
                failed[f].append(failure)
        frontends = [f for f in range(self.num_frontends) if self.attached[f]]
        return [(f, StepOutputs(parts[f], failed[f], stats)) for f in frontends]
