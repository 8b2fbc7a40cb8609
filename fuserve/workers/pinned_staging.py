"""Pinned host buffers that a graphed step's inputs are written into and copied to the device from.

Why: pinning each step's input arrays anew (`tensor.pin_memory()`) cost ~40-75 us of host time a step on
an H200 host, and copying them into the graph's static buffers through a device staging tensor ~90-110 us
more, all of it before the replay, where at batch 1 with a draft the GPU waits for it after every verify
(benchmarks/NOTES.md, "Where batch 1's time goes"). Kept buffers take a memcpy instead.

A slot's buffers are rewritten only once the copies queued from them have run: each slot records an event
after its copies, and taking the slot again waits for it. The engine keeps at most two steps queued, so
that wait is nil; a draft round that queues more replays than there are slots waits there for the device.
The slots hold every input at the largest bucket and the tables at full width: with 256 sequences of 128k
tokens (8,192 columns of 16-token blocks) ~25 MB of pinned host memory for each set of graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SLOTS = 3


@dataclass
class StagingSlot:
    """One step's pinned buffers, as tensors (to copy from) and numpy views of the same memory (to write)."""

    wide: torch.Tensor  # int64
    small: torch.Tensor  # int32
    tables: torch.Tensor  # int32
    wide_np: np.ndarray
    small_np: np.ndarray
    tables_np: np.ndarray
    copied: torch.cuda.Event | None = None


class PinnedStaging:
    def __init__(self, device: torch.device, wide: int, small: int, tables: int) -> None:
        """Sizes, in elements: the int64 inputs, the small int32 ones, the int32 block tables. The copies
        run on `device`'s current stream."""
        self.device = device
        self._slots = []
        for _ in range(SLOTS):
            w = torch.empty(wide, dtype=torch.int64, pin_memory=True)
            s = torch.empty(small, dtype=torch.int32, pin_memory=True)
            t = torch.empty(tables, dtype=torch.int32, pin_memory=True)
            self._slots.append(StagingSlot(w, s, t, w.numpy(), s.numpy(), t.numpy()))
        self._next = 0

    def take(self) -> StagingSlot:
        """The next slot, once the copies last queued from it have run."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % SLOTS
        if slot.copied is not None and not slot.copied.query():
            slot.copied.synchronize()
        return slot

    def copied(self, slot: StagingSlot) -> None:
        """The copies from `slot` are queued on the device's current stream: it may be rewritten once they
        ran."""
        if slot.copied is None:
            slot.copied = torch.cuda.Event()
        slot.copied.record(torch.cuda.current_stream(self.device))
