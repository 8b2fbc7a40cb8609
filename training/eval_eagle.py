"""Held-out acceptance of the feature-reading draft, chained as served, beside eval_draft.py's numbers.

Same prompts, rounds and report as eval_draft.py (training/heldout_prompts.json: 20 chat + 20 code,
the target's greedy continuation; a round of up to 6 greedy drafts started at every generated position,
kept while they equal the target's tokens). Here draft position s of a round reads the draft's own
predicted feature from position 2 on (EAGLE-1 chaining); eagle_model.unrolled computes every round's
position s in one pass, exactly as sequential drafting would (its rows attend to what the draft holds).
Greedy drafts are chosen as served, over the draft's vocabulary subset and the tokens the sequence
holds (`subset_context`), and, for comparison, over the subset alone and the whole vocabulary.

Rounds started at every position overstate what the engine keeps: it starts a round where the last
ended, often right after a rejection, in a hard stretch. `engine_order` replays the served head's rounds
in the engine's order at k = 2..4; on 2026-11-29 it gave the engine's own per-position numbers on these
prompts within 0.01 (fp32 CPU engine, k = 4). It also scores a two-branch tree: the draft's second-best
token offered at the first position, or at every position, beside the best one, and drafts cut by the
draft's own confidence (speculative.draft_confidence).

    PYTHONPATH=$PWD python training/eval_eagle.py   # -> training/results/eagle_acceptance.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).parent))
from draft_model import target_tensors  # noqa: E402
from eagle_model import EagleDraft  # noqa: E402
from eval_draft import MAX_K, acceptance  # noqa: E402
from train_eagle import Frozen, target_config  # noqa: E402

from fuserve.speculative.feature_draft_file import dequantized  # noqa: E402
from fuserve.speculative.shipped_draft import EMBED_NAME, VOCAB_TENSOR  # noqa: E402
from fuserve.speculative.subset_head import confidence  # noqa: E402


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


class PassChoices(NamedTuple):
    """One pass's drafts at every row: the best and second-best tokens [rows, 2] and the draft's softmax
    probability of the best [rows] (what speculative.draft_confidence compares)."""

    top2: torch.Tensor
    confidence: torch.Tensor


def draft_choices(
    model: EagleDraft, row: dict, frozen: Frozen, full_head: torch.Tensor, head: str
) -> list[PassChoices]:
    """Per pass s (draft position s + 1), over the tokens `head` allows (HEADS). A round started with
    the target holding prompt + out[:j] reads pass s at row prompt_len + j - 2 + s."""
    ids = row["ids"]
    emb = frozen.embed[ids[1:]][None]
    feats = row["feats"][:-1].float()[None]
    allowed = candidates(ids, frozen.ids, full_head.shape[0], head)
    choices = []
    with torch.no_grad():
        for h in model.unrolled(emb, feats, MAX_K):
            hf = h[0].float()
            n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + frozen.eps) * frozen.norm
            logits = n @ full_head.T
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            choices.append(PassChoices(logits.topk(2, -1).indices, confidence(logits)))
    return choices


def round_runs(choices: list[PassChoices], row: dict) -> list[int]:
    """Per generated position j: how many of a round's drafts, started with the target holding
    prompt + out[:j], equal the target's next tokens (at most MAX_K)."""
    p = row["prompt_len"]
    out = row["ids"][p:].tolist()
    preds = [c.top2[:, 0].tolist() for c in choices]
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


SECOND_CANDIDATES = {"chain": 0, "second_at_first": 1, "second_everywhere": MAX_K}
CONFIDENCE_CUTS = (0.2, 0.3)  # speculative.draft_confidence values replayed (chain, k = 4 and 6)


def engine_rounds(
    choices: list[PassChoices], row: dict, k: int, seconds: int = 0, min_confidence: float = 0.0
) -> tuple[list[int], list[int], int, int]:
    """Rounds in the engine's order (eval's teacher-forced rounds start at every position; the engine
    starts one where the last ended: the first after the prompt's token, the next after the kept drafts
    and the target's own token), k drafts each, fewer where the draft's probability of one is under
    `min_confidence` (the round's drafts end with that one, as speculative.draft_confidence's do). With
    `seconds` > 0 the draft also offers its second-best token at its first `seconds` positions (a
    two-branch tree): where the best is wrong and the second right, the target keeps it and the round
    ends there. Returns per position the rounds that verified it and those that kept it, the number of
    steps and of drafts made."""
    p = row["prompt_len"]
    out = row["ids"][p:].tolist()
    best = [c.top2[:, 0].tolist() for c in choices]
    second = [c.top2[:, 1].tolist() for c in choices]
    prob = [c.confidence.tolist() for c in choices]
    reached, kept, steps, drafts = [0] * k, [0] * k, 0, 0
    j = 1
    while j < len(out) - 1:
        made = 0  # drafts the round makes: up to k, through the first the draft doubts
        while made < min(k, len(out) - 1 - j):
            doubted = prob[made][p + j - 2 + made] < min_confidence
            made += 1
            if doubted:
                break
        r = 0
        while r < made:
            want, at = out[j + r], p + j - 2 + r
            reached[r] += 1
            if best[r][at] == want:
                kept[r] += 1
                r += 1
                continue
            if r < seconds and second[r][at] == want:
                kept[r] += 1
                r += 1
            break
        steps += 1
        drafts += made
        j += r + 1
    return reached, kept, steps, drafts


def engine_acceptance(
    all_choices: list[list[PassChoices]],
    rows: list[dict],
    k: int,
    seconds: int = 0,
    min_confidence: float = 0.0,
) -> dict:
    """engine_rounds summed over rows: per position acceptance, and tokens and drafts a step."""
    reached, kept, steps, drafts = [0] * k, [0] * k, 0, 0
    for choices, row in zip(all_choices, rows, strict=True):
        r, a, n, d = engine_rounds(choices, row, k, seconds, min_confidence)
        reached = [x + y for x, y in zip(reached, r, strict=True)]
        kept = [x + y for x, y in zip(kept, a, strict=True)]
        steps += n
        drafts += d
    return {
        "steps": steps,
        "per_position": [round(a / r, 4) if r else 0.0 for a, r in zip(kept, reached, strict=True)],
        "tokens_per_step": round((sum(kept) + steps) / max(1, steps), 4),
        "drafts_per_step": round(drafts / max(1, steps), 4),
    }


ENGINE_K = (2, 3, 4)


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
    groups = {g: [i for i, r in enumerate(rows) if r["group"] == g] for g in ("chat", "code")}
    for name in HEADS:
        choices = [draft_choices(model, r, frozen, tensors[EMBED_NAME].float(), name) for r in rows]
        runs = [round_runs(c, r) for c, r in zip(choices, rows, strict=True)]
        part = {g: acceptance([runs[i] for i in idx]) for g, idx in groups.items()}
        part["all"] = acceptance(runs)
        report[name] = part
        if name != "subset_context":
            continue
        settings = [
            (f"{tree}_k{k}", k, seconds, 0.0) for tree, seconds in SECOND_CANDIDATES.items() for k in ENGINE_K
        ]
        settings += [(f"chain_k{k}_confidence{cut}", k, 0, cut) for cut in CONFIDENCE_CUTS for k in (4, 6)]
        report["engine_order"] = {
            name: {
                g: engine_acceptance([choices[i] for i in idx], [rows[i] for i in idx], k, seconds, cut)
                for g, idx in groups.items()
            }
            for name, k, seconds, cut in settings
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
