"""Train the feature-reading (EAGLE-style) draft for the default model (SmolLM2-135M-Instruct).

The model is eagle_model.py's: fc(concat(embed(x_{i+1}), f_i)) (1152 -> 576) and `--layers` Llama decoder
layers (MLP `--intermediate` wide), read out through the target's final norm and tied head, both frozen
(the head over the draft's 4,096-token vocabulary subset, as served). Loss per draft position s = 1..S,
unrolled as served (the draft's own predicted features from position 2 on; eagle_model.unrolled):
0.8^(s-1) x [smooth-L1(h, f_next) + w x soft cross-entropy against the target's distribution over the
subset], as EAGLE (feature regression + token distillation). The target's features and distributions
come from eagle_features.py; every position of prompt and continuation is a training row.

Features are standardized per dimension for training (`standardization`: the target's last hidden
state has a few dimensions in the thousands, and raw, the draft learned next to nothing); the export
folds that into fc and an output affine, so the file reads and returns raw features.

Reproduce the recorded run (repo root; after generate_draft_data.py, eagle_features.py, eagle_corpus.py):

    PYTHONPATH=$PWD python training/train_eagle.py --threads 2 --w-cls 1.0 --steps 300 \
        --time-limit-s 1320 --corpus training/data/eagle_corpus_features.pt \
        --export training/data/smollm2-135m-instruct-eagle.safetensors
    PYTHONPATH=$PWD python training/eval_eagle.py  # -> training/results/eagle_acceptance.json

Recorded (2026-11-26, the shared 2-core box at load 3-4): 153 steps in 1,320 s (the time limit),
validation top-1 0.20 at position 1; held-out acceptance 0.22 at position 1 (the shipped independent
draft: 0.31), so it is not shipped. training/results/eagle_training.json, eagle_acceptance.json;
benchmarks/NOTES.md "A draft that reads the target's features".
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from draft_model import target_gguf, target_meta, target_tensors, write_draft  # noqa: E402
from draft_vocab import frequent_tokens  # noqa: E402
from eagle_model import EagleDraft  # noqa: E402

from fuserve.speculative.feature_draft_file import (  # noqa: E402
    EAGLE_ARCH,
    FC_BIAS,
    FC_WEIGHT,
    INT8_SCALE,
    OUT_SCALE,
    OUT_SHIFT,
    int8_rows,
)
from fuserve.speculative.shipped_draft import EMBED_NAME, VOCAB_TENSOR  # noqa: E402
from fuserve.workers.models.gguf_loader import read_gguf  # noqa: E402


def target_config() -> dict:
    return dict(read_gguf(target_gguf()).config)


def standardization(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the target's features (sigma floored at 1 % of its
    median). The last hidden state has a few dimensions in the thousands and the rest near 1: standardized,
    the one-layer draft can predict it at all (raw, it learned next to nothing in 50 steps)."""
    f = torch.cat([e["feats"].float() for e in examples])
    mu, sigma = f.mean(0), f.std(0)
    return mu, sigma.clamp_min(0.01 * sigma.median())


def subset_ids(examples: list[dict], size: int) -> torch.Tensor:
    """The `size` tokens the target generated most often (draft_vocab.py's rule)."""
    counts = torch.zeros(49152, dtype=torch.long)
    for e in examples:
        counts += torch.bincount(e["ids"][e["prompt_len"] :], minlength=49152)
    return frequent_tokens(counts, size)


