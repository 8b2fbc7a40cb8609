"""Target features cached by block hash (feature_store.py), for a feature draft with prefix caching.

- A published block's computed rows are cached by its hash; a sequence whose first step starts after
  prefix-cache hits reads them (exactly), reads zeros for a miss, and a block with rows it never
  computed is not cached. The cache evicts least recently used blocks past its byte budget.
- Blocks published before their rows come (async scheduling) are cached a step later; a verify step's
  rejected drafts never reach the cache.
- In the engine, a prompt sharing two blocks with an earlier one reads the earlier one's rows for them
  (zeros without the cache), equal to a run without prefix caching within bf16; so does a prompt whose
  cached blocks were filled by verify steps; greedy output is plain decoding's.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from recording_proposer import RecordingFeatureProposer

from fuserve import LLM, SamplingParams
from fuserve.configs import SpeculativeConfig, config_from_dict
from fuserve.speculative.feature_store import FeatureStore
from fuserve.speculative.speculation import Speculation
from fuserve.workers.block_manager import hash_block
from fuserve.workers.scheduler import ScheduledSeq, SchedulerOutput
from fuserve.workers.sequence import Sequence

BS = 4
DIM = 8
VOCAB = 300


# ---- the store on plain data --------------------------------------------------------------------
def make_seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams(), arrival_time=0.0, max_tokens=64)


def publish(seq: Sequence, num_blocks: int) -> None:
    """What the block manager's commit_computed leaves in `block_hashes` (a hit sets the first ones)."""
    seq.block_hashes = []
    parent = b""
    for i in range(num_blocks):
        parent = hash_block(parent, seq.token_ids[i * BS : (i + 1) * BS])
        seq.block_hashes.append(parent)


def step(
    store: FeatureStore, seq: Sequence, start: int, rows: torch.Tensor, drafts: int = 0, kept: int = 0
) -> None:
    """One step of one sequence: rows for positions start.. (a verify step keeps `kept` of 1 + drafts)."""
    item = ScheduledSeq(seq, rows.shape[0], start, spec_token_ids=[7] * drafts)
    sampled: int | list[int] = [7] * kept if drafts else 7
    store.record(SchedulerOutput([item]), rows, [sampled])


def feats(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_a_prefix_hit_reads_the_cached_rows_of_its_blocks() -> None:
    store = FeatureStore(block_size=BS)
    a = make_seq("a", list(range(100, 118)))  # 18 tokens: 4 full blocks
    fa = feats(18, 0)
    publish(a, 4)  # published as the prefill's tokens count as computed, before its rows come
    step(store, a, 0, fa)
    assert len(store.blocks) == 4 and store.cached_bytes == 4 * BS * DIM * 2

    b = make_seq("b", list(range(100, 112)) + [5, 6, 7])  # shares blocks 0..2 with a
    publish(b, 3)  # the block manager's hits
    fb = feats(3, 1)
    step(store, b, 12, fb)
    assert torch.equal(store.rows(b, 0, 12), fa[:12])
    assert torch.equal(store.rows(b, 12, 15), fb)

    c = make_seq("c", [9] * 12 + [5, 6, 7])  # hits no block a computed
    publish(c, 3)
    step(store, c, 12, feats(3, 2))
    assert not store.rows(c, 0, 12).any()


def test_rows_never_computed_are_not_cached() -> None:
    store = FeatureStore(block_size=BS)
    a = make_seq("a", list(range(100, 110)))
    publish(a, 2)
    step(store, a, 0, feats(10, 0))  # blocks 0, 1 cached

    d = make_seq("d", list(range(100, 108)) + [1, 2, 3, 4, 5, 6, 7])
    publish(d, 3)  # hits of 3 blocks: a computed block 1 only (block 0 was evicted)
    del store.blocks[d.block_hashes[0]]
    fd = feats(3, 3)
    step(store, d, 12, fd)
    assert not store.rows(d, 0, 4).any() and not store.rows(d, 8, 12).any()
    assert torch.equal(store.rows(d, 4, 8), store.blocks[d.block_hashes[1]])
    assert d.block_hashes[0] not in store.blocks and d.block_hashes[2] not in store.blocks

    d.token_ids.append(1)
    publish(d, 4)  # block 3, rows d computed, is cached though rows before it read zeros
    f1 = feats(1, 4)
    step(store, d, 15, f1)
    assert torch.equal(store.blocks[d.block_hashes[3]], torch.cat([fd, f1]))
    assert d.block_hashes[0] not in store.blocks and d.block_hashes[2] not in store.blocks


def test_blocks_published_before_their_rows_are_cached_when_the_rows_come() -> None:
    store = FeatureStore(block_size=BS)
    a = make_seq("a", list(range(100, 112)))
    f = feats(12, 0)
    step(store, a, 0, f[:6])  # a chunk: nothing published yet
    publish(a, 2)  # the next chunk counts as computed (async scheduling) before its rows come
    assert not store.blocks
    step(store, a, 6, f[6:7])
    assert len(store.blocks) == 1  # block 1's rows are not all here yet
    step(store, a, 7, f[7:12])
    assert torch.equal(store.blocks[a.block_hashes[1]], f[4:8])


def test_rejected_drafts_never_reach_the_cache() -> None:
    store = FeatureStore(block_size=BS)
    a = make_seq("a", list(range(100, 107)))
    f = feats(7, 0)
    publish(a, 1)
    step(store, a, 0, f)
    verify = feats(5, 1)  # the last token and 4 drafts at positions 6..10; 2 rows kept (6, 7)
    a.token_ids += [1, 2]  # the kept draft and the target's next token, taken before record
    publish(a, 2)  # 8 computed tokens: block 1 full
    step(store, a, 6, verify, drafts=4, kept=2)
    assert torch.equal(store.blocks[a.block_hashes[1]], torch.cat([f[4:6], verify[:2]]))
    assert torch.equal(store.rows(a, 0, 10)[8:], torch.zeros(2, DIM, dtype=torch.bfloat16))
    later = feats(4, 2)  # positions 8..11 again, now the target's own tokens
    a.token_ids += [3, 4, 5]
    publish(a, 3)
    step(store, a, 8, later)
    assert torch.equal(store.blocks[a.block_hashes[2]], later)


def test_the_cache_evicts_the_least_recently_used_past_its_budget() -> None:
    block_bytes = BS * DIM * 2
    store = FeatureStore(cache_bytes=2 * block_bytes, block_size=BS)
    seqs = [make_seq(f"s{i}", [i] * 5) for i in range(3)]
    for i, seq in enumerate(seqs[:2]):
        publish(seq, 1)
        step(store, seq, 0, feats(5, i))
    hit = make_seq("hit0", [0] * 5)  # reading s0's block makes it the most recent
    publish(hit, 1)
    step(store, hit, 4, feats(1, 9))
    publish(seqs[2], 1)
    step(store, seqs[2], 0, feats(5, 2))
    assert store.cached_bytes == 2 * block_bytes
    assert [seqs[0].block_hashes[0], seqs[2].block_hashes[0]] == list(store.blocks)


def test_without_a_block_size_nothing_is_cached() -> None:
    """A store the engine has not told its block size (prefix caching's) caches nothing."""
    store = FeatureStore()
    a = make_seq("a", list(range(100, 110)))
    publish(a, 2)
    step(store, a, 0, feats(10, 0))
    assert not store.blocks


def test_a_preempted_sequence_keeps_its_rows() -> None:
    store = FeatureStore(block_size=BS)
    a = make_seq("a", list(range(100, 110)))
    f = feats(10, 0)
    publish(a, 2)
    step(store, a, 0, f)
    store.blocks.clear()
    publish(a, 1)  # resumed with one block hit: recomputed from position 4
    again = feats(6, 1)
    step(store, a, 4, again)
    assert torch.equal(store.rows(a, 0, 10), torch.cat([f[:4], again]))


# ---- in the engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("featcache") / "target", "llama3", vocab_size=VOCAB, seed=4
    )


