"""A two-branch tree (speculative.second_best): the draft's second-best token beside each draft, verified
in the same step at the draft's position. The host's rule (alternatives.py), the step plan it makes, the
scheduler's K/V move of a kept alternative, and the engine end to end: greedy output equal to the plain
run's, and the features a feature draft is handed equal to HF's, so every kept alternative's K/V and row
went to its position."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import make_checkpoint
from decode_rows_check import check_decode_rows
from recording_proposer import RecordingFeatureProposer

from fuserve import LLM, SamplingParams
from fuserve.configs import FuserveConfig, SchedulerConfig, config_from_dict
from fuserve.speculative.alternatives import alternative_kept, kept_rows
from fuserve.speculative.proposer import ProposeRequest
from fuserve.speculative.speculation import Speculation
from fuserve.workers.block_manager import BlockManager
from fuserve.workers.scheduler import Scheduler
from fuserve.workers.sequence import Sequence
from fuserve.workers.step_plan import StepPlan, build_step_plan

VOCAB = 300


# ---- the rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row_tokens", "want_rows", "want_took"),
    [
        ([5, 6, 7, 8, 9], [0, 1, 2], None),  # every draft kept: the chain's rows
        ([5, 9, 1, 8, 1], [0, 1], None),  # draft 2 rejected; its alternative (4) is not the target's 9
        ([5, 4, 1, 8, 2], [0, 1, 4], 1),  # draft 2 rejected for its alternative: that row gives one more
        ([3, 0, 0, 2, 8], [0, 3], 0),  # draft 1 rejected for its alternative 3
        ([9, 6, 7, 8, 9], [0], None),  # draft 1 rejected, no alternative matches
    ],
)
def test_kept_rows(row_tokens: list[int], want_rows: list[int], want_took: int | None) -> None:
    """Chunk [last, 5, 6, 3, 4]: rows 0-2 the chain's (the last verifies 5, ...), rows 3-4 the target's
    token after each alternative."""
    drafts, alts = [5, 6], [3, 4]
    rows = kept_rows(row_tokens, drafts, alts)
    assert rows == want_rows
    assert alternative_kept([row_tokens[i] for i in rows], drafts, alts) == want_took


# ---- the plan and the scheduler -----------------------------------------------------------------
def test_the_plan_puts_alternatives_after_the_drafts_at_their_positions_and_moves_a_kept_ones_kv() -> None:
    bs = 4
    sched = Scheduler(SchedulerConfig(), BlockManager(num_blocks=16, block_size=bs))
    seq = Sequence("a", list(range(10, 16)), SamplingParams(temperature=0.0), arrival_time=0.0, max_tokens=20)
    sched.add(seq)
    out = sched.schedule()  # the prompt
    sched.on_launched(out)
    sched.update_from_output(out, [20])
    seq.spec_token_ids, seq.spec_alt_ids = [21, 22, 23], [31, 32]
    out = sched.schedule()
    [item] = out.scheduled
    assert (item.num_new_tokens, item.num_known_tokens, item.num_rows) == (6, 1, 6)
    plan = build_step_plan(out, bs)
    assert plan.input_ids == [20, 21, 22, 23, 31, 32]
    assert plan.positions == [6, 7, 8, 9, 7, 8]  # the alternatives at their drafts' positions
    table = seq.block_table
    assert plan.slot_mapping == [table[i // bs] * bs + i % bs for i in range(6, 12)]  # slots in order
    assert plan.context_lens == [12]
    assert (plan.num_drafts, plan.num_alternatives, plan.num_logit_rows) == ([3], [2], 6)
    assert plan.logit_token_indices() == [0, 1, 2, 3, 4, 5]
    assert plan.draft_ids == [21, 22, 23, -1, -1, -1]
    rows = plan.as_decode_rows()  # what a GPU's decode graphs replay: a row per token
    assert rows is not None and rows.own_last_keys and rows.slot_mapping == plan.slot_mapping
    assert rows.context_lens == [7, 8, 9, 10, 8, 9]  # an alternative sees its position's prefix, then itself
    sched.on_launched(out)
    # draft 2 (22) rejected for its alternative 32; the target's token after it: 40
    sched.update_from_output(out, [[21, 32, 40]])
    assert seq.token_ids[6:] == [20, 21, 32, 40]
    assert seq.num_computed_tokens == 9  # 20, 21 and 32 have K/V (32's once moved), 40 comes next
    src, dst = 6 + 4 + 1, 6 + 2  # 32 was written at slot index 11, belongs at position 8
    seq.spec_token_ids, seq.spec_alt_ids = [], []
    out = sched.schedule()
    assert out.kv_copies == [table[src // bs] * bs + src % bs, table[dst // bs] * bs + dst % bs]
    assert build_step_plan(out, bs).kv_copies == out.kv_copies
    sched.on_launched(out)
    sched.update_from_output(out, [41])
    assert sched.schedule().kv_copies == []  # moved once


def test_a_kept_alternatives_move_waits_for_a_step_that_runs() -> None:
    """The sequence ends with the alternative's step: its published blocks may be prefix hits later, so
    the move is not dropped with an empty step but goes with the next one that runs a forward."""
    bs = 4
    sched = Scheduler(SchedulerConfig(), BlockManager(num_blocks=16, block_size=bs))
    seq = Sequence("a", list(range(10, 16)), SamplingParams(temperature=0.0), arrival_time=0.0, max_tokens=3)
    sched.add(seq)
    out = sched.schedule()
    sched.on_launched(out)
    sched.update_from_output(out, [20])
    seq.spec_token_ids, seq.spec_alt_ids = [21, 22], [31, 32]
    out = sched.schedule()
    sched.on_launched(out)
    assert sched.update_from_output(out, [[21, 32, 40]]) == [seq]  # max_tokens reached
    empty = sched.schedule()
    assert empty.is_empty and empty.kv_copies == []
    sched.add(Sequence("b", [1, 2, 3], SamplingParams(), arrival_time=1.0, max_tokens=2))
    assert len(sched.schedule().kv_copies) == 2


# ---- the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("alt") / "target", "llama3", vocab_size=VOCAB, seed=4)


def make_config(target: Path, speculative: bool = True, **sections: Any) -> FuserveConfig:
    """The tiny target, as `sections` say; with `speculative` an n-gram block with second_best on (no
    file config allows that: the tests put a proposer that offers alternatives in the n-gram's place)."""
    cfg: dict[str, Any] = {
        **sections,
        "model": {"path": str(target), "max_model_len": 160, **sections.get("model", {})},
    }
    if speculative:
        cfg["speculative"] = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    config = config_from_dict(cfg)
    if speculative:
        config = config.model_copy(
            update={"speculative": config.speculative.model_copy(update={"second_best": True})}
        )
    return config


def make_llm(target: Path, speculative: bool = True, **sections: Any) -> LLM:
    return LLM(make_config(target, speculative, **sections))


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt with its output."""
    return [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]


def hf_features(target: Path, sequences: list[list[int]]) -> dict[tuple[int, ...], torch.Tensor]:
    """HF's pre-norm last hidden states of each token list: [len, hidden] fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    captured: list[torch.Tensor] = []
    model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    out = {}
    with torch.inference_mode():
        for seq in sequences:
            captured.clear()
            model(torch.tensor([seq]))
            out[tuple(seq)] = captured[0][0]
    return out


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_greedy_with_alternatives_equals_plain_and_features_stay_the_targets(
    target: Path, async_scheduling: str
) -> None:
    """Preemption (10 blocks for ~4 x 60 tokens), chunked prefill (a 24-token budget), and alternatives
    kept: the output is the plain run's, and every round's features are HF's for the tokens so far (a
    kept alternative's K/V left at its written slot, or its row left out, would change them)."""
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB - 40) for _ in range(n)] for n in (30, 7, 45, 19)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    sections = dict(
        cache={"num_blocks": 10},
        scheduler={"max_num_batched_tokens": 24, "async_scheduling": async_scheduling},
    )
    plain = run(make_llm(target, speculative=False, **sections), prompts, params)
    llm = make_llm(target, **sections)
    recorder = RecordingFeatureProposer(plain, seed=1, vocab=VOCAB, alternatives=True)
    llm.engine.speculation = Speculation(llm.config.speculative, recorder)
    assert llm.engine.speculation.second_best
    got = run(llm, prompts, params)
    assert got == plain
    stats = llm.engine.stats()
    assert 0 < stats.spec.num_alternatives_kept < stats.spec.num_alternatives
    assert 0 < stats.spec.num_accepted < stats.spec.num_drafts
    assert stats.num_preemptions > 0
    want = hf_features(target, plain)
    for _, tokens, rows in recorder.snapshots:
        full = next(w for seq, w in want.items() if list(seq[: len(tokens)]) == tokens)
        torch.testing.assert_close(rows.float(), full[: len(tokens) - 1], rtol=2e-2, atol=2e-2)