class Frozen:
    """The target's parts the draft reads through: embedding, final norm, head rows of the subset."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        ids: torch.Tensor,
        eps: float,
        standard: tuple[torch.Tensor, torch.Tensor] | None = None,
        bf16_head: bool = False,
        device: str = "cpu",
    ) -> None:
        """standard: (mu, sigma) when features come standardized (training), None when raw.
        bf16_head: the head matmul in bf16, ~2x faster on this CPU (training; evaluation stays fp32)."""
        self.embed = tensors[EMBED_NAME].to(device)
        self.ids = ids.to(device)
        self.norm = tensors["model.norm.weight"].to(device)
        self.head = self.embed[ids].contiguous()
        self.head_bf16 = self.head.to(torch.bfloat16) if bf16_head else None
        self.eps = eps
        self.standard = standard

    def raw(self, f: torch.Tensor) -> torch.Tensor:
        return f if self.standard is None else f * self.standard[1] + self.standard[0]

    def scaled(self, f: torch.Tensor) -> torch.Tensor:
        return f if self.standard is None else (f - self.standard[0]) / self.standard[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        hf = self.raw(h.float())
        n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        if self.head_bf16 is not None:
            return F.linear(n.to(torch.bfloat16), self.head_bf16).float()
        return F.linear(n, self.head)


def collate(batch: list[dict], frozen: Frozen) -> dict[str, torch.Tensor]:
    """Rows 0..N-2 of each sequence, right-padded: embeds of x_{i+1}, features f_i, targets f_{i+1},
    row lengths, and which rows are generated tokens' predictions (for the agreement metric)."""
    n = max(len(e["ids"]) - 1 for e in batch)
    h, dev = frozen.embed.shape[1], frozen.embed.device
    emb = torch.zeros(len(batch), n, h, device=dev)
    feat = torch.zeros(len(batch), n, h, device=dev)
    nxt = torch.zeros(len(batch), n, h, device=dev)
    lens = torch.zeros(len(batch), dtype=torch.long, device=dev)
    gen = torch.zeros(len(batch), n, dtype=torch.bool, device=dev)
    for b, e in enumerate(batch):
        m = len(e["ids"]) - 1
        emb[b, :m] = frozen.embed[e["ids"][1:]]
        f = frozen.scaled(e["feats"].float())
        feat[b, :m] = f[:-1]
        nxt[b, :m] = f[1:]
        lens[b] = m
        gen[b, max(0, e["prompt_len"] - 2) : m] = True  # row i predicts x_{i+2}: a generated token
    return {"emb": emb, "feat": feat, "next": nxt, "lens": lens, "gen": gen}


def batch_loss(
    model: EagleDraft, batch: dict[str, torch.Tensor], frozen: Frozen, passes: int, w_cls: float
) -> tuple[torch.Tensor, list[float], float]:
    """The unrolled loss; each pass's top-1 agreement with the target on generated rows; the mean
    regression loss of pass 1 (for the log)."""
    outs = model.unrolled(batch["emb"], batch["feat"], passes)
    n = batch["emb"].shape[1]
    rows = torch.arange(n, device=batch["emb"].device)[None, :]
    real = rows < batch["lens"][:, None]
    target_logp = frozen.logits(batch["next"]).log_softmax(-1)
    target_p = target_logp.exp()
    target_top = target_logp.argmax(-1)
    total, agree, reg0 = torch.zeros((), device=batch["emb"].device), [], 0.0
    for s, h in enumerate(outs):
        mask = real & (rows >= s)
        reg = F.smooth_l1_loss(h[mask], batch["next"][mask])
        logq = frozen.logits(h[mask]).log_softmax(-1)
        cls = -(target_p[mask] * logq).sum(-1).mean()
        total = total + 0.8**s * (reg + w_cls * cls)
        g = batch["gen"][mask]
        agree.append((logq.detach()[g].argmax(-1) == target_top[mask][g]).float().mean().item())
        if s == 0:
            reg0 = reg.item()
    return total, agree, reg0


