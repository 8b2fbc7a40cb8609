"""Held-out acceptance of the feature-reading draft, chained as served, beside eval_draft.py's numbers.

Same prompts, rounds and report as eval_draft.py (training/heldout_prompts.json: 20 chat + 20 code,
the target's greedy continuation; a round of up to 6 greedy drafts started at every generated position,
kept while they equal the target's tokens). Here draft position s of a round reads the draft's own
predicted feature from position 2 on (EAGLE-1 chaining); eagle_model.unrolled computes every round's
position s in one pass, exactly as sequential drafting would (its rows attend to what the draft holds).
Greedy drafts are chosen as served, over the draft's vocabulary subset and the tokens the sequence
holds (`subset_context`), and, for comparison, over the subset alone and the whole vocabulary.

    PYTHONPATH=$PWD python training/eval_eagle.py   # -> training/results/eagle_acceptance.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from draft_model import target_tensors  # noqa: E402
from eagle_model import EagleDraft  # noqa: E402
from eval_draft import MAX_K, acceptance  # noqa: E402
from train_eagle import Frozen, target_config  # noqa: E402

from fuserve.speculative.feature_draft_file import dequantized  # noqa: E402
from fuserve.speculative.shipped_draft import EMBED_NAME, VOCAB_TENSOR  # noqa: E402


def load_shipped(path: Path, cfg: dict | None = None) -> tuple[EagleDraft, torch.Tensor, int]:
    """The exported draft as served (bf16, or int8 layers), in fp32, its vocabulary ids and MLP width.
    `cfg`: the target's HF config (default: the default model's)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = dequantized({n: f.get_tensor(n) for n in f.keys()})
    width = int(meta["intermediate_size"])
    model = EagleDraft(cfg if cfg is not None else target_config(), width, int(meta["num_hidden_layers"]))
    state = {
        "fc.weight": t["eagle.fc.weight"],
        "fc.bias": t["eagle.fc.bias"],
        "out_scale": t["eagle.out_scale"],
        "out_shift": t["eagle.out_shift"],
    }
    state.update({k[len("model.") :]: v for k, v in t.items() if k.startswith("model.layers.")})
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), t[VOCAB_TENSOR].long(), width


def round_runs(model: EagleDraft, row: dict, frozen: Frozen, full_head: torch.Tensor, head: str) -> list[int]:
    """Per generated position j: how many of a round's drafts, started with the target holding
    prompt + out[:j], equal the target's next tokens (at most MAX_K). `head`: the tokens a draft may be
    (HEADS)."""
    ids, p = row["ids"], row["prompt_len"]
    out = ids[p:].tolist()
    emb = frozen.embed[ids[1:]][None]
    feats = row["feats"][:-1].float()[None]
    allowed = candidates(ids, frozen.ids, full_head.shape[0], head)
    with torch.no_grad():
        passes = model.unrolled(emb, feats, MAX_K)
        preds = []
        for h in passes:
            hf = h[0].float()
            n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + frozen.eps) * frozen.norm
            logits = n @ full_head.T
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            preds.append(logits.argmax(-1).tolist())
    runs = []
    for j in range(len(out)):
        r = 0
        # position s (1-based) predicts out[j + s - 1] at pass s - 1, row p + j - 2 + s - 1
        while r < MAX_K and j + r < len(out):
            row_i = p + j - 2 + r
            if row_i < 0 or preds[r][row_i] != out[j + r]:
                break
            r += 1
        runs.append(r)
    return runs


HEADS = ("subset_context", "subset", "full_vocab")  # as served; the subset alone; the whole vocabulary


def candidates(ids: torch.Tensor, subset: torch.Tensor, vocab: int, head: str) -> torch.Tensor | None:
    """[rows, vocab] bool: what row i may draft. The served head (subset_head.py) takes the subset and
    every token the sequence holds when the round starts; row i's round holds tokens 0..i+1 (from pass 2
    on, the drafts it holds are tokens the target kept, which a draft picked from these already)."""
    if head == "full_vocab":
        return None
    n = len(ids) - 1
    allowed = torch.zeros(n, vocab, dtype=torch.bool)
    allowed[:, subset] = True
    if head == "subset_context":
        seen = torch.zeros(n, vocab, dtype=torch.bool)
        seen[torch.arange(n), ids[1:]] = True
        seen[0, ids[0]] = True
        allowed |= seen.cumsum(0) > 0
    return allowed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="training/data/smollm2-135m-instruct-eagle.safetensors")
    ap.add_argument("--heldout", default="training/data/eagle_heldout_features.pt")
    ap.add_argument("--out", default="training/results/eagle_acceptance.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, ids, width = load_shipped(Path(args.draft))
    tensors = target_tensors()
    frozen = Frozen(tensors, ids, target_config()["rms_norm_eps"])
    rows = torch.load(args.heldout)
    report: dict = {
        "draft": args.draft,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "heldout_prompts": len(rows),
        "target_tokens": sum(len(r["ids"]) - r["prompt_len"] for r in rows),
        "intermediate_size": width,
    }
    for name in HEADS:
        runs = [round_runs(model, r, frozen, tensors[EMBED_NAME].float(), name) for r in rows]
        part = {
            g: acceptance([x for x, r in zip(runs, rows, strict=True) if r["group"] == g])
            for g in ("chat", "code")
        }
        part["all"] = acceptance(runs)
        report[name] = part
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