def test_verify_steps_with_alternatives_as_decode_rows_give_the_same_hidden_states(target: Path) -> None:
    """What a GPU's decode graphs run for a verify step with alternatives (a decode row per token, each
    alternative reading its own key at its slot) against the varlen path with positions, on every such
    step of a run."""
    prompts = [[5, 6, 7, 8, 9, 10], list(range(40, 60))]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    plain = run(make_llm(target, speculative=False), prompts, params)
    llm = make_llm(target)
    checked = check_decode_rows(llm.engine.executor.worker.runner, lambda plan: plan.has_alternatives)
    recorder = RecordingFeatureProposer(plain, seed=2, vocab=VOCAB, alternatives=True)
    llm.engine.speculation = Speculation(llm.config.speculative, recorder)
    got = run(llm, prompts, params)
    assert got == plain
    assert checked and llm.engine.stats().spec.num_alternatives_kept > 0


class FixedProposer:
    """Drafts 1, 2 with alternatives 3, 4 for every sequence."""

    reads_features = False

    def __init__(self) -> None:
        self.last_alternatives: list[list[int]] = []

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        self.last_alternatives = [[3, 4][: r.k] for r in requests]
        return [[1, 2][: r.k] for r in requests]

    def release(self, seq_ids: list[str]) -> None:
        pass


