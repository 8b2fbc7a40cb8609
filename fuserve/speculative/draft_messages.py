"""The channel between an engine core and its draft replica: one round (request + reply) per step.

    engine core (DraftProposer, DEALER) --DraftRound: every speculating sequence's start, new tokens, k-->
                                        <--DraftReply: up to k drafts each, and which it did not hold--
                                        --DraftRelease: finished sequences (no reply)------------------>
    draft replica (DraftServer, ROUTER)

msgspec structs, array-encoded (a round of 64 sequences is a few hundred bytes). Sequence ids are the
client's: the server keys them by `client_id`, so one draft replica can serve several engines.
A feature-reading draft's rounds also carry the target's features, as raw bf16 bytes, and its replies
the second-best token beside each draft (speculative.second_best) for the target's second branch.
Fields are only ever appended, with defaults: an array-encoded struct decodes a shorter array (the
missing trailing fields take their defaults) and drops extra trailing elements, so either side may be
a version behind. Nothing here imports torch.
"""

from __future__ import annotations

import msgspec


class DraftSeq(msgspec.Struct, array_like=True):
    seq_id: str
    start: int
    token_ids: list[int]
    k: int
    # a feature-reading draft's rows (ProposeRequest.features): [rows, feature_dim] bf16, row-major
    # (2 bytes a value: a decode's one row of a 576-wide target is 1.1 KB); empty for other drafts
    features: bytes = b""
    feature_dim: int = 0


class DraftRound(msgspec.Struct, tag="round", array_like=True):
    client_id: str
    round_id: int
    seqs: list[DraftSeq]


class DraftRelease(msgspec.Struct, tag="release", array_like=True):
    client_id: str
    seq_ids: list[str]


class DraftReply(msgspec.Struct, array_like=True):
    round_id: int
    instance_id: str  # which server answered: a new one holds no sequence
    drafts: list[list[int]]
    missing: list[int]  # indices of sequences it does not hold at their start: resend from 0
    error: str = ""  # the round failed on the server (the client proposes nothing this round)
    server_s: float = 0.0  # the server's seconds from decoding the round to encoding this reply
    # per sequence, the second-best token beside each of its drafts (speculative.second_best); [] when
    # the draft offers none (an independent draft, or the option off)
    alternatives: list[list[int]] = []
    ahead_hits: int = 0  # sequences of this round answered from drafts made ahead (speculative.draft_ahead)
    ahead_late: int = 0  # the server's rounds so far that came while it still drafted ahead


class DraftAddress(msgspec.Struct):
    """Where a draft server listens, as its Serve replica answers it (control path)."""

    tcp: str
    ipc: str | None
    hostname: str  # ipc only works on the same machine
    instance_id: str
    unix: str | None = None  # a Unix stream socket's path (frame_socket): the same machine's fastest way
    spin_s: float = 0.0  # how long the server spins between rounds (a client asked to spins as long)
    ahead: bool = False  # it drafts ahead (speculative.draft_ahead): worth an engine's overlapping rounds


DraftInput = DraftRound | DraftRelease


def input_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(DraftInput)


def reply_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(DraftReply)
