"""The feature-reading (EAGLE-style) draft for training and offline evaluation, in plain torch.

The shipped independent draft (draft_model.py) sees only tokens and accepts ~0.3 at its first position.
This one also reads the target's own last hidden state (its last decoder layer's output, before the
final norm: the "feature"), as EAGLE (Li et al., 2024) does, so it only has to predict one step of the
target's residual stream:

    row i:  a_i = fc([embed(x_{i+1}), f_i])           embed: the target's tied embedding (frozen)
            h_i = LlamaDecoderLayer(a_i), position i  one layer, causal over rows 0..i
            h_i ~ f_{i+1}                             regression target: the target's next feature
            head(norm(h_i)) ~ p_target(x_{i+2})       norm, head: the target's (frozen; head over the
                                                      draft's 4,096-token vocabulary subset)

Drafting chains by feeding the draft's own h_i as the feature of the next row (EAGLE-1). Training
unrolls that ("training-time test", as EAGLE-3 does): pass s of a batch gives every row the feature the
draft itself predicted in pass s-1, attending to the rows the real drafting would hold (`chain_mask`),
so one forward trains (and evaluates, exactly) draft positions 1..S at every start position.

Parameter names are the HF Llama ones (`layers.0.self_attn.q_proj.weight` ...) plus `fc.weight`, so the
layer can start from a target layer and fuserve can load it as a Llama of the draft's depth.

A trained draft grows without forgetting (`add_layer`, `widen_mlp`): the new layer's output projections
and the new neurons' down-projection columns start at zero, so the grown draft computes exactly what
the trained one did, and training goes on from there with the extra capacity.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, theta: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, H]; positions [L]; mask [L, L] bool (True: may attend)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, intermediate: int) -> None:
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(
            h, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rope_theta"]
        )
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(h, intermediate)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleDraft(nn.Module):
    def __init__(self, cfg: dict, intermediate: int, num_layers: int = 1) -> None:
        super().__init__()
        h = cfg["hidden_size"]
        self.fc = nn.Linear(2 * h, h, bias=True)
        nn.init.zeros_(self.fc.bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg, intermediate) for _ in range(num_layers)])
        # output = layer output x scale + shift. Training runs in normalized feature space (identity
        # here, features standardized per dimension by the caller); the export folds the standardization
        # into fc (weight / sigma, a bias) and these (sigma, mu), so the served draft reads and returns raw
        # features (`fold_standardization`).
        self.register_buffer("out_scale", torch.ones(h))
        self.register_buffer("out_shift", torch.zeros(h))

    def forward(
        self, embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.fc(torch.cat([embeds, feats], dim=-1))
        for layer in self.layers:
            x = layer(x, positions, mask)
        return x * self.out_scale + self.out_shift

    @torch.no_grad()
    def fold_standardization(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Trained on f~ = (f - mu) / sigma: make it read and return raw features instead."""
        h = self.fc.out_features
        wf = self.fc.weight[:, h:]
        self.fc.bias += -(wf * (mu / sigma)[None, :]).sum(1)
        self.fc.weight[:, h:] = wf / sigma[None, :]
        self.out_scale.copy_(sigma)
        self.out_shift.copy_(mu)

    @torch.no_grad()
    def unfold_standardization(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """The inverse of `fold_standardization`: a served (raw-space) draft back in the space of
        features standardized by (mu, sigma), so that training resumes from it."""
        h = self.fc.out_features
        w_raw = self.fc.weight[:, h:].clone()
        self.fc.bias += (w_raw * mu[None, :]).sum(1)
        self.fc.weight[:, h:] = w_raw * sigma[None, :]
        self.out_scale.fill_(1.0)
        self.out_shift.zero_()

    @torch.no_grad()
    def add_layer(self) -> None:
        """One more decoder layer on top, a copy of the last with its attention and MLP outputs zeroed:
        it adds nothing to the residual stream until training moves them."""
        layer = copy.deepcopy(self.layers[-1])
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        self.layers.append(layer)

    @torch.no_grad()
    def widen_mlp(self, intermediate: int, seed: int = 0) -> None:
        """Every layer's MLP `intermediate` wide: the new neurons' gate and up rows drawn at the scale of
        the trained ones, their down-projection columns zero, so the output is unchanged."""
        gen = torch.Generator().manual_seed(seed)
        for layer in self.layers:
            mlp = layer.mlp
            old = mlp.gate_proj.out_features
            if intermediate <= old:
                continue
            extra = intermediate - old
            wider = MLP(mlp.gate_proj.in_features, intermediate).to(mlp.gate_proj.weight.device)
            for name in ("gate_proj", "up_proj"):
                w = getattr(mlp, name).weight
                new_rows = torch.randn(extra, w.shape[1], generator=gen) * w.std().item()
                getattr(wider, name).weight.copy_(torch.cat([w, new_rows.to(w)]))
            down = mlp.down_proj.weight
            wider.down_proj.weight.copy_(torch.cat([down, torch.zeros(down.shape[0], extra).to(down)], dim=1))
            layer.mlp = wider

    def unrolled(self, embeds: torch.Tensor, feats: torch.Tensor, passes: int) -> list[torch.Tensor]:
        """Pass s (0-based) of rows 0..L-1: row i's output as draft position s + 1 of a round started
        at row i - s, given drafts 1..s were the target's tokens (the kept ones are): [B, L, H] each.
        embeds[:, i] = embed(x_{i+1}), feats[:, i] = f_i (the target's)."""
        n = feats.shape[1]
        positions = torch.arange(n, device=feats.device)
        outs: list[torch.Tensor] = []
        inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]  # a layer's input in each pass
        for s in range(passes):
            if s == 0:
                f = feats
            else:  # row i reads the draft's own prediction of f_i, made at row i - 1 of the last pass
                f = torch.cat([torch.zeros_like(feats[:, :1]), outs[-1][:, :-1]], dim=1)
            x = self.fc(torch.cat([embeds, f], dim=-1))
            for layer, xs in zip(self.layers, inputs, strict=True):
                xs.append(x)
                x = chained_layer(layer, xs, positions, s)
            outs.append(x * self.out_scale + self.out_shift)
        return outs


