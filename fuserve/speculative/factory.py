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
    if config.method == "draft":
        # the draft-model deployment's client (issue 17b) plugs in here
        raise NotImplementedError("speculative.method `draft` is not built yet: use method: ngram")
    raise ValueError(f"unknown speculative.method {config.method!r}: use none, ngram or draft")
