"""A two-branch tree's verification on the host: which rows a sequence keeps when each of its first
drafts has an alternative (the draft's second-best token, speculative.second_best).

A speculating sequence's chunk is [last, d_1..d_k, a_1..a_m] (m <= k): a_i sits at d_i's position and
sees what d_i sees, so row 1 + k + i - 1 (a_i's) yields the target's token after a_i. Rows 0..k are the
chain's (rejection.py). If the chain stops at row j (its token t_j is not d_{j+1}) and t_j is a_{j+1},
the target took the alternative: the sequence keeps rows 0..j and a_{j+1}'s row, one token more than
the chain alone. Greedy rows only: a row's token is then the target's argmax, and both candidates are
checked against the same one, so the output is the target's own.
Pure Python (the scheduler imports it).
"""

from __future__ import annotations


def kept_rows(row_tokens: list[int], drafts: list[int], alts: list[int]) -> list[int]:
    """Indices of the rows a sequence keeps, in order: its tokens are those rows' tokens."""
    k = len(drafts)
    assert len(row_tokens) == k + 1 + len(alts), "one row per draft and alternative plus the bonus row"
    j = next((i for i, d in enumerate(drafts) if row_tokens[i] != d), k)
    rows = list(range(j + 1))
    if j < len(alts) and row_tokens[j] == alts[j]:
        rows.append(k + 1 + j)
    return rows


def alternative_kept(kept: list[int], drafts: list[int], alts: list[int]) -> int | None:
    """The draft index whose alternative a kept run took (`kept_rows`' tokens), or None: the first kept
    token that is not its draft is that draft's alternative, and a token follows it."""
    for i, token in enumerate(kept[: len(drafts)]):
        if token != drafts[i]:
            return i if i < len(alts) and token == alts[i] and len(kept) > i + 1 else None
    return None