def chained_layer(
    layer: DecoderLayer, xs: list[torch.Tensor], positions: torch.Tensor, s: int
) -> torch.Tensor:
    """The layer's output in pass s, attending over its inputs of passes <= s with `chain_mask`: the
    rows real drafting would hold in its KV cache at that point of the round."""
    n = xs[0].shape[1]
    keys = torch.cat(xs, dim=1)  # [B, (s+1) n, H]
    q_in = layer.input_layernorm(xs[s])
    k_in = layer.input_layernorm(keys)
    attn = layer.self_attn
    b = q_in.shape[0]
    q = attn.q_proj(q_in).view(b, n, attn.heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(k_in).view(b, -1, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(k_in).view(b, -1, attn.kv_heads, attn.head_dim).transpose(1, 2)
    freqs = positions.float()[:, None] * attn.inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    q = q * cos + rotate_half(q) * sin
    kcos, ksin = cos.repeat(s + 1, 1), sin.repeat(s + 1, 1)
    k = k * kcos + rotate_half(k) * ksin
    rep = attn.heads // attn.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = chain_mask(n, s, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = xs[s] + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def chain_mask(n: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """[n, (s+1) n] bool: row i of pass s may attend pass 0's rows <= i - s (the round's real context,
    its start row included) and pass q's row i - s + q for q = 1..s (the round's own drafted rows)."""
    i = torch.arange(n, device=device)[:, None]
    blocks = [torch.arange(n, device=device)[None, :] <= i - s]
    for q in range(1, s + 1):
        blocks.append(torch.arange(n, device=device)[None, :] == i - s + q)
    mask = torch.cat(blocks, dim=1)
    mask[:, 0] |= ~mask.any(1)  # rows with no valid key (i < s) attend something; they are not scored
    return mask
