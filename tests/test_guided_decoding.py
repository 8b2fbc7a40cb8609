"""Guided decoding in the engine, without a server: the default model under a grammar with async
scheduling on (the step's bitmask filled after the previous step's tokens are read back, while the
forward is in flight) and off give the same tokens; a request whose grammar compiles does not hold
up the others; a grammar that fails in the engine ends its request alone."""

from __future__ import annotations

import json

import pytest

from fuserve.configs import FuserveConfig, SchedulerConfig
from fuserve.llm import LLM
from fuserve.router.guided_requests import json_schema_grammar
from fuserve.sampling_params import RequestError, SamplingParams
from fuserve.workers.block_manager import BlockManager
from fuserve.workers.scheduler import Scheduler
from fuserve.workers.sequence import Sequence

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_a_compiling_request_is_passed_over_not_waited_for() -> None:
    scheduler = Scheduler(SchedulerConfig(), BlockManager(64, 16, True))
    compiling = Sequence("a#0", [1, 2, 3], SamplingParams(), 0.0, 8)
    compiling.waiting_for_grammar = True
    ready = Sequence("b#0", [4, 5], SamplingParams(), 1.0, 8)
    scheduler.add(compiling)
    scheduler.add(ready)
    assert [item.seq for item in scheduler.schedule().scheduled] == [ready]
    compiling.waiting_for_grammar = False
    assert [item.seq for item in scheduler.schedule().scheduled][-1] is compiling


@pytest.mark.slow
def test_async_and_in_line_masks_give_the_same_guided_tokens() -> None:
    grammar = json_schema_grammar(PERSON, "schema")
    conversation = [{"role": "user", "content": "Invent a person."}]
    outputs = {}
    for mode in ("off", "on"):
        config = FuserveConfig()
        config.scheduler.async_scheduling = mode
        llm = LLM(config)
        try:
            (guided,) = llm.chat(conversation, SamplingParams(max_tokens=24, temperature=0, grammar=grammar))
            outputs[mode] = guided.outputs[0].token_ids
            assert guided.outputs[0].finish_reason == "stop"
            assert set(json.loads(guided.outputs[0].text)) == {"name", "age"}
            if mode == "off":
                with pytest.raises(RequestError, match="does not compile"):
                    bad = '{"grammars": [{"lark_grammar": "s"}]}'
                    llm.generate(["x"], SamplingParams(max_tokens=2, grammar=bad))
        finally:
            llm.engine.shutdown()
    assert outputs["on"] == outputs["off"]


def test_guided_speculation_keeps_the_guided_tokens_and_cuts_drafts_the_grammar_rejects() -> None:
    """n-gram drafts copied from a JSON example in the prompt, verified under the grammar: each logit row
    is masked by the grammar after the drafts before it, and a kept run ends where the grammar does, so
    greedy tokens equal guided decoding's without speculation; drafts the grammar rejects are cut."""
    grammar = json_schema_grammar(PERSON, "schema")
    example = '{"name": "Ann Lee", "age": 31}'
    conversation = [{"role": "user", "content": f"Here is a person: {example}. Write {example} again."}]
    params = SamplingParams(max_tokens=24, temperature=0, grammar=grammar)
    config = FuserveConfig()
    config.speculative = config.speculative.model_validate(
        {"method": "ngram", "adaptive": False, "num_speculative_tokens": 4}
    )
    llm = LLM(config)
    try:
        (spec_out,) = llm.chat(conversation, params)
        spec = llm.engine.stats().spec
        assert spec is not None and spec.num_drafts > 0 and spec.num_accepted > 0
        speculation, llm.engine.speculation = llm.engine.speculation, None
        (plain_out,) = llm.chat(conversation, params)
        llm.engine.speculation = speculation
        assert spec_out.outputs[0].token_ids == plain_out.outputs[0].token_ids
        assert set(json.loads(spec_out.outputs[0].text)) == {"name", "age"}

        seq = Sequence("g#0", [1], SamplingParams(max_tokens=8, grammar=grammar), 0.0, 8)
        guided = llm.engine.guided
        guided.add(seq)
        while guided.has_pending:
            guided.wait(1.0)
            guided.poll()
        assert llm.tokenizer is not None
        ok = llm.tokenizer.encode('{"name', add_special_tokens=False)
        bad = llm.tokenizer.encode("}}", add_special_tokens=False)
        assert guided.valid_drafts(seq, ok + bad) == len(ok)
        guided.remove(seq)
    finally:
        llm.engine.shutdown()
