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
  step costs  plain decode steps fitted as seconds = base + per_seq * B (StepCostMeter's ridge fit
              with forgetting); what a verify step takes beyond that fit, as a line in its drafts
              (fixed + per draft), and a proposer round's seconds as a line in its largest k (fixed + per
              forward), each a weighted least-squares fit of the last ~20 (`LineFit`). Speculation runs
              a few plain steps every EXPLORE_EVERY rounds so that the plain fits stay fed while every
              sequence drafts. At batch > 1 also a drafting step's measured time over its predicted
              (`drafting_factor`) and a catch-up token's price (the tokens a round sends beyond k + 2).
  proposer    the round trip the proposer reports, as a running average.
A line needs k to vary to tell its fixed part from its slope: per-sequence choices, the plain steps and the
retries vary it, but a batch that holds one k for ~20 steps leaves the split to the fit's prior: a round's
all per forward, a verify step's all fixed but its prior slope (a row's compute, ROWS_AT_RIDGE).
Charging the fixed parts per draft instead (this module's first model: one running mean per draft of a
round's and a verify step's seconds) priced one draft at the whole fixed cost and every further draft
again at it: where a step's fixed extra was large, adaptive k settled at k = 1 or 0 where k = 4-5 paid (in
tests/test_spec_units.py's simulation). It was suspected of adaptive k's 0.95-1.11x at batch 8 for an 8B
target with a 1B draft on an H200 (fixed k 1.16-1.63x); measured with this model, the cause there was the
spread of per-sequence k that `choose_batch` removes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuserve.workers.step_cost_meter import StepCostFit, StepCostMeter

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
# A verify row's prior cost: the plain step's base over this many rows. A decode step reads the weights
# once and rows cost compute: one row's is the base over the device's FLOP-per-byte ratio (~200-300 for
# bf16 on an H100/H200). The fixed 0.2 ms this replaced priced 96 drafts at 19 ms at batch 32 (measured
# ~2.4 ms), so a large batch never drafted and never measured a verify step
ROWS_AT_RIDGE = 200
VERIFY_SLOPE_WEIGHT = 100.0  # the verify fit's slope holds its prior until drafts a step vary by ~10
# per step without drafts: back to the prior's pull after ~20 steps. 0.98 (~100 steps) let a few
# rejections in a row stop a batch-1 sequence for dozens of steps: on the CPU box adaptive k made 1.01x
# where fixed k = 1 made 1.25x (code prompts, 2026-11-27)
IDLE_DECAY = 0.9
COST_EWMA = 0.1
MIN_PLAIN_STEPS = 4  # plain steps measured before a verify step's extra time is read against them
PLAIN_PRIOR_WEIGHT = 0.05
# drafting_factor learns only once this many rounds are fitted: before, a round's price is its prior (none)
MIN_ROUNDS_FITTED = 4
# before a catch-up is measured, a token of it costs a draft forward over this many (a 1B draft on an
# H200 prefills ~240 tokens in a decode forward's time)
CATCH_UP_TOKENS_PER_FORWARD = 128
# a round that sends at least this many tokens beyond k + 2 a sequence is a catch-up: not fitted as a
# round, and priced per token (fewer make the price a small residual over a tiny count: 3-8x too high)
CATCH_UP_MIN_TOKENS = 32


@dataclass(frozen=True)
class StepCosts:
    """Seconds, for a batch of `batch` decodes: its plain decode step; what a speculating step and its
    round pay once whatever k (the verify step's fixed extra, the round's, the channel); one more draft
    row verified; one more draft forward (the next draft of every drafting sequence at once). A drafting
    step's whole cost is multiplied by `drafting_factor`: what such steps took over what these predicted."""

    batch: int
    plain_s: float
    fixed_s: float
    row_s: float
    forward_s: float
    drafting_factor: float = 1.0
    catch_up_s: float = 0.0  # a token the proposer lacks, caught up by a round
    plain_measured: bool = True  # the plain fit has MIN_PLAIN_STEPS samples (at batch > 1 only probes before)

    @property
    def share_s(self) -> float:
        """One sequence's share of the plain step."""
        return self.plain_s / self.batch

    @property
    def per_draft_s(self) -> float:
        """One more draft of one sequence: its row, and its share of the forward that made it."""
        return self.row_s + self.forward_s / self.batch


@dataclass
class _Acceptance:
    kept: float = 0.0
    checked: float = 0.0


