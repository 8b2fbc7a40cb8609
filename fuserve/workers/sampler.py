"""Turn each sequence's last logits into its next token, batched over the step.

Order per row: (the grammar's token mask, applied by the model runner before this) -> penalties
(repetition over prompt+output as in HF, presence/frequency over the output as in the OpenAI API)
-> logit_bias -> logprobs of that distribution -> greedy argmax, or temperature,
top-k, top-p, min-p and a draw. A seeded request draws from a generator keyed by (seed, output
position), so its tokens do not depend on what else is in the batch or on preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuserve.core_messages import TokenLogprobs
from fuserve.sampling_params import SamplingParams
from fuserve.speculative.rejection import rejection_sample
from fuserve.workers.kernels.argmax import greedy_tokens
from fuserve.workers.kernels.nucleus_threshold import nucleus_cut, nucleus_threshold_ref

NUCLEUS_CANDIDATES = 256  # top values a top-p row's cut-off is first looked for in (nucleus_threshold.py)
SORT_BELOW_ROWS = 16  # on a GPU, fewer rows than this find their top-p cut-off by sorting


@dataclass
class SampleRequest:
    """What the sampler needs of one row: its params and its tokens so far (for penalties)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # may be left empty where no penalty reads it (num_output_tokens given)
    # a speculating sequence's row j follows j drafts that are not in output_token_ids: its token is
    # output position num_output_tokens + num_drafts_before (what a seeded draw is keyed on)
    num_drafts_before: int = 0
    num_output_tokens: int | None = None  # None: len(output_token_ids)

    @property
    def output_position(self) -> int:
        n = len(self.output_token_ids) if self.num_output_tokens is None else self.num_output_tokens
        return n + self.num_drafts_before


@dataclass
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None = None


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted(set(r.prompt_token_ids) | set(r.output_token_ids)), device=logits.device
            )
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            ids, counts = torch.tensor(r.output_token_ids, device=logits.device).unique(return_counts=True)
            logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def _apply_logit_bias(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's biases added to its logits (-100 bans a token, +100 forces it)."""
    biased = [(i, r.params.logit_bias) for i, r in enumerate(rows) if r.params.logit_bias]
    if not biased:
        return logits
    row_idx = [i for i, bias in biased for _ in bias]
    token_idx = [t for _, bias in biased for t in bias]
    values = [v for _, bias in biased for v in bias.values()]
    device = logits.device
    logits.index_put_(
        (torch.tensor(row_idx, device=device), torch.tensor(token_idx, device=device)),
        torch.tensor(values, device=device, dtype=logits.dtype),
        accumulate=True,
    )
    return logits


def _filtered_probs(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """softmax(scaled) with 0 for tokens outside each row's top-k, top-p nucleus or min-p set. Each
    filter is a cut-off probability and a row keeps the tokens at or above the highest of its cuts, so
    no row sorts the vocabulary (kernels/nucleus_threshold.py). The rows are not renormalized: the
    exponential race in `_draw` does not need it."""
    probs = scaled.softmax(dim=-1)
    if not any(has_filter(p) for p in params):  # the common case costs nothing more
        return probs
    device, vocab = probs.device, probs.shape[-1]
    cut = torch.zeros(len(params), device=device)
    kept_mass: torch.Tensor | float = 1.0
    top_p_rows = [p for p in params if p.top_p < 1.0]
    k_max = min(vocab, max(p.top_k for p in params))
    # a GPU sorts a few rows faster than it runs a topk (nucleus_threshold.py's measurements)
    sort_rows = probs.is_cuda and len(params) < SORT_BELOW_ROWS
    if top_p_rows and not sort_rows and not all(0 < p.top_k < vocab for p in top_p_rows):
        k_max = min(vocab, max(k_max, NUCLEUS_CANDIDATES))  # a few hundred usually hold the nucleus
    top = probs.topk(k_max, dim=-1).values if k_max > 0 else probs[:, :0]
    if any(p.top_k > 0 for p in params):
        k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else k_max for p in params], device=device)
        limited = torch.tensor([0 < p.top_k < vocab for p in params], device=device)
        cut = torch.where(limited, top.gather(1, (k - 1).unsqueeze(1)).squeeze(1), cut)
        # ties with the k-th token stay, as in vLLM
        if top_p_rows:
            kept_mass = probs.mul(probs >= cut.unsqueeze(1)).sum(dim=-1)
    if top_p_rows:
        top_p = torch.tensor([p.top_p for p in params], device=device)
        target = (top_p * kept_mass).float()  # the nucleus of the top-k's renormalized distribution
        nucleus = nucleus_threshold_ref(probs, target) if sort_rows else nucleus_cut(probs, target, top)
        cut = torch.maximum(cut, torch.where(top_p < 1.0, nucleus, 0.0))
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        cut = torch.maximum(cut, min_p * probs.amax(dim=-1))
    return probs.masked_fill_(probs < cut.unsqueeze(1), 0.0)


