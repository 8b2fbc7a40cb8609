"""What speculating costs a step, measured: the fits adaptive k (adaptive_k.py) prices drafts with.

    plain step    seconds = base + per_seq * B (StepCostMeter's ridge fit with forgetting), from plain decode
                  steps whose host work ran under the GPU's (launched behind the step before, the next
                  launched behind them: what a batch that does not draft runs); the others (beside a
                  read-back; on a CPU every step) only until one such step is measured
    verify step   its seconds beyond the plain fit, a line in its drafts (fixed + per draft row), the
                  slope held at a row's compute (the plain base over ROWS_AT_RIDGE) until drafts vary
    round         the proposer round's seconds less the channel, a line in its largest k (fixed + per
                  draft forward); a round that catches sequences up (CATCH_UP_MIN_TOKENS beyond k + 2 a
                  sequence: a prompt, tokens made while one did not draft) prices a catch-up token instead
    channel       the round trip the proposer reports, a running average
    drafting      at batch > 1, a drafting step's measured seconds (its verify step and its round) over what
                  these priced it at when it was chosen (`expect`): what the fits miss (their lag, the
                  catch-ups they leave out), multiplying the next drafting steps' price

A line needs its x to vary to tell its fixed part from its slope: a batch that holds one k for ~20 steps
leaves the split to the fit's prior: a round's all per forward, a verify step's all fixed but its prior
slope. Charging the fixed parts per draft instead (adaptive k's first model: one running mean per draft of
a round's and a verify step's seconds) priced one draft at the whole fixed cost and every further draft
again at it: where a step's fixed extra was large, adaptive k settled at k = 1 or 0 where k = 4-5 paid.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuserve.workers.step_cost_meter import StepCostFit, StepCostMeter

COST_EWMA = 0.1
MIN_PLAIN_STEPS = 4  # plain steps measured before a verify step's extra time is read against them
PLAIN_PRIOR_WEIGHT = 0.05
# A verify row's prior cost: the plain step's base over this many rows. A decode step reads the weights
# once and rows cost compute: one row's is the base over the device's FLOP-per-byte ratio (~200-300 for
# bf16 on an H100/H200). The fixed 0.2 ms this replaced priced 96 drafts at 19 ms at batch 32 (measured
# ~2.4 ms), so a large batch never drafted and never measured a verify step
ROWS_AT_RIDGE = 200
VERIFY_SLOPE_WEIGHT = 100.0  # the verify fit's slope holds its prior until drafts a step vary by ~10
# the drafting factor learns only once this many rounds are fitted: before, a round's price is its prior
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
    plain_measured: bool = True  # the plain fit has MIN_PLAIN_STEPS samples (batch > 1: no drafts before)

    @property
    def share_s(self) -> float:
        """One sequence's share of the plain step."""
        return self.plain_s / self.batch

    @property
    def per_draft_s(self) -> float:
        """One more draft of one sequence: its row, and its share of the forward that made it."""
        return self.row_s + self.forward_s / self.batch


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


