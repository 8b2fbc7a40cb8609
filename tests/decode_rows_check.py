"""What the GPU's decode graphs run for a verify step (a decode row per token, each with its own context
length) checked against the varlen path, on the steps of a CPU run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.step_plan import StepPlan


def check_decode_rows(runner: ModelRunner, which: Callable[[StepPlan], bool] = lambda _: True) -> list[int]:
    """Wraps the runner's forward: every step that `which` picks and that has decode rows runs again as
    them (writing the same K/V to the same slots) and must give the same hidden states. Returns the
    checked steps' row counts, filled as the run goes."""
    forward = runner.forward_plan
    checked: list[int] = []

    def both(plan: StepPlan, prev: torch.Tensor | None = None) -> torch.Tensor | None:
        hidden = forward(plan, prev)
        rows = plan.as_decode_rows()
        if rows is not None and hidden is not None and which(plan):
            again = forward(rows, prev)
            assert again is not None
            torch.testing.assert_close(again, hidden, rtol=1e-4, atol=1e-4)
            checked.append(len(rows.context_lens))
        return hidden

    runner.forward_plan = both  # type: ignore[method-assign]
    return checked
