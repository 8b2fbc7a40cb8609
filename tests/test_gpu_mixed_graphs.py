"""On a GPU: steps with prompt tokens (chunks beside decodes, whole prompts) replay the mixed-step CUDA
graphs (cuda_graphs.MixedGraphs) and give the eager path's greedy tokens and logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_mixed_steps_replay_graphs_and_match_eager(tmp_path: Path) -> None:
    folder = make_checkpoint(
        tmp_path / "llama3", "llama3", seed=7, hidden_size=256, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=512,
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 70, 9, 120, 40, 1, 55)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    answers, replays = {}, {}
    for max_tokens in (0, 96):
        cfg = config_from_dict(
            {
                "model": {"path": str(folder), "dtype": "float32", "max_model_len": 256},
                "cache": {"block_size": 16, "num_blocks": 128},
                "scheduler": {"max_num_batched_tokens": 96, "max_num_seqs": 4},
                "kernels": {"use_triton": "on", "cuda_graphs": True, "cuda_graph_max_tokens": max_tokens},
            }
        )
        llm = LLM(cfg)
        runner = llm.engine.executor.worker.runner
        assert (runner.mixed_graphs is None) == (max_tokens == 0)
        count = [0]
        if runner.mixed_graphs is not None:
            assert runner.mixed_graphs.buckets == [16, 32, 64, 96]
            run = runner.mixed_graphs.run

            def counted(*a, run=run, count=count, **k):  # noqa: ANN002, ANN003, ANN202
                count[0] += 1
                return run(*a, **k)

            runner.mixed_graphs.run = counted
        answers[max_tokens] = llm.generate(prompts, params)
        replays[max_tokens] = count[0]
        llm.engine.shutdown()
    assert replays[96] >= 3  # 7 prompts of 298 tokens in 96-token steps, four at a time
    for eager, graphed in zip(answers[0], answers[96], strict=True):
        assert graphed.outputs[0].token_ids == eager.outputs[0].token_ids
        got = [lp.logprob for lp in graphed.outputs[0].logprobs]
        want = [lp.logprob for lp in eager.outputs[0].logprobs]
        assert got == pytest.approx(want, abs=1e-3)
