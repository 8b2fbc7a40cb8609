"""Speculation with a feature-reading (EAGLE-1) draft: the target's features, the draft, the channel.

- The features the engine hands a proposer are HF transformers' last hidden states before the final
  norm (the norm's input; HF's output_hidden_states[-1] is after it), row for row, through chunked
  prefill, preemption and rejected drafts; a prefix-cache hit on a new sequence reads its cached rows
  from the store's cache by block hash (tests/test_feature_cache.py has the rest).
- Greedy output with a random-weight feature draft is plain decoding's, with preemption and prefix hits.
- The served draft proposes what training/eagle_model.py's EagleDraft proposes, chained as drafting
  runs (and as eval_eagle.py's unrolled passes score it), for the same weights and features, through
  rollback; with the standardization folded into the file (EagleDraft.fold_standardization) it equals
  the unfolded draft reading standardized features.
- With speculative.second_best the drafts are the same, and beside each the runner offers EagleDraft's
  second-best token of the same candidates, never the draft itself (also through the channel).
- Rounds through a real draft server (features on the channel, resent from 0 after a reconnect) equal
  the in-process runner.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import make_checkpoint
from recording_proposer import RecordingFeatureProposer

from fuserve import LLM, SamplingParams
from fuserve.configs import CacheConfig, DraftPlacementConfig, KernelConfig, ModelConfig, config_from_dict
from fuserve.speculative.proposer import ProposeRequest, feature_rows_begin
from fuserve.speculative.speculation import Speculation

VOCAB = 300


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("feat") / "target", "llama3", vocab_size=VOCAB, seed=4)


@pytest.fixture(scope="module")
def hf_features(target: Path):
    """HF's pre-norm last hidden states of a token list: [len, hidden] fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    captured: list[torch.Tensor] = []
    model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    @torch.inference_mode()
    def features(tokens: list[int]) -> torch.Tensor:
        captured.clear()
        out = model(torch.tensor([tokens]), output_hidden_states=True)
        f = captured[0][0]
        torch.testing.assert_close(model.model.norm(f), out.hidden_states[-1][0])  # HF's is post-norm
        return f

    return features


def make_llm(target: Path, **sections: Any) -> LLM:
    cfg: dict[str, Any] = {"model": {"path": str(target), "max_model_len": 160}, **sections}
    cfg["speculative"] = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    return LLM(config_from_dict(cfg))