def make_llm(target: Path, prefix_caching: bool) -> LLM:
    cfg = {
        "model": {"path": str(target), "max_model_len": 160},
        "cache": {"enable_prefix_caching": prefix_caching},
    }
    return LLM(config_from_dict(cfg))


def test_a_shared_prefix_reads_the_rows_its_first_sequence_computed(target: Path) -> None:
    rng = random.Random(0)
    shared = [rng.randrange(VOCAB - 40) for _ in range(40)]  # two full blocks of 16, and some
    a = shared + [rng.randrange(VOCAB - 40) for _ in range(6)]
    b = shared + [rng.randrange(VOCAB - 40) for _ in range(9)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm_off = make_llm(target, prefix_caching=False)
    out_a = llm_off.generate([a], params)[0].outputs[0].token_ids
    c = a + out_a  # a's blocks, the third filled by verify steps
    want = [llm_off.generate([p], params)[0].outputs[0].token_ids for p in (a, b, c)]
    continuations = [p + w for p, w in zip((a, b, c), want, strict=True)]

    def run(
        llm: LLM, prompts: list[list[int]], store: FeatureStore | None = None
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Each prompt's first rows and cached tokens, run one after another with a feature draft."""
        proposer = RecordingFeatureProposer(continuations, seed=1, vocab=VOCAB)
        spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False)
        speculation = Speculation(spec, proposer)
        if store is not None:
            speculation.features = store
        llm.engine.speculation = speculation
        outs = [llm.generate([p], params)[0] for p in prompts]
        assert [o.outputs[0].token_ids for o in outs] == [want[[a, b, c].index(p)] for p in prompts]
        assert llm.engine.stats().spec.num_accepted > 0
        return [proposer.rows_of(p) for p in prompts], [o.num_cached_tokens for o in outs]

    off, _ = run(llm_off, [a, b, c])
    llm_on = make_llm(target, prefix_caching=True)
    on, cached = run(llm_on, [a, b, c])
    assert cached == [0, 32, 48]
    assert torch.equal(on[1][:32], on[0][:32])  # the very rows a computed
    for got, plain in zip(on, off, strict=True):
        torch.testing.assert_close(got.float(), plain.float(), rtol=2e-2, atol=2e-2)
    bare, cached = run(llm_on, [b, c], FeatureStore(cache_bytes=0))  # KV blocks cached, their rows not
    assert cached == [48, 48]
    assert not bare[0][:48].any() and not bare[1][:48].any()
