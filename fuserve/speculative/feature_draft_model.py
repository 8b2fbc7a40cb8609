"""The feature-reading (EAGLE-1) draft as served: fuserve's own Llama layers, with fc in front and an
output affine behind, on fuserve's paged KV cache and kernels.

    row i (position i):  a_i = fc([embed(x_{i+1}), f_i])          embed: the target's (tied)
                         h_i = layers(a_i) * out_scale + out_shift LlamaDecoderLayers, causal
                         draft x_{i+2} = argmax head(norm(h_i))    norm: the target's final norm; head:
                                                                   tied, over the vocabulary subset
h_i approximates the target's next feature f_{i+1}: drafting chains by feeding h_i as the feature of
row i + 1 (feature_draft_runner.py). The layers, embedding, norm and KV cache are a LlamaForCausalLM's of
the draft's depth (the target's architecture, the draft's MLP width), so the draft runs the kernels the
target runs; the math is training/eagle_model.py's EagleDraft, which tests/test_feature_draft.py checks.
`best_two` also gives each row's second-best token (speculative.second_best), of the same candidates as
`greedy`, whether a subset head or the whole vocabulary chooses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuserve.parallel.tp_context import Partial, TPContext
from fuserve.speculative.feature_draft_file import FeatureDraftWeights
from fuserve.speculative.subset_head import SubsetHead, confidence, top_two
from fuserve.workers.kernels.argmax import greedy_tokens
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.models.llama import AttentionMetadata, LlamaForCausalLM
from fuserve.workers.models.loader import ModelSource, build_model


class FeatureDraftModel(nn.Module):
    def __init__(
        self,
        weights: FeatureDraftWeights,
        ops: KernelOps,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
    ) -> None:
        super().__init__()
        # a Llama of the draft's depth built empty, then filled from the file and the target's embedding
        source = ModelSource("dummy", None, weights.hf_config, "feature-draft")
        self.llama: LlamaForCausalLM = build_model(source, TPContext(), ops, dtype, device, max_positions)
        loaded = self.llama.load_weights(weights.llama.items())
        missing = {n for n, _ in self.llama.named_parameters()} - loaded - {"lm_head.weight"}
        if missing:
            raise ValueError(f"the feature draft file lacks {sorted(missing)[:5]}")
        self.fc_weight = weights.fc_weight.to(device, dtype)  # [H, 2H]
        self.fc_bias = weights.fc_bias.to(device, dtype)
        # the output affine in fp32: it holds the target's feature scale (values in the thousands)
        self.out_scale = weights.out_scale.to(device, torch.float32)
        self.out_shift = weights.out_shift.to(device, torch.float32)
        head = self.llama.lm_head
        self.head = SubsetHead(head.weight, weights.vocab, head.linear) if weights.vocab is not None else None
        self.dtype = dtype

    @property
    def hidden_size(self) -> int:
        return self.llama.arch.hidden_size

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        self.llama.bind_kv_cache(k_caches, v_caches)

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids [T] (x_{i+1} of row i), features [T, H] (f_i), positions [T] (i) -> h [T, H]."""
        llama = self.llama
        embeds = llama.model.embed_tokens(input_ids)
        a = F.linear(torch.cat([embeds, features.to(self.dtype)], dim=-1), self.fc_weight, self.fc_bias)
        hidden: torch.Tensor | Partial = a
        residual: torch.Tensor | None = None
        for layer in llama.model.layers:
            hidden, residual = layer(hidden, residual, positions, meta, llama.rope_cos, llama.rope_sin)
        assert isinstance(hidden, torch.Tensor) and residual is not None  # one rank: no partial sums
        return ((hidden + residual).float() * self.out_scale + self.out_shift).to(self.dtype)

    def greedy(self, h: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Each row's draft, as target token ids [S]: the best of the vocabulary subset and `extra`'s
        tokens (ContextTokens.candidates), or of the whole vocabulary, after the target's final norm."""
        normed = self._normed(h)
        return self.head.greedy(normed, extra) if self.head is not None else self.llama.greedy_tokens(normed)

    def greedy_with_confidence(
        self, h: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`greedy`'s drafts and the draft's probability of each [S] fp32 (over the same candidates)."""
        normed = self._normed(h)
        if self.head is not None:
            return self.head.greedy_with_confidence(normed, extra)
        logits = self.llama.compute_logits(normed)
        return greedy_tokens(logits), confidence(logits)

    def best_two(
        self,
        h: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
        with_confidence: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`greedy`'s drafts [S], each row's best other token [S] over the same candidates
        (speculative.second_best), and with `with_confidence` the drafts' probabilities [S] fp32."""
        normed = self._normed(h)
        if self.head is not None:
            return self.head.best_two(normed, extra, with_confidence)
        logits = self.llama.compute_logits(normed)
        best, second = top_two(logits)
        return best, second, confidence(logits) if with_confidence else None

    def _normed(self, h: torch.Tensor) -> torch.Tensor:
        normed, _ = self.llama.model.norm(h)
        assert isinstance(normed, torch.Tensor)
        return normed
