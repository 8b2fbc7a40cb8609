"""A plain step planned behind a verify step, before the verify is read back.

A lone sequence verifying drafts leaves the GPU idle from the verify's end until the host has read it
back, sent the draft its next round and launched the next step: ~0.3-0.5 ms a verify on an H200 host
(benchmarks/NOTES.md). The next step is nearly always a plain step (the draft cannot have drafted past
a rejected draft), and what it computes is known on the host up to one number, the drafts kept, a:

    verify   rows at positions p .. p + k, inputs [last, d1 .. dk] -> row tokens t0 .. tk
    kept     t0 .. ta, a = the drafts in a row with d(j+1) == tj       (rejection.accepted_run)
    plain    input ta at position p + 1 + a, its slot through the block table, context p + 2 + a

so the plain step is launched with its one row found on the device from the verify's row tokens (`select`),
and the host reads the verify back while it runs. Exact for any outcome, a = k included; only greedy rows
(a seeded draw keys on the row's place in the output, unknown here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fuserve.workers.cuda_graphs import StepInputs


@dataclass
class BehindVerify:
    """What the plain step's one row needs from the verify in flight: where the sequence's rows start in
    its tokens, the drafts they verify, and the position after the verify's first row. `kept`: the drafts
    kept where the host knows it before the read-back (a benchmark's synthetic acceptance), else -1."""

    first_row: int
    drafts: list[int]
    position: int
    kept: int = -1


def kept_drafts(row_tokens: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """[1] int64: how many drafts in a row equal the verify's row token before them (accepted_run's rule,
    on the device)."""
    if drafts.numel() == 0:
        return torch.zeros(1, dtype=torch.int64, device=row_tokens.device)
    return (row_tokens[: drafts.numel()] == drafts).to(torch.int64).cumprod(0).sum(0, keepdim=True)


def select(inputs: StepInputs, prev: torch.Tensor, behind: BehindVerify, block_size: int) -> torch.Tensor:
    """Write the plain step's row (row 0 of `inputs`) from the verify's tokens `prev`, still on the device;
    returns the drafts kept, [1] int64 on the device (the host checks it against its own read-back)."""
    device = prev.device
    rows = prev[behind.first_row : behind.first_row + len(behind.drafts) + 1]
    if behind.kept >= 0:
        kept = torch.full((1,), behind.kept, dtype=torch.int64, device=device)
    else:
        drafts = torch.tensor(behind.drafts, dtype=prev.dtype, pin_memory=device.type == "cuda")
        kept = kept_drafts(rows, drafts.to(device, non_blocking=True))
    position = kept + behind.position
    table = inputs.block_tables[0].to(torch.int64)
    inputs.input_ids[:1].copy_(rows.index_select(0, kept))
    inputs.positions[:1].copy_(position)
    slot = table.index_select(0, torch.div(position, block_size, rounding_mode="floor")) * block_size
    inputs.slot_mapping[:1].copy_(slot + position % block_size)
    inputs.context_lens[:1].copy_(position + 1)
    return kept


def select_ref(
    row_tokens: list[int], drafts: list[int], position: int, table: list[int], block_size: int
) -> tuple[int, int, int, int]:
    """Plain-Python `select`: (input token, position, slot, context length) of the plain step's row."""
    kept = 0
    while kept < len(drafts) and row_tokens[kept] == drafts[kept]:
        kept += 1
    pos = position + kept
    return row_tokens[kept], pos, table[pos // block_size] * block_size + pos % block_size, pos + 1