def test_only_greedy_sequences_get_alternatives(target: Path) -> None:
    """The two-candidate rule is built for greedy rows only: a sampling sequence verifies its chain."""
    llm = make_llm(target)
    llm.engine.speculation = Speculation(llm.config.speculative, FixedProposer())
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0.8, seed=1, ignore_eos=True))
    stats = llm.engine.stats().spec
    assert stats.num_drafts > 0 and stats.num_alternatives == 0
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert llm.engine.stats().spec.num_alternatives > 0


# ---- on a GPU: Triton kernels, the decode graphs serving verify steps with alternatives -------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_greedy_with_alternatives_equals_plain_in_graphs_and_eagerly(target: Path, dtype: str) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(VOCAB - 40) for _ in range(n)] for n in (30, 7, 45, 19, 80)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    sections = dict(
        model={"path": str(target), "max_model_len": 160, "device": "cuda", "dtype": dtype},
        scheduler={"async_scheduling": "on"},
        cache={"num_blocks": 256},  # several engines in one process: none takes the whole GPU
    )
    plain = run(make_llm(target, speculative=False, **sections), prompts, params)
    for graphs in (True, False):
        llm = make_llm(target, kernels={"cuda_graphs": graphs}, **sections)
        runner = llm.engine.executor.worker.runner
        assert (runner.graphs is not None and runner.graphs.own_last_keys) == graphs
        graphed = runner._graphed
        seen: list[bool] = []

        def watch(plan: StepPlan, graphed=graphed, seen=seen):  # noqa: ANN202
            chosen = graphed(plan)
            if plan.has_alternatives:
                seen.append(chosen is not None)
            return chosen

        runner._graphed = watch
        recorder = RecordingFeatureProposer(plain, seed=1, vocab=VOCAB, alternatives=True)
        llm.engine.speculation = Speculation(llm.config.speculative, recorder)
        got = run(llm, prompts, params)
        assert got == plain, f"graphs={graphs}"
        assert llm.engine.stats().spec.num_alternatives_kept > 0
        assert seen and all(seen) == graphs and any(seen) == graphs
        llm.engine.shutdown()