@dataclass
class SampledBatch:
    """A step's draws, still on the device. `start_copy` queues their copy to pinned host memory
    right behind the sampling kernels, so `results` waits for this step alone, not for whatever
    was queued after it."""

    tokens: torch.Tensor  # [S] int64
    chosen_logprobs: torch.Tensor | None = None  # [S]
    top_ids: torch.Tensor | None = None  # [S, K]
    top_logprobs: torch.Tensor | None = None  # [S, K]
    num_top: list[int | None] = field(default_factory=list)  # per row: None = no logprobs wanted
    device_tokens: torch.Tensor | None = None  # stays on the device for the next step's inputs
    started: torch.cuda.Event | None = None  # recorded (with timing) before the step's first kernel
    # [T, hidden] bf16, one row per token of the step (sampling or not), the target's last layer output
    # before its final norm: only when the model keeps features, for a feature-reading draft
    features: torch.Tensor | None = None
    _event: torch.cuda.Event | None = None

    def __post_init__(self) -> None:
        self.device_tokens = self.tokens

    def start_copy(self) -> None:
        if self.tokens.device.type != "cuda":
            return
        for name in ("tokens", "chosen_logprobs", "top_ids", "top_logprobs", "features"):
            t = getattr(self, name)
            if t is not None:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                setattr(self, name, host)
        self._event = torch.cuda.Event(enable_timing=self.started is not None)
        self._event.record()

    def ready(self) -> bool:
        """Whether `results` would return without waiting for the device."""
        return self._event is None or self._event.query()

    def synchronize(self) -> None:
        """Wait until the device has written this batch's tokens back (no-op on the CPU)."""
        if self._event is not None:
            self._event.synchronize()

    def device_seconds(self) -> float | None:
        """The device's time from the step's first kernel to its read-back, once synchronized: what
        the step cost the GPU, apart from the host's wait for it (None off CUDA)."""
        if self.started is None or self._event is None:
            return None
        return self.started.elapsed_time(self._event) / 1e3

    def token_ids(self) -> list[int]:
        """The sampled tokens alone, one per row (`results` without an object per row)."""
        self.synchronize()
        return self.tokens.tolist()

    def results(self) -> list[SampleResult]:
        self.synchronize()
        tokens = self.tokens.tolist()
        out = [SampleResult(t) for t in tokens]
        if self.chosen_logprobs is not None:
            chosen = self.chosen_logprobs.tolist()
            ids = self.top_ids.tolist() if self.top_ids is not None else None
            vals = self.top_logprobs.tolist() if self.top_logprobs is not None else None
            for i, n in enumerate(self.num_top):
                if n is None:
                    continue
                top = list(zip(ids[i][:n], vals[i][:n], strict=True)) if n and ids and vals else []
                out[i].logprobs = TokenLogprobs(tokens[i], chosen[i], top)
        return out


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> list[SampleResult]:
        return self.sample(logits, rows).results()

    def sample(
        self, logits: torch.Tensor, rows: list[SampleRequest], draft_ids: list[int] | None = None
    ) -> SampledBatch:
        """logits: [S, V] for S rows, any float dtype. Issues device work only: no host sync.
        draft_ids: per row, the speculative draft it verifies (NO_DRAFT for none): a sampled row then
        keeps or replaces it by rejection sampling (speculative/rejection.py); a greedy row's argmax
        is its verdict already."""
        if argmax_only(rows):
            return SampledBatch(greedy_tokens(logits))
        logits = _apply_logit_bias(_apply_penalties(logits.float(), rows), rows)
        num_top = [r.params.logprobs for r in rows]
        logprobs = logits.log_softmax(dim=-1) if any(n is not None for n in num_top) else None

        rand_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(rand_rows) == len(rows):
            tokens = _draw(logits, rows, draft_ids)
        else:
            tokens = logits.argmax(dim=-1)
            if rand_rows:
                idx = torch.tensor(rand_rows, device=logits.device)
                drafts = [draft_ids[i] for i in rand_rows] if draft_ids else None
                tokens[idx] = _draw(logits[idx], [rows[i] for i in rand_rows], drafts)

        batch = SampledBatch(tokens, num_top=num_top)
        if logprobs is not None:
            batch.chosen_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            k = max(n or 0 for n in num_top)
            if k > 0:
                batch.top_logprobs, batch.top_ids = logprobs.topk(k, dim=-1)
        return batch


def _draw(
    logits: torch.Tensor, rows: list[SampleRequest], draft_ids: list[int] | None = None
) -> torch.Tensor:
    """One token per row from softmax(logits / T), after the rows' filters: [S] int64. A row with a
    draft (draft_ids) keeps it or replaces it by rejection sampling, which draws from the same
    distribution (speculative/rejection.py)."""
    device = logits.device
    params = [r.params for r in rows]
    scaled = logits / torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    probs = _filtered_probs(scaled, params)
    noise = torch.empty_like(probs)
    uniform = torch.empty(len(rows), device=device) if draft_ids is not None else None
    seeded = [j for j, p in enumerate(params) if p.seed is not None]
    if len(seeded) < len(params):
        noise.exponential_()  # every unseeded row in one call
        if uniform is not None:
            uniform.uniform_()
    for j in seeded:
        g = torch.Generator(device=device)
        g.manual_seed((params[j].seed * 1_000_003 + rows[j].output_position) % (1 << 63))
        noise[j].exponential_(generator=g)
        if uniform is not None:
            uniform[j : j + 1].uniform_(generator=g)
    if uniform is not None:
        drafts = torch.tensor(draft_ids, device=device)
        return rejection_sample(probs, drafts, uniform, noise)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
    return probs.div_(noise).argmax(dim=-1)


def argmax_only(rows: list[SampleRequest]) -> bool:
    """Whether every row's token is the plain argmax of its logits (greedy, no logprobs, no penalty, no
    logit_bias, no grammar): then tensor-parallel ranks find it without gathering the logits
    (vocab_parallel_argmax.py)."""
    return all(
        r.params.greedy
        and r.params.logprobs is None
        and not has_penalty(r.params)
        and not r.params.logit_bias
        and r.params.grammar is None
        for r in rows
    )


def has_filter(p: SamplingParams) -> bool:
    """Whether the row keeps only part of the vocabulary (top-k, top-p or min-p)."""
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
