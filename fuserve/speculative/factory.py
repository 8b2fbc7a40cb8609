"""The proposer a configuration asks for, built in the engine: `build_proposer(config, device)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuserve.configs import FuserveConfig
from fuserve.speculative.ngram import NgramProposer
from fuserve.speculative.proposer import Proposer

if TYPE_CHECKING:
    import torch


def build_proposer(config: FuserveConfig, device: torch.device) -> Proposer | None:
    """None when speculation is off. A draft model built here runs in the engine's process on the
    target's `device` (placement.in_engine, and every offline engine); a deployed draft's proposer is
    the engine core's to build (draft_factory.build_draft_proposer) and comes in ready."""
    spec = config.speculative
    if spec.method == "none":
        return None
    if spec.method == "ngram":
        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "draft":
        from fuserve.speculative.draft_factory import build_draft_runner

        return build_draft_runner(config, device)
    raise ValueError(f"unknown speculative.method {spec.method!r}: use none, ngram or draft")
