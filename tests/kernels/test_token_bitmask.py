from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.token_bitmask import (
    BLOCK,
    apply_token_bitmask,
    apply_token_bitmask_,
    apply_token_bitmask_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter cannot run bf16 math faithfully; stores of -inf are the same in every float type
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def random_bitmask(rows: int, words: int) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32)


def allowed_by_bit(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, V] bool, bit by bit in Python: the layout llguidance writes."""
    out = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    for s in range(bitmask.shape[0]):
        for t in range(min(vocab, 32 * bitmask.shape[1])):
            out[s, t] = bool((int(bitmask[s, t // 32]) >> (t % 32)) & 1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows, vocab, words",
    [(1, 33, 2), (3, 1000, 32), (2, BLOCK + 70, (BLOCK + 70 + 31) // 32), (2, 300, 5)],  # last: padded vocab
)
def test_kernel_matches_reference(dtype: torch.dtype, rows: int, vocab: int, words: int) -> None:
    logits = torch.randn(rows, vocab).to(DEVICE, dtype)
    bitmask = random_bitmask(rows, words)
    bitmask[0, 0] = -1  # bit 31 of a word (the sign bit) allowed
    want = apply_token_bitmask_ref(logits.clone(), bitmask.to(DEVICE))
    got = apply_token_bitmask(logits.clone(), bitmask.to(DEVICE))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    allowed = allowed_by_bit(bitmask, vocab).to(DEVICE)
    assert torch.equal(torch.isinf(want), ~allowed)
    assert torch.equal(want[allowed], logits[allowed])


def test_a_strided_view_and_all_ones_rows() -> None:
    wide = torch.randn(3, 200, device=DEVICE)
    view = wide[:, :150]
    bitmask = torch.full((3, 5), -1, dtype=torch.int32)
    bitmask[1] = 0  # everything forbidden
    got = apply_token_bitmask(view.clone(), bitmask.to(DEVICE))
    assert torch.equal(got[0], view[0]) and torch.equal(got[2], view[2])
    assert bool(torch.isneginf(got[1]).all())
    assert torch.equal(apply_token_bitmask_(view.clone(), bitmask.to(DEVICE)), got)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="rows"):
        apply_token_bitmask_ref(torch.zeros(2, 10), torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask_ref(torch.zeros(2, 10), torch.zeros(2, 1, dtype=torch.int64))
