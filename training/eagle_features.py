"""The target's features for training and evaluating the feature-reading draft (eagle_model.py).

For each stored sequence (prompt + the target's own continuation, from generate_draft_data.py, and the
held-out continuations of eval_draft.py) one target prefill forward gives f_i at every position: the
last decoder layer's output before the final norm (what fuserve's target hands the draft). The target
runs as transformers' Llama on the GGUF's dequantized fp32 weights (fuserve matches it token for token;
tests/test_hf_match*). Stored in bf16 (576 x 2 bytes a token), with the token ids, per sequence.

Reproduce (repo root, after generate_draft_data.py; 268 s on 2 threads for 127k tokens + the held-out
set, recorded 2026-11-26):

    PYTHONPATH=$PWD python training/eagle_features.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from draft_model import build_draft, target_tensors  # noqa: E402
from eval_draft import heldout_target  # noqa: E402

TARGET_LAYERS, TARGET_MLP = 30, 1536


def build_target() -> torch.nn.Module:
    model = build_draft(TARGET_LAYERS, TARGET_MLP)
    missing, unexpected = model.load_state_dict(target_tensors(), strict=False)
    assert not unexpected and all(m.startswith("lm_head") for m in missing), (missing, unexpected)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def features(
    model: torch.nn.Module, seqs: list[torch.Tensor], batch_tokens: int, quiet: bool = False
) -> list[torch.Tensor]:
    """Each sequence's pre-final-norm last hidden states [len, H] in bf16, on the model's device (batches
    of similar length, right-padded: causal attention keeps padding out of the real rows)."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    at, t0 = 0, time.time()
    while at < len(order):
        longest = len(seqs[order[min(len(order) - 1, at)]])
        n = max(1, batch_tokens // max(1, longest))
        group = order[at : at + n]
        longest = max(len(seqs[i]) for i in group)
        ids = torch.full((len(group), longest), 2, dtype=torch.long, device=device)
        for r, i in enumerate(group):
            ids[r, : len(seqs[i])] = seqs[i]
        captured.clear()
        model.model(input_ids=ids)
        for r, i in enumerate(group):
            out[i] = captured[0][r, : len(seqs[i])].to(torch.bfloat16).clone()
        at += len(group)
        if not quiet:
            print(f"{at}/{len(seqs)} sequences, {time.time() - t0:.0f}s", flush=True)
    hook.remove()
    return out  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="training/data/draft_data.pt")
    ap.add_argument("--heldout", default="training/data/heldout_target.pt")
    ap.add_argument("--out", default="training/data/eagle_features.pt")
    ap.add_argument("--heldout-out", default="training/data/eagle_heldout_features.pt")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_target()
    t0 = time.time()
    rows = heldout_target(Path(args.heldout), 128)
    held = [torch.tensor(list(r["prompt_ids"]) + list(r["output_ids"]), dtype=torch.long) for r in rows]
    feats = features(model, held, args.batch_tokens)
    torch.save(
        [
            {"group": r["group"], "ids": ids, "prompt_len": len(r["prompt_ids"]), "feats": f}
            for r, ids, f in zip(rows, held, feats, strict=True)
        ],
        args.heldout_out,
    )
    records = torch.load(args.data)
    seqs = [torch.cat([r["prompt_ids"], r["output_ids"]]).long() for r in records]
    feats = features(model, seqs, args.batch_tokens)
    torch.save(
        [
            {"ids": ids, "prompt_len": len(r["prompt_ids"]), "feats": f}
            for r, ids, f in zip(records, seqs, feats, strict=True)
        ],
        args.out,
    )
    summary = {
        "train_sequences": len(seqs),
        "train_tokens": sum(len(s) for s in seqs),
        "heldout_sequences": len(held),
        "seconds": round(time.time() - t0, 1),
        "threads": args.threads,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