def test_features_are_hf_pre_norm_hidden_states(target: Path, hf_features) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB - 40) for _ in range(n)] for n in (30, 7, 45, 19)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    # ~4 x 70 tokens in 14 blocks of 16: preemption; a 24-token budget: chunked prefill
    sections = dict(cache={"num_blocks": 14}, scheduler={"max_num_batched_tokens": 24})
    llm = make_llm(target, **sections)
    plain = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    llm = make_llm(target, **sections)
    recorder = RecordingFeatureProposer(plain, seed=1, vocab=VOCAB)
    llm.engine.speculation = Speculation(llm.config.speculative, recorder)
    assert llm.engine.executor.worker.model.keep_features
    got = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    assert got == plain
    stats = llm.engine.stats()
    assert 0 < stats.spec.num_accepted < stats.spec.num_drafts  # drafts kept and rejected
    assert stats.num_preemptions > 0
    want = {tuple(seq): hf_features(seq) for seq in plain}
    for _, tokens, rows in recorder.snapshots:
        full = next(w for seq, w in want.items() if list(seq[: len(tokens)]) == tokens)
        torch.testing.assert_close(rows.float(), full[: len(tokens) - 1], rtol=2e-2, atol=2e-2)
    assert len(llm.engine.speculation.features) == 0  # freed as the sequences finished

    # the same prompt again: its full blocks are prefix hits, and their rows come from the store's
    # cache by block hash (feature_store.py), not zeros
    recorder.snapshots.clear()
    [again] = llm.generate([prompts[2]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    cached = again.num_cached_tokens
    assert cached >= 16
    _, tokens, rows = recorder.snapshots[-1]
    assert rows[:cached].any()
    torch.testing.assert_close(rows.float(), hf_features(tokens)[: len(tokens) - 1], rtol=2e-2, atol=2e-2)


def test_async_scheduling_plans_no_step_behind_a_verify_step(target: Path) -> None:
    """How many tokens a verifying sequence keeps is known only once its step is read back, so with
    async scheduling the next step waits for it: planned behind it, a sequence drafting no more (its
    max_tokens near) took a wrong row's token as its input (found on a GPU, 2026-11-28)."""
    rng = random.Random(6)
    prompts = [[rng.randrange(VOCAB - 40) for _ in range(n)] for n in (30, 7, 45, 19)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    sections = dict(scheduler={"async_scheduling": "on"}, cache={"num_blocks": 128})
    llm = make_llm(target, **sections)
    plain = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    llm = make_llm(target, **sections)
    llm.engine.speculation = Speculation(
        llm.config.speculative, RecordingFeatureProposer(plain, seed=1, vocab=VOCAB)
    )
    assert llm.engine.async_scheduling
    got = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    assert got == plain
    assert llm.engine.stats().spec.num_accepted > 0


# ---- the draft ----------------------------------------------------------------------------------
sys.path.insert(0, str(Path(__file__).parent.parent / "training"))
from eagle_model import EagleDraft  # noqa: E402
from eval_eagle import PassChoices, engine_rounds, load_shipped  # noqa: E402
from train_eagle import Frozen, write_eagle  # noqa: E402

from fuserve.speculative.feature_draft_runner import FeatureDraftRunner  # noqa: E402
from fuserve.speculative.shipped_draft import DRAFT_FORMAT  # noqa: E402

SUBSET = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(5))[:90].sort().values
WIDTH = 96  # the draft layer's MLP


def target_tensors(target: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(target / "model.safetensors"))


def eagle_config(target: Path) -> dict[str, Any]:
    """EagleDraft's config of the target's architecture."""
    import json

    cfg = json.loads((target / "config.json").read_text())
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["rope_theta"] = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    return cfg


class Eagle:
    """A random EagleDraft trained (as it were) on standardized features, written to an eagle1 file
    with its standardization folded in, as train_eagle.py exports one."""

    def __init__(self, target: Path, folder: Path, seed: int, layers: int = 1, int8: bool = False) -> None:
        import copy

        torch.manual_seed(seed)
        cfg = eagle_config(target)
        model = EagleDraft(cfg, WIDTH, layers).eval()
        with torch.no_grad():
            model.fc.bias.uniform_(-0.1, 0.1)
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
                if int8 and name.startswith("layers.") and p.dim() == 2:
                    # int8 rows whose scale is a power of two: the file's int8 round trip is exact
                    q = torch.randint(-127, 128, p.shape)
                    q[:, 0] = 127
                    p.copy_(q * 2.0**-11)
                p.copy_(p.bfloat16().float())  # the file's bf16 values: the folds below stay exact
        h = cfg["hidden_size"]
        self.mu = torch.randn(h) * 2
        self.sigma = 2.0 ** torch.randint(-1, 3, (h,)).float()  # powers of two: folding stays exact in bf16
        self.unfolded = copy.deepcopy(model)
        model.fold_standardization(self.mu, self.sigma)
        tensors = target_tensors(target)
        self.path = folder / "eagle.safetensors"
        write_eagle(self.path, model, tensors["model.norm.weight"], SUBSET, {"format": DRAFT_FORMAT}, int8)
        eps = cfg["rms_norm_eps"]
        self.standardized = Frozen(tensors, SUBSET, eps, (self.mu, self.sigma))
        self.raw = Frozen(tensors, SUBSET, eps)
        self.folded, ids, width = load_shipped(self.path, cfg)
        assert torch.equal(ids, SUBSET) and width == WIDTH

    def features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n raw target-like features (bf16): per dimension about mu +- sigma."""
        return (torch.randn(n, self.mu.shape[0], generator=gen) * self.sigma + self.mu).bfloat16()

    def chained(
        self,
        tokens: list[int],
        features: torch.Tensor,
        k: int,
        context: set[int],
        min_confidence: float = 0.0,
    ) -> list[int]:
        """EagleDraft drafting k tokens after `tokens` (features: rows 0..n-2) as the served draft
        should, stopped after the first draft it gives a probability under `min_confidence`."""
        return self.chained_with_seconds(tokens, features, k, context, min_confidence)[0]

    def chained_with_seconds(
        self,
        tokens: list[int],
        features: torch.Tensor,
        k: int,
        context: set[int],
        min_confidence: float = 0.0,
    ) -> tuple[list[int], list[int]]:
        """`chained`'s drafts and, beside each, the draft's second-best token at that row."""
        drafts, seconds = [], []
        for d, prob, second in self.chained_choices(tokens, features, k, context):
            drafts.append(d)
            seconds.append(second)
            if prob < min_confidence:
                break
        return drafts, seconds

    def chained_with_probabilities(
        self, tokens: list[int], features: torch.Tensor, k: int, context: set[int]
    ) -> list[tuple[int, float]]:
        """k drafts and the draft's probability of each."""
        return [(d, prob) for d, prob, _ in self.chained_choices(tokens, features, k, context)]

    @torch.no_grad()
    def chained_choices(
        self, tokens: list[int], features: torch.Tensor, k: int, context: set[int]
    ) -> list[tuple[int, float, int]]:
        """k drafts, the draft's probability of each and its second-best token there: the unfolded
        model on standardized features, each draft's h the next row's feature."""
        frozen = self.standardized
        emb = frozen.embed[torch.tensor(tokens[1:])]
        f = frozen.scaled(features.float())
        drafts: list[tuple[int, float, int]] = []
        for _ in range(k):
            n = emb.shape[0]
            mask = torch.ones(n, n, dtype=torch.bool).tril()
            h = self.unfolded(emb[None], f[None], torch.arange(n), mask)[0, -1:]
            d, prob, second = served_top_two(frozen, h, context)
            drafts.append((d, prob, second))
            emb = torch.cat([emb, frozen.embed[d][None]])
            f = torch.cat([f, h])
        return drafts

    @torch.no_grad()
    def unrolled(
        self, tokens: list[int], features: torch.Tensor, drafts: list[int], context: set[int]
    ) -> list[int]:
        """eval_eagle.py's scoring of a round started at the last row: the folded file's EagleDraft,
        unrolled over the drafts as teacher-forced tokens; pass s's prediction at row n-2+s."""
        seq = tokens + drafts[:-1]
        n = len(tokens)
        emb = self.raw.embed[torch.tensor(seq[1:])][None]
        feats = torch.cat([features.float(), torch.zeros(len(drafts) - 1, features.shape[1])])[None]
        passes = self.folded.unrolled(emb, feats, len(drafts))
        return [served_choice(self.raw, h[0, n - 2 + s : n - 1 + s], context) for s, h in enumerate(passes)]


def served_choice(frozen: Frozen, h: torch.Tensor, context: set[int]) -> int:
    """The served head's draft for one row h [1, H]: the best of the vocabulary subset and the tokens
    the round's sequences hold (subset_head.py, "Context tokens")."""
    return served_choice_and_probability(frozen, h, context)[0]


def served_choice_and_probability(frozen: Frozen, h: torch.Tensor, context: set[int]) -> tuple[int, float]:
    """`served_choice` and the draft's softmax probability of it over the same candidates."""
    return served_top_two(frozen, h, context)[:2]


def served_top_two(frozen: Frozen, h: torch.Tensor, context: set[int]) -> tuple[int, float, int]:
    """`served_choice_and_probability` and the second-best token of the same candidates (each id once)."""
    candidates = torch.tensor(sorted(set(frozen.ids.tolist()) | context))
    hf = frozen.raw(h.float())
    n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + frozen.eps) * frozen.norm
    probs = torch.softmax(n @ frozen.embed[candidates].T, dim=-1)[0]
    top = probs.topk(2).indices
    return int(candidates[probs.argmax()]), float(probs.max()), int(candidates[top[1]])


@pytest.fixture(scope="module")
def eagle(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Eagle:
    return Eagle(target, tmp_path_factory.mktemp("eagle"), seed=7)


def make_runner(eagle: Eagle, target: Path, num_blocks: int = 64) -> FeatureDraftRunner:
    return FeatureDraftRunner(
        ModelConfig(path=str(eagle.path), device="cpu", dtype="float32"),
        ModelConfig(path=str(target), device="cpu", dtype="float32"),
        DraftPlacementConfig(device="cpu"),
        CacheConfig(block_size=4, num_blocks=num_blocks),
        KernelConfig(),
        max_num_seqs=8,
        max_num_batched_tokens=16,  # small: long rounds run in several chunks
    )


@pytest.fixture(scope="module")
def eagle_int8_two_layers(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Eagle:
    return Eagle(target, tmp_path_factory.mktemp("eagle2"), seed=8, layers=2, int8=True)


def test_served_draft_proposes_what_eagle_draft_proposes(eagle: Eagle, target: Path) -> None:
    """Rounds with rollback at random points (drafts accepted, then the target's token; now and then
    a start over from 0): every round's drafts equal EagleDraft's, chained over the whole sequence."""
    check_rounds_equal_eagle_draft(eagle, target)


def test_two_layer_int8_draft_proposes_what_eagle_draft_proposes(
    eagle_int8_two_layers: Eagle, target: Path
) -> None:
    """The same for a draft of two layers stored as int8 rows: the served model runs both layers, the
    file's int8 weights widen to the trained values, and eval's unrolled passes chain both layers."""
    from safetensors import safe_open

    with safe_open(str(eagle_int8_two_layers.path), framework="pt") as f:
        assert f.metadata()["num_hidden_layers"] == "2"
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.int8
        assert f.get_tensor("eagle.fc.weight").dtype == torch.bfloat16
    check_rounds_equal_eagle_draft(eagle_int8_two_layers, target)


@pytest.fixture(scope="module")
def quartile_confidence(eagle: Eagle) -> float:
    """The lower quartile of the random draft's probabilities of its drafts on random sequences: as a
    speculative.draft_confidence, rounds end at every position, the first included."""
    rng, gen = random.Random(9), torch.Generator().manual_seed(9)
    probs = []
    for _ in range(4):
        tokens = [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 30))]
        feats = eagle.features(len(tokens) - 1, gen)
        probs += [p for _, p in eagle.chained_with_probabilities(tokens, feats, 5, set(tokens))]
    return sorted(probs)[len(probs) // 4]


def test_drafts_stop_after_the_first_the_draft_doubts(
    eagle: Eagle, target: Path, quartile_confidence: float
) -> None:
    """speculative.draft_confidence: each sequence's drafts are EagleDraft's, cut after the first it
    gives a probability under the threshold."""
    check_rounds_equal_eagle_draft(eagle, target, min_confidence=quartile_confidence)


@pytest.mark.parametrize("cut", [False, True], ids=["all-k", "confidence-cut"])
def test_second_best_offers_eagle_drafts_runner_up_beside_the_same_drafts(
    eagle: Eagle, target: Path, quartile_confidence: float, cut: bool
) -> None:
    """speculative.second_best: the drafts are those of a runner without it (and EagleDraft's), and
    beside each kept draft the runner offers EagleDraft's second-best token of the same candidates."""
    check_rounds_equal_eagle_draft(eagle, target, quartile_confidence if cut else 0.0, second_best=True)


def test_best_two_with_and_without_a_subset_head(eagle: Eagle, target: Path) -> None:
    """FeatureDraftModel.best_two: greedy's drafts and the best other token, over the subset and the
    context tokens, or over the whole vocabulary when the draft has no subset head."""
    import torch.nn.functional as F

    model = make_runner(eagle, target).model
    assert model.head is not None
    h = eagle.features(6, torch.Generator().manual_seed(11)).float()
    outside = torch.tensor([t for t in range(VOCAB) if t not in set(SUBSET.tolist())][:40])
    normed = model._normed(h)
    for candidates in (None, (outside, model.head.full[outside])):
        best, second, conf = model.best_two(h, candidates, with_confidence=True)
        assert torch.equal(best, model.greedy(h, candidates))
        assert conf is not None
        torch.testing.assert_close(conf, model.greedy_with_confidence(h, candidates)[1])
        pool = SUBSET if candidates is None else torch.cat([SUBSET, outside])
        top = F.linear(normed, model.head.full[pool]).topk(2, dim=-1).indices
        assert torch.equal(best, pool[top[:, 0]]) and torch.equal(second, pool[top[:, 1]])
    model.head = None  # the whole vocabulary
    best, second, conf = model.best_two(h)
    assert conf is None and torch.equal(best, model.greedy(h))
    top = model.llama.compute_logits(normed).topk(2, dim=-1).indices
    assert top.shape == (6, 2) and torch.equal(best, top[:, 0]) and torch.equal(second, top[:, 1])
    assert bool((second != best).all())


def check_rounds_equal_eagle_draft(
    eagle: Eagle, target: Path, min_confidence: float = 0.0, second_best: bool = False
) -> None:
    runner = make_runner(eagle, target)
    runner.min_confidence = min_confidence
    runner.second_best = second_best
    # with second_best, a twin without it gets the same rounds: the drafts must not change
    twin = make_runner(eagle, target) if second_best else None
    if twin is not None:
        twin.min_confidence = min_confidence
    checked_seconds = 0
    lengths: list[tuple[int, int]] = []  # (drafts made, k asked) where k > 0
    assert len(runner.model.llama.model.layers) == len(eagle.unfolded.layers)
    assert runner.model.head is not None and torch.equal(runner.model.head.token_ids, SUBSET)
    rng, gen = random.Random(1), torch.Generator().manual_seed(2)
    seqs = {f"s{i}": [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 30))] for i in range(3)}
    feats = {s: eagle.features(len(t) - 1, gen) for s, t in seqs.items()}
    sent = {s: 0 for s in seqs}
    checked_unrolled = 0
    picked_from_context: set[int] = set()
    for round_ in range(8):
        k = {s: rng.randrange(0, 6) for s in seqs}
        reqs = []
        for s, tokens in seqs.items():
            begin = feature_rows_begin(sent[s])
            reqs.append(ProposeRequest(s, sent[s], tokens[sent[s] :], k[s], feats[s][begin:]))
        drafts = runner.propose(reqs)
        assert len(runner.last_alternatives) == len(reqs)
        if twin is not None:
            assert drafts == twin.propose(reqs), f"round {round_}"
            assert twin.last_alternatives == [[] for _ in reqs]
        else:
            assert runner.last_alternatives == [[] for _ in reqs]
        context = set().union(*seqs.values())  # the tokens of every live sequence
        picked_from_context |= {d for got in drafts if got for d in got} - set(SUBSET.tolist())
        for s, got, alts in zip(seqs, drafts, runner.last_alternatives, strict=True):
            want, seconds = eagle.chained_with_seconds(seqs[s], feats[s], k[s], context, min_confidence)
            assert got == want, f"round {round_}, {s}"
            if second_best:
                assert alts == seconds, f"round {round_}, {s}"
                assert all(a != d for a, d in zip(alts, got, strict=True))
                checked_seconds += len(alts)
            lengths.extend([(len(got), k[s])] if got is not None and k[s] > 0 else [])
            if len(got) > 1:
                assert got == eagle.unrolled(seqs[s], feats[s], got, context)
                checked_unrolled += 1
            accepted = got[: rng.randrange(0, len(got) + 1)]
            step = accepted + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 4))]
            sent[s] = len(seqs[s])
            seqs[s] = seqs[s] + step
            feats[s] = torch.cat([feats[s], eagle.features(len(step), gen)])
            if rng.random() < 0.15:
                sent[s] = 0
    assert checked_unrolled > 3 or min_confidence > 0
    assert checked_seconds > 3 or not second_best
    assert picked_from_context, "no draft came from the context tokens outside the subset"
    if min_confidence > 0:  # rounds cut at the first draft, cut later, and not cut at all
        assert any(n == 1 < k for n, k in lengths) and any(1 < n < k for n, k in lengths), lengths
        assert any(n == k for n, k in lengths), lengths
    runner.release(list(seqs))
    if twin is not None:
        twin.release(list(seqs))
    assert runner.context is not None and not runner.context.holders and not len(runner.context)
    assert runner.seqs.num_free_blocks == runner.seqs.num_blocks


