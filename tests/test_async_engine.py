"""The asyncio engine: streams per step, aborts on consumer exit, isolates bad requests."""

from __future__ import annotations

import asyncio

import pytest
from checkpoints import make_checkpoint

from fuserve import LLM, RequestError, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.workers.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory):
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama3")
    return config_from_dict(
        {"model": {"path": str(folder), "max_model_len": 128}, "cache": {"num_blocks": 64}}
    )


@pytest.fixture(scope="module")
def engine(config):
    eng = AsyncEngine(config)
    yield eng
    eng.shutdown()


async def collect(engine: AsyncEngine, prompt: str, params: SamplingParams) -> list:
    return [out async for out in engine.generate(prompt, params)]


def test_streams_match_offline_greedy(engine: AsyncEngine, config) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main() -> list[list]:
        return await asyncio.gather(*(collect(engine, p, params) for p in ["abc", "hello world", "x"]))

    streams = asyncio.run(main())
    offline = LLM(config).generate(["abc", "hello world", "x"], params)
    for outs, ref in zip(streams, offline, strict=True):
        assert len(outs) == 12, "one output per step"
        assert [t for o in outs for t in o.delta_token_ids] == ref.outputs[0].token_ids
        assert "".join(o.delta_text for o in outs) == ref.outputs[0].text
        assert outs[-1].finished and outs[-1].finish_reason == "length"


def test_n_sequences_and_consumer_exit_aborts(engine: AsyncEngine) -> None:
    async def main() -> None:
        outs = await collect(engine, "abc", SamplingParams(n=3, max_tokens=4, seed=1, ignore_eos=True))
        assert {o.index for o in outs if o.finished} == {0, 1, 2}
        gen = engine.generate("abc", SamplingParams(max_tokens=100, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()  # the client went away
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not engine.engine.has_unfinished():
                break

    asyncio.run(main())
    bm = engine.engine.block_manager
    assert not engine.engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks, "the aborted request kept its blocks"


def test_bad_request_raises_and_engine_keeps_serving(engine: AsyncEngine) -> None:
    async def main() -> None:
        with pytest.raises(RequestError, match="prompt is empty"):
            await collect(engine, "", SamplingParams())
        outs = await collect(engine, "ok", SamplingParams(max_tokens=2, ignore_eos=True))
        assert outs[-1].finished

    asyncio.run(main())
    assert engine.healthy


def test_a_penalized_sequence_turns_overlap_off_while_it_lives(config) -> None:
    """A penalty reads every earlier token on the host, so while a penalized sequence waits or runs the
    engine does not queue a step before reading the last one back; once it ends, overlap resumes. Its
    tokens are those it gets with async scheduling off."""
    from fuserve.workers.engine import LLMEngine

    pen = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)
    plain = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    got: dict[str, list[int]] = {}
    for mode in ("on", "off"):
        cfg = config.model_copy(deep=True)
        cfg.scheduler.async_scheduling = mode
        engine = LLMEngine(cfg)
        engine.add_request("plain", [5, 6, 7], plain)
        engine.add_request("pen", [5, 6, 7, 6, 5], pen)
        tokens: dict[str, list[int]] = {"pen": [], "plain": []}
        overlap = []
        while engine.has_unfinished():
            overlap.append(engine._can_overlap())
            for out in engine.step():
                tokens[out.request_id] += out.delta_token_ids
        engine.shutdown()
        got[mode] = tokens["pen"]
        if mode == "on":
            assert not overlap[0] and overlap[-1], overlap
            assert overlap.index(True) >= 6, "overlap came back before the penalized sequence ended"
    assert got["on"] == got["off"] and len(got["on"]) == 6
