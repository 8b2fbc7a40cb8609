"""The proposer a configuration asks for: `build_proposer(config.speculative)`."""

from __future__ import annotations

from fuserve.configs import SpeculativeConfig
from fuserve.speculative.ngram import NgramProposer
from fuserve.speculative.proposer import Proposer


def build_proposer(config: SpeculativeConfig) -> Proposer | None:
    """None when speculation is off."""
    if config.method == "none":
        return None
    if config.method == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.method == "draft":  # the engine core builds it (draft_factory.py): it needs Ray Serve
        raise ValueError(
            "speculative.method `draft` needs the draft deployment, which runs under Ray Serve "
            "(`fuserve serve`); for offline use pick speculative.method `ngram` or `none`"
        )
    raise ValueError(f"unknown speculative.method {config.method!r}: use none, ngram or draft")
