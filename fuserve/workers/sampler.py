"""Turn each sequence's last logits into its next token, batched over the step.

Order per row: penalties (repetition over prompt+output as in HF, presence/frequency over the
output as in the OpenAI API) -> logprobs of that distribution -> greedy argmax, or temperature,
top-k, top-p, min-p and a draw. A seeded request draws from a generator keyed by (seed, output
position), so its tokens do not depend on what else is in the batch or on preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuserve.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    """What the sampler needs of one row: its params and its tokens so far (for penalties)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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


def _filter(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask out tokens outside top-k, outside the top-p nucleus, or under min_p x the best prob."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs
    drop |= cum_before >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> list[SampleResult]:
        """logits: [S, V] for S rows, any float dtype."""
        logits = _apply_penalties(logits.float(), rows)
        want_logprobs = [r.params.logprobs is not None for r in rows]
        logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None

        tokens = logits.argmax(dim=-1)
        rand_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand_rows:
            idx = torch.tensor(rand_rows, device=logits.device)
            sub = logits[idx]
            ps = [rows[i].params for i in rand_rows]
            temp = torch.tensor([p.temperature for p in ps], device=logits.device).unsqueeze(1)
            sub = _filter(
                sub / temp,
                torch.tensor([p.top_k for p in ps], device=logits.device),
                torch.tensor([p.top_p for p in ps], device=logits.device),
                torch.tensor([p.min_p for p in ps], device=logits.device),
            )
            probs = sub.softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(rand_rows):
                p = rows[i].params
                if p.seed is None:
                    noise[j].exponential_()
                else:
                    g = torch.Generator(device=logits.device)
                    g.manual_seed((p.seed * 1_000_003 + len(rows[i].output_token_ids)) % (1 << 63))
                    noise[j].exponential_(generator=g)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
            tokens[idx] = (probs / noise).argmax(dim=-1)

        token_list = tokens.tolist()
        results = [SampleResult(t) for t in token_list]
        if logprobs is not None:
            for i, r in enumerate(rows):
                n = r.params.logprobs
                if n is None:
                    continue
                tok = token_list[i]
                top: list[tuple[int, float]] = []
                if n > 0:
                    vals, ids = logprobs[i].topk(n)
                    top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                results[i].logprobs = TokenLogprobs(tok, float(logprobs[i, tok]), top)
        return results
