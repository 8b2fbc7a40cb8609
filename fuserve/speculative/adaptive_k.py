"""How many drafts each sequence asks for: the k that maximizes expected tokens per second of step.

A sequence whose drafts are kept with probability a each (independently, until the first rejection)
gains E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens from a step with k drafts. What the step
costs it: its share of the batch's plain decode step, (base + per_seq * B) / B; when k > 0 its share of
what every speculating step and round pays once, whatever k (the verify step's fixed extra: the read-back
that speculation forces, sampling the rows; the round's: the host's work, the channel, the draft's first
forward); and k times the cost of one more draft (verifying it, and its share of the round's forward that
made it: the draft's forwards serve the whole batch). For B identical sequences the k in 0..k_max with
the best E(k) / cost(k) is exactly the k maximizing the batch's tokens per second; k = 0 costs nothing, so
a large batch, where a draft costs a whole token of compute but the plain step is shared B ways, stops
drafting by itself. Sequences differ, and a round's forwards are as many as its largest k whoever asks,
so the round's depth is chosen for the batch and each sequence then drops only the drafts not worth their
verify row (`choose_batch`); `choose`, one sequence alone, is the batch's bound (`any_drafts`).

Everything is measured, never configured:
  acceptance  per sequence, kept / checked with decaying counts (the last ~10 verifies), pulled toward a
              prior by a weak pseudo-count: the engine's recent acceptance over all sequences, or 0.5 if
              that is lower; while a sequence does not draft its counts keep decaying, so it is tried
              again after a while (text changes character: a code block starts).
  step costs  plain, verify and round steps fitted (draft_costs.py: DraftCosts). Speculation runs a few
              plain steps every EXPLORE_EVERY rounds so that the plain fit stays fed while every
              sequence drafts. Charged per draft, the fixed costs had adaptive k settle at k = 1 or 0
              where k = 4-5 paid; it was suspected of adaptive k's 0.95-1.11x at batch 8 for an 8B target
              with a 1B draft on an H200 (fixed k 1.16-1.63x), whose cause was the spread of per-sequence
              k that `choose_batch` removes.
At batch > 1 a batch drafts only for a predicted gain of BATCH_GAIN, each sequence's catch-up (the tokens
the proposer lacks) charged over the steps it has left; a batch that does not draft is tried again by a
probe: one sequence drafts a round (`probe_due`), less often after each probe that changed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuserve.speculative.draft_costs import DraftCosts, StepCosts, drafting_extra_s

PRIOR_ACCEPTANCE = 0.5
PRIOR_WEIGHT = 2.0  # pseudo-verifies at the prior
DECAY = 0.9  # per verify: the last ~10 count
POOL_DECAY = 0.98  # per verify of any sequence: the engine's last ~50 count toward the prior
# After this many plain steps in a row the prior turns optimistic until drafts are verified again: one
# round in ~this many steps where drafting does not pay, and only where the costs allow a draft at all
RETRY_AFTER = 64
RETRY_ACCEPTANCE = 0.9
# The engine's acceptance as a prior counts this many pseudo-checks at PRIOR_ACCEPTANCE, so that a
# probe's two or three drafts, all kept by luck, do not start a large batch drafting (whose first round
# catches up every sequence: 27-58 ms for 32-64 of them on an H200)
POOL_PSEUDO = 4.0
# At batch > 1 the batch drafts only where the fit predicts at least this gain over plain steps: at
# batch 32 and 64 under load (an 8B target, a 1B draft server, 2026-11-29) the realized rate was 0.90x of
# what the measured verify, round and plain costs predict at both acceptances (steps with new prompts,
# sequences near their end, the host), so a predicted 1.05x was a measured 0.95x. What a drafting step's
# own time shows of that (catch-ups, the fits' lag) `drafting_factor` measures; this margin is for the rest
BATCH_GAIN = 1.08
# At batch > 1 no optimistic retry (it would catch up the whole batch): after this many plain steps one
# sequence drafts a round (the one the proposer lacks the fewest tokens of), for evidence
PROBE_AFTER = 128
# Each probe after which the batch still does not draft doubles the wait for the next, up to this many
# doublings: a probe costs ~8-20 ms at batch 32-64 on an H200 (read-backs before and after it, its verify
# step, its wait for the draft), and seven in ~1,000 steps made adaptive k 0.97-0.99x of plain decoding at
# acceptance 0.7, where it never drafted otherwise (2026-11-29)
PROBE_BACKOFF_DOUBLINGS = 3
# No probe where the batch would not draft even with this many of its drafts kept: its evidence could not
# change the choice
PROBE_CEILING = RETRY_ACCEPTANCE
# per step without drafts: back to the prior's pull after ~20 steps. 0.98 (~100 steps) let a few
# rejections in a row stop a batch-1 sequence for dozens of steps: on the CPU box adaptive k made 1.01x
# where fixed k = 1 made 1.25x (code prompts, 2026-11-27)
IDLE_DECAY = 0.9


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
        """draft_token_prior_s, step_prior: the cost fits' priors (DraftCosts)."""
        self.max_k = max_k
        self.adaptive = adaptive
        self.costs = DraftCosts(draft_token_prior_s, step_prior)
        self._acc: dict[str, _Acceptance] = {}
        self._pool = _Acceptance()  # every sequence's verifies: the prior (`prior`)
        self._plain_run = 0  # plain decode steps since the last verify step
        self.probe_after = PROBE_AFTER  # Speculation raises it where a probe's round is not overlapped
        self.probing = False  # the last choose_batch chose a probe: its round is not the batch's cost
        self._chosen_s: float | None = (
            None  # the last choose_batch's price, until `commit` makes it the step's
        )
        self.num_probes = 0
        self._fruitless_probes = 0  # probes since the batch last drafted by choice
        self._committed_probe = False  # the step last committed is a probe
        self.decode_steps = 0  # decode-only steps observed, and the last of them that verified drafts
        self.last_verify_step = 0

    # ---- measurements ---------------------------------------------------------------------------
    def prior(self, retry: bool = True) -> float:
        """What a sequence's acceptance is pulled toward: the engine's recent acceptance over every
        sequence, or PRIOR_ACCEPTANCE if that is lower; with `retry` (a lone sequence), after RETRY_AFTER
        plain steps in a row, RETRY_ACCEPTANCE until a step verifies drafts again. Without it (a batch)
        the engine's acceptance counts POOL_PSEUDO checks at PRIOR_ACCEPTANCE besides. A sequence that
        stopped drafting drifts back to the prior, so it is tried again where drafting can pay at all: with
        the prior at 0.5, or at the pool's acceptance (which no longer moves once nothing drafts), a fixed
        cost per step that only a higher acceptance repays kept every sequence at k = 0 for good after one
        unlucky run. A batch is tried again by a probe instead (`probe_due`)."""
        pooled = self._pool
        if retry:
            if self._plain_run >= RETRY_AFTER:
                return RETRY_ACCEPTANCE
            if pooled.checked <= 0.0:
                return PRIOR_ACCEPTANCE
            return max(PRIOR_ACCEPTANCE, pooled.kept / pooled.checked)
        shrunk = (pooled.kept + POOL_PSEUDO * PRIOR_ACCEPTANCE) / (pooled.checked + POOL_PSEUDO)
        return max(PRIOR_ACCEPTANCE, shrunk)

    def acceptance(self, seq_id: str, retry: bool = True) -> float:
        a = self._acc.get(seq_id)
        prior = self.prior(retry)
        if a is None:
            return prior
        return (a.kept + PRIOR_WEIGHT * prior) / (a.checked + PRIOR_WEIGHT)

    def observe_verify(self, seq_id: str, num_drafts: int, num_accepted: int) -> None:
        """Drafts are Bernoulli trials until the first rejection: kept ones are successes, the first
        rejected one (if any) a failure, the ones after it were never tried."""
        checked = num_accepted + (1 if num_accepted < num_drafts else 0)
        a = self._acc.setdefault(seq_id, _Acceptance())
        a.kept = DECAY * a.kept + num_accepted
        a.checked = DECAY * a.checked + checked
        pool = self._pool
        pool.kept = POOL_DECAY * pool.kept + num_accepted
        pool.checked = POOL_DECAY * pool.checked + checked

    def observe_idle(self, seq_id: str) -> None:
        a = self._acc.get(seq_id)
        if a is not None:
            a.kept *= IDLE_DECAY
            a.checked *= IDLE_DECAY

    def observe_round(
        self, seconds: float, max_k: int, channel_s: float = 0.0, catch_up_tokens: int = 0
    ) -> None:
        """A proposer round (DraftCosts.observe_round); a probe's is not fitted."""
        self.costs.observe_round(seconds, max_k, channel_s, catch_up_tokens, probe=self.probing)

    def observe_decode_step(
        self, num_seqs: int, num_drafts: int, seconds: float, hidden: bool = False
    ) -> None:
        """A step of decodes only (some speculating), its proposer round not counted; `hidden`: its host
        work ran under the GPU's (LLMEngine._complete). (One fit over plain and verify steps priced a
        draft at its prior when nearly every step drafted: it could not tell the drafts' cost from the
        base.)"""
        self.decode_steps += 1
        if num_drafts == 0:
            self.costs.observe_plain(num_seqs, seconds, hidden)
            self._plain_run += 1
            return
        self._plain_run = 0
        self.last_verify_step = self.decode_steps
        if self._committed_probe:  # counted at its verify: with overlap its round may go out twice
            self.num_probes += 1
            self._fruitless_probes += 1
        self.costs.observe_verify_step(num_seqs, num_drafts, seconds)

    def verify_cost(self, num_drafts: int) -> float:
        """Seconds a verify step with this many drafts takes beyond a plain step of the same batch."""
        c0, c1 = self.costs.verify_line()
        return c0 + c1 * num_drafts

    def probe_due(self, costs: StepCosts) -> bool:
        """At batch > 1, whether one sequence should draft a round for evidence: after `probe_after` plain
        steps, doubled by each probe since the batch last drafted (PROBE_BACKOFF_DOUBLINGS), and only where
        drafting would pay at PROBE_CEILING."""
        if not self.adaptive or costs.batch <= 1:
            return False
        wait = self.probe_after << min(self._fruitless_probes, PROBE_BACKOFF_DOUBLINGS)
        if self._plain_run < wait:
            return False
        return any(
            predicted_gain(costs, PROBE_CEILING, k) > _gain_needed(costs) for k in range(1, self.max_k + 1)
        )

    def forget(self, seq_id: str) -> None:
        self._acc.pop(seq_id, None)

    # ---- the choice -----------------------------------------------------------------------------
    def step_costs(self, batch_size: int) -> StepCosts:
        """This step's costs for a batch of `batch_size` decodes (DraftCosts.step_costs)."""
        return self.costs.step_costs(batch_size)

    def commit(self, ks: list[int]) -> None:
        """The step's choice is `ks`, from the last choose_batch where any drafts (Speculation.propose; the
        engine also asks whether a batch would draft while a verify step is in flight): its verify step is
        measured against that choice's price."""
        self.costs.expect(self._chosen_s if any(ks) else None)
        self._chosen_s = None
        self._committed_probe = self.probing and any(ks)
        if any(ks) and not self.probing:
            self._fruitless_probes = 0

    def summary(self, batch_size: int) -> dict[str, float]:
        """What the fit believes for a batch of this size (ms; benchmarks record it beside their rows): the
        costs, each plain fit's samples, the acceptance prior, the probes so far, and the gain it predicts
        for every sequence drafting max_k at that prior."""
        costs = self.step_costs(batch_size)
        a = self.prior(retry=False)
        return dict(
            plain_ms=1e3 * costs.plain_s,
            fixed_ms=1e3 * costs.fixed_s,
            row_ms=1e3 * costs.row_s,
            forward_ms=1e3 * costs.forward_s,
            plain_steps_hidden=self.costs.steps.estimate().num_samples,
            plain_steps_beside_a_read_back=self.costs.exposed_steps.estimate().num_samples,
            prior=a,
            probes=self.num_probes,
            drafting_factor=costs.drafting_factor,
            decode_steps=self.decode_steps,
            longest_hidden_plain_ms=1e3 * self.costs.longest_hidden_plain_s,
            last_verify_step=self.last_verify_step,
            predicted_gain=predicted_gain(costs, a, self.max_k),
        )

    def any_drafts(self, seq_ids: list[str], costs: StepCosts) -> bool:
        """Whether some sequence of the batch would draft at all: k > 0 for the most accepting one,
        since a higher acceptance never lowers the best k. One evaluation per step instead of one per
        sequence, so that a batch that does not speculate (large batches) pays almost nothing."""
        if not seq_ids or self.max_k <= 0:
            return False
        if not self.adaptive or self.probe_due(costs):
            return True
        retry = costs.batch == 1
        best = max(seq_ids, key=lambda s: self.acceptance(s, retry))
        return self.choose(best, costs, self.max_k) > 0

    def choose(self, seq_id: str, costs: StepCosts, limit: int) -> int:
        """k for one sequence of the batch `costs` describes; at most `limit` (its room left). At batch
        > 1 a draft must beat plain steps by BATCH_GAIN."""
        top = min(self.max_k, limit)
        if top <= 0:
            return 0
        if not self.adaptive:
            return top
        a = self.acceptance(seq_id, costs.batch == 1)
        share, fixed = costs.share_s, costs.fixed_s / costs.batch
        best_k, best = 0, _gain_needed(costs) / max(share, 1e-9)
        for k in range(1, top + 1):
            cost = (share + fixed + k * costs.per_draft_s) * costs.drafting_factor
            rate = expected_tokens(a, k) / max(cost, 1e-9)
            if rate > best:
                best_k, best = k, rate
        return best_k

    def choose_batch(
        self, seq_ids: list[str], limits: list[int], costs: StepCosts, lacking: list[int] | None = None
    ) -> list[int]:
        """k for each sequence that may draft this round (at most its limit). A round runs as many draft
        forwards as its largest k, for every drafting sequence at once, so that depth K is chosen for the
        batch: the one with the most expected tokens per second of step, every sequence drafting K. Then
        each sequence keeps only the drafts worth their verify row: the j-th is kept with probability
        a^j, worth it while a^j tokens beat what the row's seconds make at the batch's rate. Chosen one
        sequence at a time (`choose`), a batch of 8 at acceptance ~0.7 spread over k = 1-4 by its noisy
        estimates: its rounds ran the largest k's forwards for the yield of the mean k (0.79-0.95x on an
        H200 where fixed k made 1.14-1.21x; chosen for the batch, 1.12x). At batch > 1 the batch drafts
        only for BATCH_GAIN over plain; where it does not, a probe when due: the sequence with the fewest
        tokens the proposer lacks beyond a round's usual (`lacking`, per sequence; without it the first
        that has room) drafts its top k."""
        tops = [min(self.max_k, max(limit, 0)) for limit in limits]
        self.probing = False
        self._chosen_s = None  # what the fits say the chosen step will take, its catch-up whole
        if not self.adaptive or not any(tops):
            return tops
        accs = [self.acceptance(s, costs.batch == 1) for s in seq_ids]
        others = max(costs.batch - len(seq_ids), 0)  # running sequences that yield one token a step
        # a sequence's catch-up (the tokens the proposer lacks), paid once for the steps it has left
        lacks = lacking if lacking is not None and costs.batch > 1 else [0] * len(seq_ids)
        catch_up = [n * costs.catch_up_s for n in lacks]
        steps_left = [
            max(1.0, limit / expected_tokens(a, max(t, 1)))
            for limit, a, t in zip(limits, accs, tops, strict=True)
        ]
        amortized = [c / n for c, n in zip(catch_up, steps_left, strict=True)]

        def rate(ks: list[int]) -> float:
            tokens = others + sum(expected_tokens(a, k) for a, k in zip(accs, ks, strict=True))
            cost = costs.plain_s
            if max(ks) > 0:
                cost = (cost + drafting_extra_s(costs, ks, amortized)) * costs.drafting_factor
            return tokens / max(cost, 1e-9)

        best_ks, best = [0] * len(tops), rate([0] * len(tops)) * _gain_needed(costs)
        for depth in range(1, max(tops) + 1):
            ks = [min(depth, t) for t in tops]
            worth = rate(ks) * costs.row_s  # tokens a row's seconds make at this rate
            ks = [_drafts_worth_a_row(a, k, worth) for a, k in zip(accs, ks, strict=True)]
            r = rate(ks)
            if r > best:
                best_ks, best = ks, r
        if any(best_ks) and costs.batch > 1:
            self._chosen_s = costs.plain_s + drafting_extra_s(costs, best_ks, catch_up)
        if not any(best_ks) and self.probe_due(costs):
            can = [i for i, t in enumerate(tops) if t > 0]
            probe = min(can, key=lambda i: lacking[i]) if lacking is not None else can[0]
            best_ks[probe] = tops[probe]
            self.probing = True
        return best_ks


def predicted_gain(costs: StepCosts, acceptance: float, k: int) -> float:
    """Tokens per second over plain steps' with every sequence of the batch drafting k, each draft kept
    with this probability (catch-ups left out)."""
    b = costs.batch
    drafting_s = (costs.plain_s + drafting_extra_s(costs, [k] * b, [0.0] * b)) * costs.drafting_factor
    return expected_tokens(acceptance, k) * costs.plain_s / drafting_s


def _gain_needed(costs: StepCosts) -> float:
    """The gain over plain steps that drafting must be predicted to make (BATCH_GAIN at batch > 1, where
    no batch drafts before plain steps are measured: its first rounds would catch every sequence up on the
    fit's prior alone)."""
    if costs.batch <= 1:
        return 1.0
    return BATCH_GAIN if costs.plain_measured else float("inf")


def _drafts_worth_a_row(acceptance: float, k: int, worth: float) -> int:
    """The drafts of k whose chance of being kept, acceptance^j for the j-th, is above `worth`."""
    while k > 0 and acceptance**k <= worth:
        k -= 1
    return k
