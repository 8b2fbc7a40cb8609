"""How many drafts each sequence asks for: the k that maximizes expected tokens per second of step.

A sequence whose drafts are kept with probability a each (independently, until the first rejection)
gains E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens from a step with k drafts. What the step
costs it: its share of the batch's plain decode step, (base + per_seq * B) / B, plus k times the cost of
one draft (verifying it in the target's forward, and making it), plus its share of the proposer's round
trip when k > 0. Each sequence takes the k in 0..k_max with the best E(k) / cost(k). For B identical
sequences that is exactly the k maximizing the batch's tokens per second; k = 0 costs nothing, so a
large batch, where a draft costs a whole token of compute but the plain step is shared B ways, stops
drafting by itself.

Everything is measured, never configured:
  acceptance  per sequence, kept / checked with decaying counts (the last ~10 verifies), pulled toward a
              prior by a weak pseudo-count; while a sequence does not draft its counts keep decaying, so
              it is tried again after a while (text changes character: a code block starts).
  step costs  plain decode steps fitted as seconds = base + per_seq * B (StepCostMeter's ridge fit
              with forgetting); a draft's verify cost is the running mean, per draft, of what verify
              steps take beyond that fit. Speculation runs a plain step every EXPLORE_EVERY steps so
              that the fit stays fed while every sequence drafts.
  proposer    seconds per draft made, and the round trip the proposer reports, as running averages.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuserve.workers.step_cost_meter import StepCostMeter

PRIOR_ACCEPTANCE = 0.5
PRIOR_WEIGHT = 2.0  # pseudo-verifies at the prior
DECAY = 0.9  # per verify: the last ~10 count
# per step without drafts: back to the prior's pull after ~20 steps. 0.98 (~100 steps) let a few
# rejections in a row stop a batch-1 sequence for dozens of steps: on the CPU box adaptive k made 1.01x
# where fixed k = 1 made 1.25x (code prompts, 2026-11-27)
IDLE_DECAY = 0.9
COST_EWMA = 0.1
MIN_PLAIN_STEPS = 4  # plain steps measured before a verify step's extra time is read against them


@dataclass(frozen=True)
class StepCosts:
    """Seconds, per sequence of a batch: its share of a plain decode step, one more draft (verifying
    it and making it), and its share of the proposer's round trip (paid only when it drafts)."""

    share_s: float
    per_draft_s: float
    round_share_s: float


@dataclass
class _Acceptance:
    kept: float = 0.0
    checked: float = 0.0


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step with k drafts yields for a sequence whose drafts are kept with this probability."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


class AdaptiveK:
    def __init__(
        self,
        max_k: int,
        adaptive: bool = True,
        draft_token_prior_s: float = 0.0,
        step_prior: tuple[float, float, float] = (0.010, 0.0001, 0.0002),
    ) -> None:
        """step_prior: (base, per decode, per draft) seconds before any step is measured."""
        self.max_k = max_k
        self.adaptive = adaptive
        self._acc: dict[str, _Acceptance] = {}
        # StepCostMeter's features (prefill tokens, decodes) stand for (drafts, decodes) here
        self.steps = StepCostMeter(prior=step_prior)  # plain decode steps only
        self.verify_s = step_prior[2]  # seconds one more draft adds to a step's forward
        self.draft_s = draft_token_prior_s  # seconds per draft made by the proposer
        self.channel_s = 0.0  # seconds per proposer round trip

    # ---- measurements ---------------------------------------------------------------------------
    def acceptance(self, seq_id: str) -> float:
        a = self._acc.get(seq_id)
        if a is None:
            return PRIOR_ACCEPTANCE
        return (a.kept + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (a.checked + PRIOR_WEIGHT)

    def observe_verify(self, seq_id: str, num_drafts: int, num_accepted: int) -> None:
        """Drafts are Bernoulli trials until the first rejection: kept ones are successes, the first
        rejected one (if any) a failure, the ones after it were never tried."""
        a = self._acc.setdefault(seq_id, _Acceptance())
        a.kept = DECAY * a.kept + num_accepted
        a.checked = DECAY * a.checked + num_accepted + (1 if num_accepted < num_drafts else 0)

    def observe_idle(self, seq_id: str) -> None:
        a = self._acc.get(seq_id)
        if a is not None:
            a.kept *= IDLE_DECAY
            a.checked *= IDLE_DECAY

    def observe_round(self, seconds: float, num_drafts: int, channel_s: float = 0.0) -> None:
        if num_drafts > 0:
            self.draft_s += COST_EWMA * ((seconds - channel_s) / num_drafts - self.draft_s)
        self.channel_s += COST_EWMA * (channel_s - self.channel_s)

    def observe_decode_step(self, num_seqs: int, num_drafts: int, seconds: float) -> None:
        """A step of decodes only (some speculating), its proposer round not counted. Plain steps fit
        the step's base and per-sequence cost; a verify step's time beyond that fit, per draft, is a
        draft's verify cost. (One fit over both priced a draft at its prior when nearly every step
        drafted: it could not tell the drafts' cost from the base.)"""
        if num_drafts == 0:
            self.steps.observe(0, num_seqs, seconds)
            return
        fit = self.steps.estimate()
        if fit.num_samples >= MIN_PLAIN_STEPS:
            extra = (seconds - fit.base_s - fit.per_seq_s * num_seqs) / num_drafts
            self.verify_s += COST_EWMA * (max(extra, 0.0) - self.verify_s)

    def forget(self, seq_id: str) -> None:
        self._acc.pop(seq_id, None)

    # ---- the choice -----------------------------------------------------------------------------
    def step_costs(self, batch_size: int) -> StepCosts:
        """This step's costs for a batch of `batch_size` decodes: one fit per step, not per sequence."""
        fit = self.steps.estimate()
        b = max(batch_size, 1)
        return StepCosts(
            share_s=(fit.base_s + fit.per_seq_s * b) / b,
            per_draft_s=self.verify_s + self.draft_s,
            round_share_s=self.channel_s / b,
        )

    def any_drafts(self, seq_ids: list[str], costs: StepCosts) -> bool:
        """Whether some sequence of the batch would draft at all: k > 0 for the most accepting one,
        since a higher acceptance never lowers the best k. One evaluation per step instead of one per
        sequence, so that a batch that does not speculate (large batches) pays almost nothing."""
        if not seq_ids or self.max_k <= 0:
            return False
        if not self.adaptive:
            return True
        best = max(seq_ids, key=self.acceptance)
        return self.choose(best, costs, self.max_k) > 0

    def choose(self, seq_id: str, costs: StepCosts, limit: int) -> int:
        """k for one sequence of the batch `costs` describes; at most `limit` (its room left)."""
        top = min(self.max_k, limit)
        if top <= 0:
            return 0
        if not self.adaptive:
            return top
        a = self.acceptance(seq_id)
        best_k, best = 0, 1.0 / max(costs.share_s, 1e-9)
        for k in range(1, top + 1):
            cost = costs.share_s + k * costs.per_draft_s + costs.round_share_s
            rate = expected_tokens(a, k) / max(cost, 1e-9)
            if rate > best:
                best_k, best = k, rate
        return best_k
