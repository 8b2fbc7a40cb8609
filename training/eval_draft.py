"""Held-out acceptance of a draft: how many of its greedy drafts the target's greedy decoding keeps.

For each held-out prompt (training/heldout_prompts.json: 20 chat + 20 code, never trained on), the
target (fuserve's engine, CPU) writes its greedy continuation once (cached under training/data/). The
draft then reads prompt + continuation teacher-forced; where its greedy token equals the target's at
positions j, j+1, ..., a round of k drafts started at j keeps min(k, that run) of them (a draft that
matches the target continues exactly as the target does, so one forward gives every round). Every
position j with k tokens left starts a round; reported per group: the acceptance at each draft
position i (P(draft i kept | drafts 1..i-1 kept)) and the mean accepted length at k = 1..6.

    PYTHONPATH=$PWD python training/eval_draft.py  # -> training/results/draft_acceptance.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from draft_model import build_draft, target_gguf, target_tensors, tie_and_freeze_embedding  # noqa: E402
from draft_prompts import heldout_prompts  # noqa: E402

from fuserve.speculative.shipped_draft import EMBED_NAME, materialize_draft  # noqa: E402

MAX_K = 6


def heldout_target(cache: Path, max_tokens: int) -> list[dict]:
    """The target's greedy continuation of every held-out prompt (chat template applied)."""
    if cache.is_file():
        return torch.load(cache)
    from fuserve import LLM, SamplingParams

    llm = LLM()
    rows = []
    for group, prompts in heldout_prompts().items():
        ids = [
            llm.tokenizer.encode(
                llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False
            )
            for p in prompts
        ]
        outs = llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        for p, pid, o in zip(prompts, ids, outs, strict=True):
            rows.append(
                {"group": group, "prompt": p, "prompt_ids": pid, "output_ids": o.outputs[0].token_ids}
            )
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rows, cache)
    return rows


def match_runs(matches: list[bool]) -> list[int]:
    """runs[j]: how many consecutive positions from j on the draft matches the target."""
    runs = [0] * (len(matches) + 1)
    for j in range(len(matches) - 1, -1, -1):
        runs[j] = runs[j + 1] + 1 if matches[j] else 0
    return runs[:-1]


def acceptance(all_runs: list[list[int]], max_k: int = MAX_K) -> dict:
    """Per draft position acceptance and mean accepted length at k = 1..max_k over rounds started at
    every position with max_k tokens left."""
    starts = [r for runs in all_runs for r in runs[: max(0, len(runs) - max_k + 1)]]
    per_position, reached = [], len(starts)
    for i in range(1, max_k + 1):
        kept = sum(1 for r in starts if r >= i)
        per_position.append(round(kept / reached, 4) if reached else 0.0)
        reached = kept
    mean_len = {
        str(k): round(sum(min(r, k) for r in starts) / max(1, len(starts)), 4) for k in range(1, max_k + 1)
    }
    return {"rounds": len(starts), "per_position": per_position, "mean_accepted_length": mean_len}


def draft_runs(
    model: torch.nn.Module, rows: list[dict], vocab_subsets: dict[str, torch.Tensor | None]
) -> dict[str, list[list[int]]]:
    """Match runs per row for each way of choosing the draft's greedy token: over the whole vocabulary
    (None) or only over a subset of token ids (a reduced-vocabulary head)."""
    runs: dict[str, list[list[int]]] = {name: [] for name in vocab_subsets}
    with torch.no_grad():
        for r in rows:
            out = list(r["output_ids"])
            ids = torch.tensor([list(r["prompt_ids"]) + out[:-1]])
            logits = model(input_ids=ids).logits[0, len(r["prompt_ids"]) - 1 :]
            for name, subset in vocab_subsets.items():
                pred = logits.argmax(-1) if subset is None else subset[logits[:, subset].argmax(-1)]
                runs[name].append(match_runs([int(a) == b for a, b in zip(pred, out, strict=True)]))
    return runs


def frequent_tokens(data: Path, sizes: list[int]) -> dict[str, torch.Tensor]:
    """The most frequent target output tokens of the training data, for reduced-vocabulary heads."""
    counts = torch.zeros(49152, dtype=torch.long)
    for r in torch.load(data):
        counts += torch.bincount(r["output_ids"].long(), minlength=counts.numel())
    order = counts.argsort(descending=True)
    return {f"top{n}": order[:n].sort().values for n in sizes}


def load_draft(draft_file: Path | None) -> torch.nn.Module:
    """The shipped (bf16) draft as served: materialized and loaded back; None: an untrained draft
    (random layers on the target's embedding), the floor the trained one must beat."""
    from transformers import LlamaForCausalLM

    if draft_file is None:
        model = build_draft(2, 640)
        tie_and_freeze_embedding(model, target_tensors()[EMBED_NAME])
        return model.eval()
    folder = materialize_draft(target_gguf(), draft_file, Path(tempfile.gettempdir()) / "fuserve-draft-eval")
    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="fuserve/speculative/drafts/smollm2-135m-instruct-draft.safetensors")
    ap.add_argument("--untrained", action="store_true", help="evaluate a randomly initialized draft instead")
    ap.add_argument("--target-cache", default="training/data/heldout_target.pt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="training/results/draft_acceptance.json")
    ap.add_argument("--data", default="training/data/draft_data.pt", help="for the reduced-vocabulary rows")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = heldout_target(Path(args.target_cache), args.max_tokens)
    model = load_draft(None if args.untrained else Path(args.draft))
    subsets: dict[str, torch.Tensor | None] = {"full": None}
    if Path(args.data).is_file():
        subsets.update(frequent_tokens(Path(args.data), [4096, 8192, 16384]))
    all_runs = draft_runs(model, rows, subsets)
    runs = all_runs.pop("full")
    report = {
        "draft": "untrained" if args.untrained else args.draft,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "heldout_prompts": len(rows),
        "target_tokens": sum(len(r["output_ids"]) for r in rows),
    }
    for group in ("chat", "code"):
        report[group] = acceptance([rs for rs, r in zip(runs, rows, strict=True) if r["group"] == group])
    report["all"] = acceptance(runs)
    # The same draft with its greedy token chosen only among the N most frequent training tokens: what a
    # reduced-vocabulary head (N rows instead of 49152) would keep of the acceptance.
    report["reduced_vocab_head"] = {name: acceptance(r) for name, r in all_runs.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