class DraftCosts:
    def __init__(
        self,
        draft_token_prior_s: float = 0.0,
        step_prior: tuple[float, float, float] = (0.010, 0.0001, 0.0002),
    ) -> None:
        """step_prior: (base, per decode, per prefill token) seconds of a plain step before any step is
        measured; a verify row's prior follows the plain fit (ROWS_AT_RIDGE)."""
        # Plain decode steps, in two fits: those whose host work ran under the GPU's, and the others. A
        # plain step next to a drafting batch's verify carries ~0.8 ms of host work with the GPU idle at
        # batch 32 on an H200: fitted as what not drafting costs, it made drafting look ~15% better than it
        # was (0.85x at batch 64, acceptance 0.7). A verify step's read-back and planning are its own cost.
        # A weak prior: at 1.0 its 10 ms base kept a batch-32 step (5.5 ms) priced 6% high after 20 steps.
        self.steps = _plain_meter(step_prior)
        self.exposed_steps = _plain_meter(step_prior)
        # a verify step's seconds beyond the plain fit, by drafts; a batch that holds one k (or a probe's
        # few drafts) leaves the slope at its prior (ROWS_AT_RIDGE) and the rest to the fixed part
        self.verify = LineFit(0.0, 0.0, slope_weight=VERIFY_SLOPE_WEIGHT)
        self.round = LineFit(0.0, draft_token_prior_s)  # a round's seconds less the channel, by its largest k
        self.channel_s = 0.0  # seconds per proposer round trip
        self.catch_up_token_s: float | None = None  # a token a round catches up, once measured
        self._rounds_fitted = 0
        # At batch > 1, a drafting step's seconds (its verify step and round, catch-ups and all) over what
        # the fits priced it at when it was chosen; the margin (adaptive_k.BATCH_GAIN) is for what no
        # step's time shows
        self.drafting_factor = 1.0
        self._expected_s: float | None = None  # the drafting step under way, as the fits priced it
        self._round_wall_s = 0.0  # the last round's seconds, whatever kind
        self.longest_hidden_plain_s = 0.0

    def observe_round(
        self,
        seconds: float,
        max_k: int,
        channel_s: float = 0.0,
        catch_up_tokens: int = 0,
        probe: bool = False,
    ) -> None:
        """A proposer round that asked for at most `max_k` drafts of any sequence (its forwards), and sent
        `catch_up_tokens` beyond a round's usual k + 2 a sequence. A round that caught up
        (CATCH_UP_MIN_TOKENS) is not fitted as a round (the first round of 32 new sequences, 27 ms, priced
        every later one); what it took over the round fit prices a catch-up token. A probe's round is
        neither: one sequence's forwards (overlapped with a plain step where the proposer overlaps) are not
        what the batch's round costs."""
        self._round_wall_s = seconds
        self.channel_s += COST_EWMA * (channel_s - self.channel_s)
        if max_k <= 0 or probe:
            return
        if catch_up_tokens < CATCH_UP_MIN_TOKENS:  # a few (after plain steps): a round as any other
            self.round.observe(max_k, seconds - channel_s)
            self._rounds_fitted += 1
        elif self._rounds_fitted >= MIN_ROUNDS_FITTED:
            per_token = max(seconds - channel_s - self.round.at(max_k), 0.0) / catch_up_tokens
            last = self.catch_up_token_s
            self.catch_up_token_s = per_token if last is None else last + COST_EWMA * (per_token - last)

    def observe_plain(self, num_seqs: int, seconds: float, hidden: bool) -> None:
        """A plain decode step; `hidden`: its host work ran under the GPU's (LLMEngine._complete)."""
        (self.steps if hidden else self.exposed_steps).observe(0, num_seqs, seconds)
        if hidden:
            self.longest_hidden_plain_s = max(self.longest_hidden_plain_s, seconds)

    def observe_verify_step(self, num_seqs: int, num_drafts: int, seconds: float) -> None:
        """A decode step that verified drafts, its round not counted: beyond the plain fit, a sample of
        the verify line; with its round, against the price `expect` was given (the drafting factor)."""
        if self._expected_s is not None and self._rounds_fitted >= MIN_ROUNDS_FITTED:
            # not below 0.8: a fit that overprices plain steps would talk itself into drafting (0.5 at the
            # end of the row whose plain fit read 26.7 ms)
            ratio = min(max((seconds + self._round_wall_s) / self._expected_s, 0.8), 3.0)
            self.drafting_factor += COST_EWMA * (ratio - self.drafting_factor)
        self._expected_s, self._round_wall_s = None, 0.0
        fit = self.plain_fit()
        if fit.num_samples >= MIN_PLAIN_STEPS:
            self.verify.observe(num_drafts, seconds - fit.base_s - fit.per_seq_s * num_seqs)

    def expect(self, seconds: float | None) -> None:
        """The price of the drafting step now chosen (None: it drafts nothing, or is a probe)."""
        self._expected_s = seconds

    def plain_fit(self) -> StepCostFit:
        """The fit of plain steps with their host work hidden; the others' where it has no sample yet (on a
        CPU no step hides it). One sample suffices: the prior is weak, and its figures (a 10 ms step, 0.1
        ms a sequence: 16.4 ms at batch 64) are not a GPU's: the first simulated batch of 64 drafted at
        acceptance 0.7 on them."""
        fit = self.steps.estimate()
        return fit if fit.num_samples > 0 else self.exposed_steps.estimate()

    def verify_line(self) -> tuple[float, float]:
        """The verify fit, its prior a row at the plain step's base over ROWS_AT_RIDGE."""
        return self.verify.coefficients(prior=(0.0, self.plain_fit().base_s / ROWS_AT_RIDGE))

    def step_costs(self, batch_size: int) -> StepCosts:
        """This step's costs for a batch of `batch_size` decodes: one fit per step, not per sequence."""
        b = max(batch_size, 1)
        fit = self.plain_fit()
        v0, v1 = self.verify_line()
        r0, r1 = self.round.coefficients()
        return StepCosts(
            batch=b,
            plain_s=fit.base_s + fit.per_seq_s * b,
            fixed_s=v0 + r0 + self.channel_s,
            row_s=v1,
            forward_s=r1,
            drafting_factor=self.drafting_factor if b > 1 else 1.0,
            catch_up_s=(
                r1 / CATCH_UP_TOKENS_PER_FORWARD if self.catch_up_token_s is None else self.catch_up_token_s
            ),
            plain_measured=fit.num_samples >= MIN_PLAIN_STEPS,
        )


def catch_up_tokens(sent: int, k: int) -> int:
    """Of `sent` tokens a round carries for a sequence asked for k drafts, those beyond its usual k + 2
    (the drafts kept, the next token, a plain step's): what catches the sequence up."""
    return max(sent - k - 2, 0)


def drafting_extra_s(costs: StepCosts, ks: list[int], catch_up_s: list[float]) -> float:
    """What a step with these drafts (and each drafting sequence's catch-up) costs beyond a plain one."""
    extra = costs.fixed_s + max(ks) * costs.forward_s + sum(ks) * costs.row_s
    return extra + sum(c for c, k in zip(catch_up_s, ks, strict=True) if k)


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
