"""Each frontend process gets its own requests' outputs: the engine core's split, without a model."""

from fuserve.core_messages import CoreStats, RequestFailure, SeqOutput
from fuserve.workers.output_routing import OutputRouting


def out(rid: str, finish: str | None = None) -> SeqOutput:
    return SeqOutput(rid, 0, [1], finish)


def test_outputs_go_to_the_frontend_that_sent_the_request() -> None:
    routing = OutputRouting(3)
    routing.attach(1)
    routing.attach(2)
    for rid, f in (("a", 0), ("b", 1), ("c", 2), ("d", 1)):
        routing.add(rid, f)
    stats = CoreStats(num_running=4)
    parts = dict(routing.split([out("a"), out("b"), out("c"), out("d")], [], stats, lambda rid: True))
    assert [o.request_id for o in parts[0].outputs] == ["a"]
    assert [o.request_id for o in parts[1].outputs] == ["b", "d"]
    assert [o.request_id for o in parts[2].outputs] == ["c"]
    assert all(p.stats is stats for p in parts.values())


def test_unattached_frontends_get_nothing_and_every_attached_one_gets_the_stats() -> None:
    routing = OutputRouting(3)
    routing.add("a", 0)
    routing.add("b", 1)  # frontend 1 sent it before saying it listens: nothing is queued for it
    parts = dict(routing.split([out("a"), out("b")], [], CoreStats(), lambda rid: True))
    assert set(parts) == {0}
    routing.attach(2)
    parts = dict(routing.split([], [], CoreStats(), lambda rid: True))
    assert set(parts) == {0, 2} and not parts[2].outputs


def test_finished_and_failed_requests_are_forgotten() -> None:
    routing = OutputRouting(2)
    routing.attach(1)
    routing.add("a", 1)
    routing.add("b", 1)
    routing.add("c", 0)
    # "a" has another sequence still running: kept; "b" is done: forgotten; "c" failed on arrival
    live = {"a"}.__contains__
    parts = dict(
        routing.split([out("a", "stop"), out("b", "length")], [RequestFailure("c", "bad")], CoreStats(), live)
    )
    assert [f.request_id for f in parts[0].failures] == ["c"]
    assert len(routing) == 1
    parts = dict(routing.split([out("zzz")], [], CoreStats(), live))  # nobody's (aborted meanwhile): dropped
    assert not parts[0].outputs and not parts[1].outputs


def test_detach_returns_the_gone_frontends_requests() -> None:
    routing = OutputRouting(2)
    routing.attach(1)
    routing.add("a", 1)
    routing.add("b", 0)
    assert routing.detach(1) == ["a"]
    assert set(dict(routing.split([out("a"), out("b")], [], CoreStats(), lambda rid: True))) == {0}
    assert len(routing) == 1