def make_batches(examples: list[dict], tokens: int, rng: random.Random) -> list[list[dict]]:
    order = sorted(examples, key=lambda e: len(e["ids"]))
    batches, cur = [], []
    for e in order:
        if cur and (len(cur) + 1) * len(e["ids"]) > tokens:
            batches.append(cur)
            cur = []
        cur.append(e)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def init_layer(model: EagleDraft, tensors: dict[str, torch.Tensor], layer: int, feat_identity: bool) -> None:
    """Start the decoder layer from target layer `layer`, its MLP cut to the neurons with the largest
    |gate row| x |up row| x |down column|; fc starts as the identity on the feature half."""
    p = f"model.layers.{layer}."
    state = {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
    width = model.layers[0].mlp.gate_proj.out_features
    score = (
        state["mlp.gate_proj.weight"].norm(dim=1)
        * state["mlp.up_proj.weight"].norm(dim=1)
        * state["mlp.down_proj.weight"].norm(dim=0)
    )
    keep = score.topk(width).indices.sort().values
    state["mlp.gate_proj.weight"] = state["mlp.gate_proj.weight"][keep]
    state["mlp.up_proj.weight"] = state["mlp.up_proj.weight"][keep]
    state["mlp.down_proj.weight"] = state["mlp.down_proj.weight"][:, keep]
    model.layers[0].load_state_dict(state)
    if feat_identity:
        h = model.fc.out_features
        with torch.no_grad():
            model.fc.weight[:, h:] = torch.eye(h)
            model.fc.weight[:, :h].normal_(0, 0.02)


def lr_at(step: int, total: int, peak: float, warmup: int, clock: float = 0.0) -> float:
    """Warm-up, then cosine to 5 % of the peak over the steps or, where the clock runs out first
    (`clock`: the share of the time limit spent), over the time."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), clock)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(model: EagleDraft, batches: list[dict], frozen: Frozen, passes: int, w_cls: float) -> dict:
    model.eval()
    losses, agrees = [], []
    with torch.no_grad():
        for b in batches:
            loss, agree, _ = batch_loss(model, b, frozen, passes, w_cls)
            losses.append(loss.item())
            agrees.append(agree)
    model.train()
    return {
        "val_loss": round(sum(losses) / len(losses), 4),
        "val_top1": [round(sum(a[s] for a in agrees) / len(agrees), 4) for s in range(passes)],
    }


def write_eagle(
    path: Path,
    model: EagleDraft,
    norm_weight: torch.Tensor,
    ids: torch.Tensor,
    meta: dict[str, str],
    int8_layers: bool = False,
) -> None:
    """The served file (fuserve/speculative/feature_draft_file.py): fc, the output affine, the layers and
    the target's final norm, the vocabulary subset; `meta`: target_meta() and how it was trained.
    int8_layers: the layers' 2-D weights as int8 rows with fp32 scales (half the bytes, for two layers
    within the shipped file's 8 MB)."""
    state = {
        FC_WEIGHT: model.fc.weight,
        FC_BIAS: model.fc.bias,
        OUT_SCALE: model.out_scale,
        OUT_SHIFT: model.out_shift,
    }
    for k, v in model.layers.state_dict().items():
        state[f"model.layers.{k}"] = v
    state["model.norm.weight"] = norm_weight
    # weights in bf16; fc's bias and the output affine (values in the thousands) in fp32: a few KB
    tensors = {
        k: v.detach()
        .cpu()
        .to(torch.float32 if k.startswith("eagle.") and v.dim() == 1 else torch.bfloat16)
        .contiguous()
        for k, v in state.items()
    }
    if int8_layers:
        for k in [k for k, v in tensors.items() if k.startswith("model.layers.") and v.dim() == 2]:
            tensors[k], tensors[k + INT8_SCALE] = int8_rows(state[k])
    tensors[VOCAB_TENSOR] = ids.to(torch.uint16).contiguous()
    meta = {
        **meta,
        "architecture": EAGLE_ARCH,
        "num_hidden_layers": str(len(model.layers)),
        "intermediate_size": str(model.layers[0].mlp.gate_proj.out_features),
    }
    write_draft(path, tensors, meta)


def export(model: EagleDraft, path: Path, ids: torch.Tensor, args: argparse.Namespace, note: str) -> None:
    """The shipped file for the default model's target."""
    training = json.dumps({k: v for k, v in vars(args).items() if k != "export"})
    meta = {**target_meta(), "vocab_subset": note, "training": training}
    write_eagle(path, model, target_tensors()["model.norm.weight"], ids, meta, args.int8_layers)


def generated_examples(
    paths: list[str], device: str, batch_tokens: int, dtypes: tuple[str, ...] = ("float32",)
) -> list[dict]:
    """generate_draft_data.py's records with the target's features from one prefill each, computed on
    `device` and kept there (the GPU run: millions of tokens, features in bf16, ~1.2 kB a token).
    `dtypes`: the target's compute dtypes, dealt over the sequences in turn. The served target runs in
    bfloat16 where the config says so (configs/spec-default.yaml on a CPU), and its features then differ
    from float32's by bf16 rounding: a draft trained on both reads either."""
    from eagle_features import build_target, features

    records = [r for p in paths for r in torch.load(p)]
    seqs = [torch.cat([r["prompt_ids"], r["output_ids"]]).long() for r in records]
    target = build_target().to(device)
    t0 = time.time()
    feats: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for i, name in enumerate(dtypes):
        share = list(range(i, len(seqs), len(dtypes)))
        got = features(target.to(getattr(torch, name)), [seqs[j] for j in share], batch_tokens, quiet=True)
        for j, f in zip(share, got, strict=True):
            feats[j] = f
    del target
    tokens = sum(len(q) for q in seqs)
    print(f"features of {len(seqs)} sequences ({tokens} tokens) in {time.time() - t0:.0f} s", flush=True)
    return [
        {"ids": q.to(device), "prompt_len": len(r["prompt_ids"]), "feats": f}
        for r, q, f in zip(records, seqs, feats, strict=True)
    ]


def train(args: argparse.Namespace) -> None:
    begun = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.data:
        dtypes = tuple(args.feature_dtypes.split(","))
        examples = generated_examples(args.data.split(","), args.device, args.feature_batch_tokens, dtypes)
    else:
        examples = [
            {**e, "ids": e["ids"].to(args.device), "feats": e["feats"].to(args.device)}
            for e in torch.load(args.features)
        ]
    if args.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = True
    ids = subset_ids([{**e, "ids": e["ids"].cpu()} for e in examples], args.vocab_size)
    rng.shuffle(examples)
    n_val = min(max(2, len(examples) * 3 // 100), args.max_val)
    val, train_ex = examples[:n_val], examples[n_val:]
    corpus = [e for f in args.corpus.split(",") if f for e in torch.load(f)]  # eagle_corpus.py
    train_ex += corpus
    tensors = target_tensors()
    cfg = target_config()
    mu, sigma = standardization(train_ex)
    frozen = Frozen(tensors, ids, cfg["rms_norm_eps"], (mu, sigma), bf16_head=True, device=args.device)
    val_batches = [collate(b, frozen) for b in make_batches(val, args.batch_tokens, random.Random(0))]
    rows = sum(len(e["ids"]) - 1 for e in train_ex)
    print(f"{len(train_ex)} training sequences ({rows} rows), {len(val)} validation", flush=True)
    model = EagleDraft(cfg, args.intermediate, args.layers)
    if args.init == "target":
        init_layer(model, tensors, args.init_layer, feat_identity=True)
    if args.init_from:  # a served file (an earlier run's export): training goes on from it, grown
        from eval_eagle import load_shipped

        model, _, _ = load_shipped(Path(args.init_from), cfg)
        model.train()
        model.unfold_standardization(mu.cpu(), sigma.cpu())
        if len(model.layers) > args.layers:
            raise SystemExit(f"--layers {args.layers}: {args.init_from} already has {len(model.layers)}")
        while len(model.layers) < args.layers:
            model.add_layer()
        model.widen_mlp(args.intermediate, seed=args.seed)
    model.to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    curve = [{"step": 0, "elapsed_s": 0.0, **evaluate(model, val_batches, frozen, args.passes, args.w_cls)}]
    print(json.dumps(curve[-1]), flush=True)
    started, step, epoch_batches, epoch = time.time(), 0, [], 0
    if args.budget_s:  # the whole run's clock (features included), with ~30 s kept for the export
        args.time_limit_s = min(args.time_limit_s, args.budget_s - 30 - (started - begun))
    while step < args.steps:
        if not epoch_batches:
            epoch_batches = make_batches(train_ex, args.batch_tokens, random.Random(args.seed * 1000 + epoch))
            epoch += 1
        batch = collate(epoch_batches.pop(), frozen)
        clock = (time.time() - started) / args.time_limit_s if args.clock_schedule else 0.0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup, clock)
        loss, agree, reg0 = batch_loss(model, batch, frozen, args.passes, args.w_cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        step += 1
        row = {
            "step": step,
            "epoch": epoch,
            "elapsed_s": round(time.time() - started, 1),
            "loss": round(loss.item(), 4),
            "reg1": round(reg0, 4),
            "top1": [round(a, 3) for a in agree],
        }
        if step % args.eval_every == 0 or step == args.steps:
            row.update(evaluate(model, val_batches, frozen, args.passes, args.w_cls))
        curve.append(row)
        print(json.dumps(row), flush=True)
        if time.time() - started > args.time_limit_s:
            print(f"time limit reached at step {step}", flush=True)
            if "val_loss" not in row:
                row.update(evaluate(model, val_batches, frozen, args.passes, args.w_cls))
            break
    summary = {
        "args": vars(args),
        "train_sequences": len(train_ex),
        "train_rows": rows,
        "corpus_sequences": len(corpus),
        "val_sequences": len(val),
        "steps": step,
        "epochs": epoch,
        "train_seconds": round(time.time() - started, 1),
        "final": curve[-1],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "curve": curve,
    }
    Path(args.curve).parent.mkdir(parents=True, exist_ok=True)
    Path(args.curve).write_text(json.dumps(summary, indent=1) + "\n")
    Path(args.ckpt).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.ckpt)
    if args.export:
        gen = sum(len(e["ids"]) - e["prompt_len"] for e in examples)
        note = f"the {args.vocab_size} most frequent of {gen} generated tokens in {len(examples)} sequences"
        model.fold_standardization(mu, sigma)
        export(model, Path(args.export), ids, args, note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", default="training/data/eagle_features.pt")
    ap.add_argument(
        "--corpus", default="", help="eagle_corpus.py feature files (training only), comma-separated"
    )
    ap.add_argument("--init", choices=["target", "scratch"], default="scratch")
    ap.add_argument("--init-layer", type=int, default=29)
    ap.add_argument("--init-from", default="", help="an exported eagle1 file to go on training from")
    ap.add_argument("--intermediate", type=int, default=1280, help="MLP width (--init-from: widened)")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (--init-from: grown)")
    ap.add_argument("--int8-layers", action="store_true", help="export the layers' weights as int8 rows")
    ap.add_argument("--passes", type=int, default=3, help="draft positions unrolled in training")
    ap.add_argument("--w-cls", type=float, default=0.1, help="weight of the token loss")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-tokens", type=int, default=3072)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--time-limit-s", type=float, default=30 * 60)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--curve", default="training/results/eagle_training.json")
    ap.add_argument("--ckpt", default="training/data/eagle_ckpt.pt")
    ap.add_argument("--export", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--data", default="", help="generate_draft_data.py files: features computed here, on --device (GPU)"
    )
    ap.add_argument("--feature-batch-tokens", type=int, default=2048)
    ap.add_argument("--feature-dtypes", default="float32", help="e.g. float32,bfloat16: dealt over the data")
    ap.add_argument("--max-val", type=int, default=10**9, help="at most this many validation sequences")
    ap.add_argument("--budget-s", type=float, default=0, help="the whole run's seconds, features included")
    ap.add_argument("--clock-schedule", action="store_true", help="anneal the rate over --time-limit-s too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
