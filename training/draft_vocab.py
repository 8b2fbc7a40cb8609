"""The shipped draft's reduced vocabulary: the N tokens the target says most often in the distillation
data, written into the draft file for its subset head (fuserve/speculative/subset_head.py).

Frequency is counted over the target's generated tokens of training/generate_draft_data.py's records
(the prompts' tokens are not counted: a draft proposes what the target will say); ties go to the lower
token id, so the same data gives the same subset. The ids go into the draft file as `VOCAB_TENSOR`
(ascending, uint16: 8 KB for 4,096 tokens), with a note of their origin in its metadata.

Reproduce (repo root; after generate_draft_data.py and train_draft.py, or on the shipped file):

    PYTHONPATH=$PWD python training/draft_vocab.py --size 4096 \
        --draft training/data/smollm2-135m-instruct-draft.safetensors

`--size 0` removes the subset (the draft then proposes over the whole vocabulary). The size was chosen
by measurement (training/results/draft_vocab.json, benchmarks/NOTES.md "A reduced-vocabulary head").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuserve.speculative.shipped_draft import VOCAB_TENSOR

VOCAB_SIZE = 49152  # SmolLM2's


def token_counts(records: list[dict], vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """How often the target generated each token id over the records: [vocab_size] int64."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in records:
        counts += torch.bincount(r["output_ids"].long(), minlength=vocab_size)
    return counts


def frequent_tokens(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent ids (ties to the lower id), ascending: [size] int64."""
    order = torch.argsort(-counts, stable=True)
    return order[:size].sort().values


def coverage(counts: torch.Tensor, ids: torch.Tensor) -> float:
    """The share of generated tokens that the subset can propose at all."""
    return float(counts[ids].sum()) / max(1, int(counts.sum()))


def vocab_note(size: int, records: list[dict], data: str) -> str:
    """Where a subset came from, for the draft file's metadata."""
    generated = sum(len(r["output_ids"]) for r in records)
    return f"the {size} most frequent of {generated} generated tokens in {len(records)} records of {data}"


def write_vocab(draft_file: Path, ids: torch.Tensor | None, note: str) -> None:
    """Rewrite the draft file with `ids` as its vocabulary (None: without one), other tensors and
    metadata unchanged."""
    with safe_open(str(draft_file), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {n: f.get_tensor(n) for n in f.keys() if n != VOCAB_TENSOR}
    meta.pop("vocab_subset", None)
    if ids is not None:
        dtype = torch.uint16 if int(ids.max()) < 1 << 16 else torch.int32
        tensors[VOCAB_TENSOR] = ids.to(dtype).contiguous()
        meta["vocab_subset"] = note
    save_file(tensors, str(draft_file), metadata=meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="training/data/draft_data.pt")
    ap.add_argument("--draft", default="training/data/smollm2-135m-instruct-draft.safetensors")
    ap.add_argument("--size", type=int, default=4096, help="tokens in the draft's head (0: whole vocabulary)")
    ap.add_argument("--out", default="training/results/draft_vocab.json")
    args = ap.parse_args()
    draft = Path(args.draft)
    if args.size == 0:
        write_vocab(draft, None, "")
        print(f"{draft}: whole vocabulary")
        return
    records = torch.load(args.data)
    counts = token_counts(records)
    ids = frequent_tokens(counts, args.size)
    generated = int(counts.sum())
    write_vocab(draft, ids, vocab_note(args.size, records, args.data))
    report = {
        "draft": str(draft),
        "draft_bytes": draft.stat().st_size,
        "size": args.size,
        "data": args.data,
        "records": len(records),
        "generated_tokens": generated,
        "distinct_generated_tokens": int((counts > 0).sum()),
        "coverage": {
            str(n): round(coverage(counts, frequent_tokens(counts, n)), 5) for n in (2048, 4096, 8192, 16384)
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
