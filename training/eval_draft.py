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
from draft_vocab import frequent_tokens, token_counts  # noqa: E402

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


def subset_candidates(data: Path, sizes: list[int]) -> dict[str, torch.Tensor]:
    """The most frequent target output tokens of the training data (draft_vocab.py), per size."""
    counts = token_counts(torch.load(data))
    return {f"top{n}": frequent_tokens(counts, n) for n in sizes}


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


def decode_ms_per_token(path: str | None, prompt: list[int], tokens: int = 64) -> float:
    """Batch-1 decode time per token of a model served by fuserve's engine (CPU): (time for 1 + n
    tokens - time for 1) / n, best of three, so prefill and start-up are left out."""
    from fuserve import LLM, SamplingParams
    from fuserve.configs import config_from_dict

    llm = LLM(config_from_dict({"model": {"path": path}} if path else {}))
    timings = {}
    for n in (1, 1 + tokens):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            best = min(best, time.perf_counter() - t0)
        timings[n] = best
    return 1e3 * (timings[1 + tokens] - timings[1]) / tokens


def reduced_head_folder(folder: Path, rows: int, dest: Path) -> Path:
    """A copy of the draft folder whose vocabulary (embedding and tied head) is cut to `rows` rows:
    for timing what a reduced-vocabulary head would cost (the tokens themselves do not matter)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (dest / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = rows
    (dest / "config.json").write_text(json.dumps(config))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    tensors[EMBED_NAME] = tensors[EMBED_NAME][:rows].contiguous()
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def speed_estimate(draft_folder: Path, prompt: list[int], mean_len: dict[str, dict[str, float]]) -> dict:
    """Batch-1 cost of a draft token relative to a target step (c), and the speedup that gives at each
    k if verifying k + 1 tokens costs one target step: (1 + accepted) / (1 + k c). An estimate for
    choosing the draft; the engine's benchmark measures the real thing. Also timed: the same draft
    with an 8192-row head (its acceptance is `reduced_vocab_head.top8192`)."""
    target_ms = decode_ms_per_token(None, prompt)
    out: dict = {"target_ms_per_token": round(target_ms, 2)}
    small = reduced_head_folder(draft_folder, 8192, Path(tempfile.mkdtemp()) / "draft-head8192")
    for name, folder, ids in (
        ("full", draft_folder, prompt),
        ("top8192", small, [t % 8192 for t in prompt]),
    ):
        ms = decode_ms_per_token(str(folder), ids)
        c = ms / target_ms
        out[name] = {
            "draft_ms_per_token": round(ms, 2),
            "draft_cost_ratio": round(c, 3),
            "estimated_speedup": {k: round((1 + v) / (1 + int(k) * c), 3) for k, v in mean_len[name].items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="training/data/smollm2-135m-instruct-draft.safetensors")
    ap.add_argument("--untrained", action="store_true", help="evaluate a randomly initialized draft instead")
    ap.add_argument("--target-cache", default="training/data/heldout_target.pt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="training/results/draft_acceptance.json")
    ap.add_argument("--data", default="training/data/draft_data.pt", help="for the reduced-vocabulary rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="also time target and draft decode (batch 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = heldout_target(Path(args.target_cache), args.max_tokens)
    model = load_draft(None if args.untrained else Path(args.draft))
    subsets: dict[str, torch.Tensor | None] = {"full": None}
    if Path(args.data).is_file():
        subsets.update(subset_candidates(Path(args.data), [2048, 4096, 8192, 16384]))
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
    if not args.untrained and args.speed:
        folder = materialize_draft(
            target_gguf(), Path(args.draft), Path(tempfile.gettempdir()) / "fuserve-draft-eval"
        )
        mean_len = {"full": report["all"]["mean_accepted_length"]}
        if "top8192" in report["reduced_vocab_head"]:
            mean_len["top8192"] = report["reduced_vocab_head"]["top8192"]["mean_accepted_length"]
        report["cpu_speed"] = speed_estimate(folder, list(rows[0]["prompt_ids"]), mean_len)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
