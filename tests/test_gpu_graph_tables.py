"""On a GPU: a decode graph sends only the block-table columns the step uses (cuda_graphs.py), so its
static table keeps older, longer rows past them. After long sequences leave, short ones replay the same
graphs over those stale columns and must still give the eager reference path's greedy tokens."""

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


def test_short_rows_after_long_ones_match_eager(tmp_path: Path) -> None:
    folder = make_checkpoint(
        tmp_path / "llama3", "llama3", seed=5, hidden_size=256, num_attention_heads=4,
        num_key_value_heads=1, intermediate_size=512,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    long = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (200, 180, 150, 5)]
    short = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 17, 4)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    answers: dict[bool, list[list[int]]] = {}
    for graphs in (False, True):
        cfg = config_from_dict(
            {
                "model": {"path": str(folder), "dtype": "float32", "max_model_len": 256},
                "cache": {"block_size": 16, "num_blocks": 128, "enable_prefix_caching": False},
                "scheduler": {"max_num_batched_tokens": 256, "max_num_seqs": 4},
                "kernels": {"use_triton": "on", "cuda_graphs": graphs},
            }
        )
        llm = LLM(cfg)
        answers[graphs] = [
            c.outputs[0].token_ids for c in llm.generate(long, params) + llm.generate(short, params)
        ]
        llm.engine.shutdown()
    # the long batch: 14 table columns; the short one: 3 at most, over the long rows' stale columns
    assert answers[True] == answers[False]