@pytest.mark.parametrize("cut", [False, True], ids=["all-k", "confidence-cut"])
def test_greedy_with_a_feature_draft_equals_plain(
    eagle: Eagle, target: Path, quartile_confidence: float, cut: bool
) -> None:
    shared = list(range(40, 72))  # two full blocks every prompt shares: prefix hits
    rng = random.Random(3)
    prompts = [shared + [rng.randrange(VOCAB) for _ in range(n)] for n in (3, 9, 17, 5)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    # ~4 x 65 tokens in 10 blocks of 16: preemption; a 24-token budget: chunked prefill
    sections = dict(cache={"num_blocks": 10}, scheduler={"max_num_batched_tokens": 24})
    want = [o.outputs[0].token_ids for o in make_llm(target, **sections).generate(prompts, params)]
    llm = make_llm(target, **sections)
    runner = make_runner(eagle, target, 256)
    runner.min_confidence = quartile_confidence if cut else 0.0
    llm.engine.speculation = Speculation(llm.config.speculative, runner)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    stats = llm.engine.stats()
    assert stats.spec.num_drafts > 0 and stats.prefix_hit_tokens > 0 and stats.num_preemptions > 0


def test_rounds_through_a_draft_server_equal_the_runner(eagle: Eagle, target: Path) -> None:
    """A real draft server process (ZMQ over ipc) picks the feature runner from the file's metadata;
    rounds with rollback equal the in-process runner's, also after a reconnect made the client resend
    every sequence, features included, from start 0; so do the second-best tokens (second_best)."""
    from fuserve.speculative.draft_client import DraftProposer
    from fuserve.speculative.draft_factory import build_draft_runner
    from fuserve.speculative.draft_server import start_draft_server

    config = config_from_dict(
        {
            "model": {"path": str(target), "device": "cpu", "dtype": "float32", "max_model_len": 160},
            "cache": {"block_size": 4, "num_blocks": 128},
            "speculative": {
                "method": "draft",
                "draft": {"path": str(eagle.path), "device": "cpu", "dtype": "float32"},
                "channel_timeout_s": 5.0,
                "second_best": True,
            },
        }
    )
    oracle = build_draft_runner(config)
    assert isinstance(oracle, FeatureDraftRunner) and oracle.second_best
    server = start_draft_server(config, "127.0.0.1", timeout_s=120)
    proposer = DraftProposer(lambda: server.address, 5.0, reads_features=True)
    try:
        assert proposer.wait_connected(10)
        rng, gen = random.Random(4), torch.Generator().manual_seed(5)
        seqs = {f"q{i}": [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 20))] for i in range(3)}
        feats = {s: eagle.features(len(t) - 1, gen) for s, t in seqs.items()}
        sent = {s: 0 for s in seqs}
        for round_ in range(6):
            if round_ == 3:  # as after a reconnect: the server gets everything from 0, the oracle not
                proposer.resend.update(proposer.tokens)
            reqs = []
            for s, tokens in seqs.items():
                begin = feature_rows_begin(sent[s])
                reqs.append(
                    ProposeRequest(s, sent[s], tokens[sent[s] :], rng.randrange(1, 5), feats[s][begin:])
                )
            got = proposer.propose(reqs)
            assert got == oracle.propose(reqs), f"round {round_}"
            assert all(got)
            assert proposer.last_alternatives == oracle.last_alternatives, f"round {round_}"
            assert [len(a) for a in proposer.last_alternatives] == [len(d) for d in got]
            for r, d in zip(reqs, got, strict=True):
                step = d[: rng.randrange(0, len(d) + 1)] + [rng.randrange(VOCAB)]
                sent[r.seq_id] = len(seqs[r.seq_id])
                seqs[r.seq_id] = seqs[r.seq_id] + step
                feats[r.seq_id] = torch.cat([feats[r.seq_id], eagle.features(len(step), gen)])
        proposer.release(list(seqs))
        assert not proposer.features
    finally:
        proposer.close()
        server.stop()


