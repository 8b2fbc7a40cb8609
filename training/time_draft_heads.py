"""What a draft token costs with heads of several sizes: the shipped draft in fuserve's draft runner
(CPU, one thread, batch 1), its head over the whole vocabulary or the N most frequent generated tokens
(draft_vocab.py). Rounds as in speculation: a ~300-token context, each round one new token and k = 4
drafts; the sizes take turns, round by round, so that the load of a shared box falls on all alike.

    PYTHONPATH=$PWD python training/time_draft_heads.py   # -> training/results/draft_head_speed.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from draft_model import target_gguf  # noqa: E402
from draft_vocab import frequent_tokens, token_counts  # noqa: E402

from fuserve.configs import CacheConfig, DraftPlacementConfig, KernelConfig, ModelConfig  # noqa: E402
from fuserve.speculative.draft_runner import DraftRunner  # noqa: E402
from fuserve.speculative.proposer import ProposeRequest  # noqa: E402
from fuserve.speculative.shipped_draft import materialize_draft  # noqa: E402
from fuserve.speculative.subset_head import VOCAB_FILE, write_vocab_file  # noqa: E402


def runner_with_head(base: Path, folder: Path, ids: torch.Tensor | None) -> DraftRunner:
    """The draft of `base` with `ids` as its vocabulary (None: the whole vocabulary)."""
    shutil.copytree(base, folder)
    (folder / VOCAB_FILE).unlink(missing_ok=True)
    if ids is not None:
        write_vocab_file(folder, ids, "")
    return DraftRunner(
        ModelConfig(path=str(folder), max_model_len=1024),
        DraftPlacementConfig(device="cpu"),
        CacheConfig(block_size=16, num_blocks=256),
        KernelConfig(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="training/data/smollm2-135m-instruct-draft.safetensors")
    ap.add_argument("--data", default="training/data/draft_data.pt")
    ap.add_argument("--sizes", default="0,2048,4096,8192,16384", help="0: the whole vocabulary")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default="training/results/draft_head_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = materialize_draft(
        target_gguf(), Path(args.draft), Path(tempfile.gettempdir()) / "fuserve-draft-eval"
    )
    counts = token_counts(torch.load(args.data))
    tmp = Path(tempfile.mkdtemp())
    sizes = [int(n) for n in args.sizes.split(",")]
    runners = {
        n: runner_with_head(base, tmp / f"head{n}", frequent_tokens(counts, n) if n else None) for n in sizes
    }
    prompt = list(range(1000, 1300))
    for r in runners.values():
        r.propose([ProposeRequest("s", 0, prompt, args.k)])
    ms: dict[int, list[float]] = {n: [] for n in sizes}
    confirmed = len(prompt)
    for i in range(args.rounds):
        for n, r in runners.items():  # every draft rejected: the round's one new token is the target's
            t0 = time.perf_counter()
            r.propose([ProposeRequest("s", confirmed, [5000 + i], args.k)])
            ms[n].append(1e3 * (time.perf_counter() - t0) / args.k)
        confirmed += 1
    shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "what": "draft ms per draft token, batch 1, k drafts per round, CPU, one thread",
        "k": args.k,
        "rounds": args.rounds,
        "ms_per_draft": {
            ("whole" if n == 0 else str(n)): {
                "median": round(statistics.median(t), 2),
                "min": round(min(t), 2),
            }
            for n, t in ms.items()
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