class LineFit:
    """y = c0 + c1 * x by exponentially weighted least squares (the last ~1 / (1 - forget) samples count),
    pulled toward a prior line by two weak pseudo-samples on it (x = 0 and x = 1), so that both
    coefficients are defined before x has varied. Samples at one x then split y as the prior line's
    points do: all of it per x where the prior has no fixed part. With `slope_weight` the slope is also
    held near the prior's (a ridge term in x^2 units) until x varies by more than that: samples at one x
    then go to the fixed part. Neither coefficient goes below zero."""

    def __init__(
        self,
        c0: float,
        c1: float,
        forget: float = 0.95,
        prior_weight: float = 0.05,
        slope_weight: float = 0.0,
    ) -> None:
        self.forget = forget
        self.prior = (c0, c1)
        self.prior_weight = prior_weight
        self.slope_weight = slope_weight
        self._sums = [0.0] * 5  # weight, x, x^2, y, x y

    def observe(self, x: float, y: float) -> None:
        f = self.forget
        for i, v in enumerate((1.0, x, x * x, y, x * y)):
            self._sums[i] = f * self._sums[i] + v

    def coefficients(self, prior: tuple[float, float] | None = None) -> tuple[float, float]:
        """The fitted line; `prior` (c0, c1) in place of the constructor's, for a prior that moves."""
        c0, c1 = self.prior if prior is None else prior
        w = self.prior_weight
        # the prior's pseudo-samples: (0, c0) and (1, c0 + c1), weight w each
        pseudo = (2 * w, w, w, w * (2 * c0 + c1), w * (c0 + c1))
        n, sx, sxx, sy, sxy = (a + b for a, b in zip(self._sums, pseudo, strict=True))
        sxx, sxy = sxx + self.slope_weight, sxy + self.slope_weight * c1
        det = n * sxx - sx * sx
        c1 = (n * sxy - sx * sy) / det if det > 1e-12 else 0.0
        c0 = (sy - c1 * sx) / n
        if c1 < 0.0:
            return max(sy / n, 0.0), 0.0
        if c0 < 0.0:
            return 0.0, max(sxy / sxx, 0.0)
        return c0, c1

    def at(self, x: float) -> float:
        c0, c1 = self.coefficients()
        return c0 + c1 * x


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
        """step_prior: (base, per decode, per prefill token) seconds of a plain step before any step is
        measured; a verify row's prior follows the plain fit (ROWS_AT_RIDGE)."""
        self.max_k = max_k
        self.adaptive = adaptive
        self._acc: dict[str, _Acceptance] = {}
        self._pool = _Acceptance()  # every sequence's verifies: the prior (`prior`)
        self._plain_run = 0  # plain decode steps since the last verify step
        self.probe_after = PROBE_AFTER  # Speculation raises it where a probe's round is not overlapped
        self.probing = False  # the last choose_batch chose a probe: its round is not the batch's cost
        self.num_probes = 0
        self.longest_hidden_plain_s = 0.0
        self.decode_steps = 0  # decode-only steps observed, and the last of them that verified drafts
        self.last_verify_step = 0
        # At batch > 1, a drafting step's seconds (its verify step and round, catch-ups and all) over what
        # the fits predicted when it was chosen: the fits see only some rounds (not catch-ups) and lag the
        # batch, and the margin (BATCH_GAIN) is for what no step's time shows
        self.drafting_factor = 1.0
        self._predicted_s: float | None = None  # the drafting step under way, as the fits priced it
        self._chosen_s: float | None = None  # the last choose_batch's, until `commit` makes it the step's
        self._round_wall_s = 0.0  # the last round's seconds, whatever kind
        self._rounds_fitted = 0
        self.catch_up_token_s: float | None = None  # a token a round catches up, once measured
        # Plain decode steps, in two fits: those whose host work ran under the GPU's (async scheduling:
        # launched behind the step before, the next launched behind them), what a batch that does not
        # draft runs, and the others, beside a read-back (on a CPU, every step). A plain step next to a
        # drafting batch's verify carries ~0.8 ms of host work with the GPU idle at batch 32 on an H200:
        # fitted as what not drafting costs, it made drafting look ~15% better than it was (0.85x at
        # batch 64, acceptance 0.7). A verify step's read-back and planning are its own cost.
        # A weak prior: at 1.0 its 10 ms base kept a batch-32 step (5.5 ms) priced 6% high after 20 steps.
        self.steps = _plain_meter(step_prior)
        self.exposed_steps = _plain_meter(step_prior)
        # a verify step's seconds beyond the plain fit, by drafts; a batch that holds one k (or a probe's
        # few drafts) leaves the slope at its prior (ROWS_AT_RIDGE) and the rest to the fixed part
        self.verify = LineFit(0.0, 0.0, slope_weight=VERIFY_SLOPE_WEIGHT)
        self.round = LineFit(0.0, draft_token_prior_s)  # a round's seconds less the channel, by its largest k
        self.channel_s = 0.0  # seconds per proposer round trip

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
        """A proposer round that asked for at most `max_k` drafts of any sequence (its forwards), and sent
        `catch_up_tokens` beyond a round's usual k + 2 a sequence (a prompt, tokens made while a sequence
        did not draft). A round that caught up (CATCH_UP_MIN_TOKENS) is not fitted as a round (the first
        round of 32 new sequences, 27 ms, priced every later one); what it took over the round fit prices
        a catch-up token. A probe's round is neither: one sequence's forwards (overlapped with a plain
        step where the proposer overlaps) are not what the batch's round costs."""
        self._round_wall_s = seconds
        self.channel_s += COST_EWMA * (channel_s - self.channel_s)
        if max_k <= 0 or self.probing:
            self.num_probes += int(max_k > 0)  # counted here: choose_batch runs more than once a step
            return
        if catch_up_tokens < CATCH_UP_MIN_TOKENS:  # a few (after plain steps): a round as any other
            self.round.observe(max_k, seconds - channel_s)
            self._rounds_fitted += 1
        elif self._rounds_fitted >= MIN_ROUNDS_FITTED:
            per_token = max(seconds - channel_s - self.round.at(max_k), 0.0) / catch_up_tokens
            last = self.catch_up_token_s
            self.catch_up_token_s = per_token if last is None else last + COST_EWMA * (per_token - last)

    def observe_decode_step(
        self, num_seqs: int, num_drafts: int, seconds: float, hidden: bool = False
    ) -> None:
        """A step of decodes only (some speculating), its proposer round not counted; `hidden`: its host
        work ran under the GPU's (LLMEngine._complete). Plain steps fit the step's base and per-sequence
        cost (of each kind); a verify step's time beyond the plain fit is fitted against its drafts. (One
        fit over both priced a draft at its prior when nearly every step drafted: it could not tell the
        drafts' cost from the base.)"""
        self.decode_steps += 1
        if num_drafts == 0:
            (self.steps if hidden else self.exposed_steps).observe(0, num_seqs, seconds)
            if hidden:
                self.longest_hidden_plain_s = max(self.longest_hidden_plain_s, seconds)
            self._plain_run += 1
            return
        self._plain_run = 0
        self.last_verify_step = self.decode_steps
        if self._predicted_s is not None and self._rounds_fitted >= MIN_ROUNDS_FITTED:
            # not below 0.8: a fit that overprices plain steps would talk itself into drafting (0.5 at the end
            # of the row whose plain fit read 26.7 ms)
            ratio = min(max((seconds + self._round_wall_s) / self._predicted_s, 0.8), 3.0)
            self.drafting_factor += COST_EWMA * (ratio - self.drafting_factor)
        self._predicted_s, self._round_wall_s = None, 0.0
        fit = self._plain_fit()
        if fit.num_samples >= MIN_PLAIN_STEPS:
            self.verify.observe(num_drafts, seconds - fit.base_s - fit.per_seq_s * num_seqs)

    def _plain_fit(self) -> StepCostFit:
        """The fit of plain steps with their host work hidden; the others' where it has no sample yet (on a
        CPU no step hides it). One sample suffices: the prior is weak, and its figures (a 10 ms step, 0.1
        ms a sequence: 16.4 ms at batch 64) are not a GPU's: the first simulated batch of 64 drafted at
        acceptance 0.7 on them."""
        fit = self.steps.estimate()
        return fit if fit.num_samples > 0 else self.exposed_steps.estimate()

    def verify_cost(self, num_drafts: int) -> float:
        """Seconds a verify step with this many drafts takes beyond a plain step of the same batch."""
        c0, c1 = self._verify_line()
        return c0 + c1 * num_drafts

    def _verify_line(self) -> tuple[float, float]:
        """The verify fit, its prior a row at the plain step's base over ROWS_AT_RIDGE."""
        return self.verify.coefficients(prior=(0.0, self._plain_fit().base_s / ROWS_AT_RIDGE))

    def probe_due(self, batch_size: int) -> bool:
        """At batch > 1, whether one sequence should draft a round for evidence (PROBE_AFTER)."""
        return self.adaptive and batch_size > 1 and self._plain_run >= self.probe_after

    def forget(self, seq_id: str) -> None:
        self._acc.pop(seq_id, None)

    # ---- the choice -----------------------------------------------------------------------------
    def step_costs(self, batch_size: int) -> StepCosts:
        """This step's costs for a batch of `batch_size` decodes: one fit per step, not per sequence."""
        b = max(batch_size, 1)
        fit = self._plain_fit()
        v0, v1 = self._verify_line()
        r0, r1 = self.round.coefficients()
        return StepCosts(
            batch=b,
            plain_s=fit.base_s + fit.per_seq_s * b,
            fixed_s=v0 + r0 + self.channel_s,
            drafting_factor=self.drafting_factor if b > 1 else 1.0,
            plain_measured=fit.num_samples >= MIN_PLAIN_STEPS,
            catch_up_s=(
                r1 / CATCH_UP_TOKENS_PER_FORWARD if self.catch_up_token_s is None else self.catch_up_token_s
            ),
            row_s=v1,
            forward_s=r1,
        )

    def commit(self, ks: list[int]) -> None:
        """The step's choice is `ks`, from the last choose_batch where any drafts (Speculation.propose; the
        engine also asks whether a batch would draft while a verify step is in flight): its verify step is
        measured against that choice's price."""
        self._predicted_s = self._chosen_s if any(ks) else None
        self._chosen_s = None

    def summary(self, batch_size: int) -> dict[str, float]:
        """What the fit believes for a batch of this size (ms; benchmarks record it beside their rows): the
        costs, each plain fit's samples, the acceptance prior, the probes so far, and the gain it predicts
        for every sequence drafting max_k at that prior."""
        costs = self.step_costs(batch_size)
        a, k, b = self.prior(retry=False), self.max_k, costs.batch
        drafting_s = costs.plain_s + costs.fixed_s + k * costs.forward_s + b * k * costs.row_s
        drafting_s *= costs.drafting_factor
        return dict(
            plain_ms=1e3 * costs.plain_s,
            fixed_ms=1e3 * costs.fixed_s,
            row_ms=1e3 * costs.row_s,
            forward_ms=1e3 * costs.forward_s,
            plain_steps_hidden=self.steps.estimate().num_samples,
            plain_steps_beside_a_read_back=self.exposed_steps.estimate().num_samples,
            prior=a,
            probes=self.num_probes,
            drafting_factor=costs.drafting_factor,
            decode_steps=self.decode_steps,
            longest_hidden_plain_ms=1e3 * self.longest_hidden_plain_s,
            last_verify_step=self.last_verify_step,
            predicted_gain=b * expected_tokens(a, k) / drafting_s / (b / costs.plain_s),
        )

    def any_drafts(self, seq_ids: list[str], costs: StepCosts) -> bool:
        """Whether some sequence of the batch would draft at all: k > 0 for the most accepting one,
        since a higher acceptance never lowers the best k. One evaluation per step instead of one per
        sequence, so that a batch that does not speculate (large batches) pays almost nothing."""
        if not seq_ids or self.max_k <= 0:
            return False
        if not self.adaptive or self.probe_due(costs.batch):
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

        def rate(ks: list[int]) -> float:
            tokens = others + sum(expected_tokens(a, k) for a, k in zip(accs, ks, strict=True))
            deepest = max(ks)
            cost = costs.plain_s
            if deepest > 0:
                cost += costs.fixed_s + deepest * costs.forward_s + sum(ks) * costs.row_s
                cost += sum(c / n for c, n, k in zip(catch_up, steps_left, ks, strict=True) if k)
                cost *= costs.drafting_factor
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
            deepest, drafts = max(best_ks), sum(best_ks)
            extra_s = costs.fixed_s + deepest * costs.forward_s + drafts * costs.row_s
            extra_s += sum(c for c, k in zip(catch_up, best_ks, strict=True) if k)
            self._chosen_s = costs.plain_s + extra_s
        if not any(best_ks) and self.probe_due(costs.batch):
            can = [i for i, t in enumerate(tops) if t > 0]
            probe = min(can, key=lambda i: lacking[i]) if lacking is not None else can[0]
            best_ks[probe] = tops[probe]
            self.probing = True
        return best_ks


def _plain_meter(prior: tuple[float, float, float]) -> StepCostMeter:
    """A fit of plain steps whose samples are cut at 1.5x its prediction + 1 ms once 8 are in: one batch-64
    row on an H200 ended with its plain step priced at 26.7 ms (5.3 measured), so every draft looked free."""
    return StepCostMeter(
        prior=prior,
        prior_weight=PLAIN_PRIOR_WEIGHT,
        clip_outliers=True,
        outlier_factor=1.5,
        outlier_slack_s=0.001,
        clip_after=8,
    )


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
