"""Count-based covering of a router's sends (router/unadmitted_sends.py), on plain data."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fuserve.router.unadmitted_sends import UnadmittedSends, still_unreported


def test_a_send_in_transit_counts_until_the_admitted_count_covers_it() -> None:
    u = UnadmittedSends()
    u.on_report("r", 1.0, 0)
    u.on_sent("r", 1.1)
    u.on_sent("r", 1.2)
    u.on_report("r", 1.3, 1)  # taken after both sends; one of them arrived
    assert u.count("r", 1.4) == 1
    u.on_report("r", 1.3, 2)  # the same report again (not newer): ignored
    assert u.count("r", 1.4) == 1
    u.on_report("r", 1.5, 2)
    assert u.count("r", 1.6) == 0


def test_other_routers_admissions_never_make_it_count_more_than_it_sent() -> None:
    u = UnadmittedSends()
    u.on_report("r", 1.0, 5)  # five from elsewhere
    u.on_sent("r", 1.1)
    u.on_report("r", 1.2, 9)  # four more from elsewhere, not this router's: the estimate cannot tell
    assert u.count("r", 1.3) == 0, "an under-count, never an over-count"
    u.on_sent("r", 1.4)
    assert u.count("r", 1.5) == 1, "a send after the last report counts"


def test_a_send_that_never_arrives_stops_counting_after_the_ttl() -> None:
    u = UnadmittedSends(ttl_s=5.0)
    u.on_report("r", 1.0, 0)
    u.on_sent("r", 1.1)  # refused: never admitted
    u.on_report("r", 2.0, 0)
    assert u.count("r", 3.0) == 1
    assert u.count("r", 7.0) == 0
    u.on_sent("r", 7.5)
    u.on_report("r", 8.0, 0)
    assert u.count("r", 8.1) == 1, "the lost one stays forgotten; the new one counts"


def test_a_restarted_replica_starts_over() -> None:
    u = UnadmittedSends()
    u.on_report("r", 1.0, 100)
    u.on_sent("r", 1.1)
    u.on_report("r", 2.0, 3)  # fewer than before: a new engine
    u.on_sent("r", 2.1)
    assert u.count("r", 2.2) == 1


def test_the_last_n_and_those_after_the_report_are_unreported() -> None:
    sends = [(0.5, "a"), (1.5, "b"), (2.5, "c"), (3.5, "d")]
    assert [s for _, s in still_unreported(sends, lambda s: s[0], 3.0, 0)] == ["d"]
    assert [s for _, s in still_unreported(sends, lambda s: s[0], 3.0, 3)] == ["b", "c", "d"]
    assert [s for _, s in still_unreported(sends, lambda s: s[0], 0.0, 0)] == ["a", "b", "c", "d"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["mine", "other", "report", "seen"]), st.integers(0, 3)), max_size=60)
)
def test_never_an_over_count(script: list[tuple[str, int]]) -> None:
    """Sends from this router and others reach the replica after random delays (arrive in any order);
    reports are taken at any moment and seen later. The estimate is at most this router's sends not
    admitted when the last seen report was taken, and exact with one router once all arrived."""
    u = UnadmittedSends(ttl_s=1e9)
    t = 0.0
    in_transit: list[str] = []  # sends on their way, in any order
    admitted = 0
    mine_admitted = 0
    mine_sent = 0
    taken: list[tuple[float, int, int]] = []  # reports taken, not seen: (time, admitted, mine admitted)
    seen_mine_admitted = None
    for op, k in script:
        t += 1.0
        if op in ("mine", "other"):
            in_transit.append(op)
            if op == "mine":
                mine_sent += 1
                u.on_sent("r", t)
            if k and in_transit:  # k of those on their way arrive now, the k-th from the end first
                who = in_transit.pop(-min(k, len(in_transit)))
                admitted += 1
                mine_admitted += who == "mine"
        elif op == "report":
            taken.append((t, admitted, mine_admitted))
        elif taken:
            at, count, mine_then = taken.pop(0)
            u.on_report("r", at, count)
            seen_mine_admitted = mine_then
        if seen_mine_admitted is not None:
            assert u.count("r", t) <= mine_sent - seen_mine_admitted
    if seen_mine_admitted is not None and "other" not in [op for op, _ in script]:
        while in_transit:  # everything arrives, and a report of it is seen
            in_transit.pop()
            admitted += 1
        u.on_report("r", t + 1, admitted)
        assert u.count("r", t + 1) == 0
