from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.argmax import (
    CHUNK,
    argmax,
    argmax_keys,
    argmax_keys_ref,
    argmax_ref,
    greedy_keys,
    greedy_tokens,
    key_tokens,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 1), (1, 3 * CHUNK + 5), (3, 1000), (2, 2 * CHUNK)])
def test_argmax_matches_torch(dtype: torch.dtype, rows: int, vocab: int) -> None:
    x = torch.randn(rows, vocab).to(DEVICE, dtype)
    assert torch.equal(argmax(x), argmax_ref(x))


def test_ties_go_to_the_lowest_index_across_chunks() -> None:
    """Equal maxima inside one chunk and in two chunks: the first one wins, as in torch."""
    x = torch.zeros(2, 2 * CHUNK + 10, device=DEVICE)
    x[0, [7, 9, CHUNK + 3]] = 5.0
    x[1, [CHUNK + 1, 2 * CHUNK + 2]] = 2.0
    got = argmax(x)
    assert got.tolist() == [7, CHUNK + 1] and torch.equal(got, argmax_ref(x))


def test_a_view_with_row_stride_and_the_dispatch() -> None:
    wide = torch.randn(3, 300, device=DEVICE)
    view = wide[:, :250]
    assert torch.equal(argmax(view), argmax_ref(view))
    assert torch.equal(greedy_tokens(view), argmax_ref(view))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_match_the_reference(dtype: torch.dtype) -> None:
    """The keyed variant: same keys as the torch reference, signs, zeros, ties and -inf included, and the
    offset lands in the index it carries."""
    x = torch.randn(6, 2 * CHUNK + 7).to(DEVICE, dtype)
    x[1] = -x[1].abs() - 1  # all negative
    x[2] = 0.0
    x[2, CHUNK + 5] = -0.0  # -0.0 ties with 0.0: the first zero wins
    x[3, [4, CHUNK + 4]] = 50.0  # a tie across chunks
    x[4] = -float("inf")
    offset = 1000
    got = argmax_keys(x, offset)
    assert torch.equal(got, argmax_keys_ref(x, offset))
    assert torch.equal(key_tokens(got), argmax_ref(x) + offset)
    assert torch.equal(greedy_keys(x[:, : CHUNK + 1], 7), argmax_keys_ref(x[:, : CHUNK + 1], 7))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="rows, vocab"):
        argmax(torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="columns"):
        argmax(torch.zeros(1, 0, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 64])
def test_argmax_llama3_vocab(rows: int) -> None:
    x = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(argmax(x), argmax_ref(x))
    assert torch.equal(argmax_keys(x, 64128), argmax_keys_ref(x, 64128))