# ---- on a GPU: CUDA graphs captured again with features when a draft is attached, async scheduling ---
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_features_and_greedy_with_graphs(
    eagle: Eagle, target: Path, hf_features, quartile_confidence: float
) -> None:
    rng = random.Random(6)
    prompts = [[rng.randrange(VOCAB - 40) for _ in range(n)] for n in (30, 7, 45, 19)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    sections = dict(
        model={"path": str(target), "max_model_len": 160, "device": "cuda", "dtype": "float32"},
        scheduler={"async_scheduling": "on"},
        cache={"num_blocks": 128},  # two engines in one process: neither takes the whole GPU
    )
    plain = [
        p + o.outputs[0].token_ids
        for p, o in zip(prompts, LLM(config_from_dict(sections)).generate(prompts, params), strict=True)
    ]
    spec = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(config_from_dict({**sections, "speculative": spec}))
    worker = llm.engine.executor.worker
    assert worker.runner.graphs is not None and not worker.runner.graphs.keeps_features
    recorder = RecordingFeatureProposer(plain, seed=1, vocab=VOCAB)
    llm.engine.speculation = Speculation(llm.config.speculative, recorder)
    assert worker.runner.graphs.keeps_features  # captured again, keeping features
    got = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    assert got == plain
    stats = llm.engine.stats()
    assert 0 < stats.spec.num_accepted < stats.spec.num_drafts
    want = {tuple(seq): hf_features(seq) for seq in plain}
    for _, tokens, rows in recorder.snapshots:
        full = next(w for seq, w in want.items() if list(seq[: len(tokens)]) == tokens)
        torch.testing.assert_close(rows.float(), full[: len(tokens) - 1], rtol=2e-2, atol=2e-2)

    runner = FeatureDraftRunner(
        ModelConfig(path=str(eagle.path), device="cuda", dtype="float32"),
        ModelConfig(path=str(target), device="cuda", dtype="float32"),
        DraftPlacementConfig(device="cuda"),
        CacheConfig(block_size=16, num_blocks=128),
        KernelConfig(),
        max_num_seqs=8,
        max_num_batched_tokens=256,
    )
    llm.engine.speculation = Speculation(llm.config.speculative, runner)
    got = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    assert got == plain
    drafted = llm.engine.stats().spec.num_drafts
    assert drafted > stats.spec.num_drafts
    runner.min_confidence = quartile_confidence  # drafts cut by the draft's confidence, on the device
    got = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    assert got == plain
    assert llm.engine.stats().spec.num_drafts > drafted


def test_a_grown_draft_computes_what_it_did(eagle: Eagle) -> None:
    """train_eagle.py --init-from with more --layers or a wider --intermediate starts from the trained
    draft's function: the added layer and neurons write zeros into the residual stream until trained."""
    import copy

    gen = torch.Generator().manual_seed(9)
    n, h = 12, eagle.mu.shape[0]
    emb, feats = torch.randn(1, n, h, generator=gen), torch.randn(1, n, h, generator=gen)
    want = eagle.unfolded.unrolled(emb, feats, 3)
    grown = copy.deepcopy(eagle.unfolded)
    grown.add_layer()
    grown.widen_mlp(WIDTH + 40)
    assert len(grown.layers) == 2 and grown.layers[1].mlp.gate_proj.out_features == WIDTH + 40
    got = grown.unrolled(emb, feats, 3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # and it is not the identity by construction: one step of training moves the new layer's output
    grown.layers[1].self_attn.o_proj.weight.data.normal_(0, 0.1)
    assert not torch.allclose(grown.unrolled(emb, feats, 3)[0], want[0])


def test_engine_order_rounds_start_where_the_last_ended() -> None:
    """eval_eagle's replay of the engine's rounds: a round starts after the kept drafts and the
    target's own token; a second candidate at the first position keeps what the best one missed and
    ends the round there; a draft the draft doubts ends its round's drafts (it is verified, none after it)."""
    prompt_len, out_len, k = 3, 10, 2
    ids = torch.arange(100, 100 + prompt_len + out_len)
    row = {"ids": ids, "prompt_len": prompt_len}
    rows = len(ids) - 1
    right = torch.cat([ids[2:], torch.tensor([0])])  # row i is right to predict token i + 2
    best = [right.clone() for _ in range(k)]
    best[0][prompt_len + 2] = 7  # the round started with out[:4] held misses its first draft
    second = torch.full((rows,), 7)
    second[prompt_len + 2] = right[prompt_len + 2]
    sure = torch.ones(rows)
    choices = [PassChoices(torch.stack([b, second], dim=1), sure) for b in best]
    # chain: rounds at out[:1] (keeps 2), out[:4] (keeps 0), out[:5] (2), out[:8] (1 draft, kept): 7 drafts
    assert engine_rounds(choices, row, k) == ([4, 2], [3, 2], 4, 7)
    # the second candidate keeps out[4]: rounds at out[:1], out[:4] (keeps 1), out[:6] (2)
    assert engine_rounds(choices, row, k, seconds=1) == ([3, 2], [3, 2], 3, 6)
    # the draft doubts its first draft of the round at out[:4] (a step without drafts) and its second
    # of the round at out[:5]
    doubt = sure.clone()
    doubt[prompt_len + 2] = 0.1
    doubt_second = sure.clone()
    doubt_second[prompt_len + 4] = 0.1
    cut = [PassChoices(choices[0].top2, doubt), PassChoices(choices[1].top2, doubt_second)]
    # rounds at out[:1] (keeps 2), out[:4] (its one draft, doubted and missed), out[:5] (2 drafts, the
    # second doubted, both kept), out[:8] (1 draft, kept)
    assert engine_rounds(cut, row, k, min_confidence=0.5) == ([4, 2], [3, 2], 4, 6)
