"""Guided decoding's cost: per-token ITL of JSON-schema-guided vs unconstrained decoding, and grammar
compile time.

Llama-3-8B shape, random bf16 weights (load_format dummy), batch 1/16/64, greedy, async scheduling
and CUDA graphs as the engine runs them by default on a GPU. A dummy model has no tokenizer, so the
engine gets a synthetic byte-level BPE one of the model's full 128,256-token vocabulary: SmolLM2's
49,152 real tokens plus merges of random pairs of them, so llguidance's token trie is as large as
Llama 3's (the mask's CPU cost grows with it). Every guided row follows the same nested JSON schema;
rows are measured only while the whole batch is still decoding.

Rows (DESIGN.md's schema): bench "guided", engine "fuserve-unconstrained" / "fuserve-guided" per
batch with ms_per_token (median step), itl_ms_p50/p99, the guided row's overhead_ms and overhead_frac
against the unconstrained one of the same batch, and mask_fill_ms_p50 (the CPU bitmask fill, which
runs while the forward does); bench "grammar-compile": p50/p99 ms over the 20 test schemas
(tests/guided_schemas.py), each compiled fresh `--compile-reps` times. Targets (issue 19): overhead
≤ 3 % at batch 64 and ≤ 0.1 ms at batch 1.

    python benchmarks/bench_guided.py --out $OUT/guided.json        # on the GPU machine (~4 min)
    python benchmarks/bench_guided.py --smoke --out /tmp/g.json     # tiny shapes on CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_decode import LLAMA3_8B, TINY, commit, dummy_engine_config, prompts  # noqa: E402
from guided_schemas import SCHEMAS  # noqa: E402

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


def default_tokenizer() -> Any:
    from fuserve.configs import FuserveConfig
    from fuserve.workers.models.loader import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(FuserveConfig().model))


def save_tokenizer_dir(tokenizer: Any, folder: Path) -> None:
    """The GPU machine takes at most 64 MiB a call and the default model's GGUF is 98 MB: its tokenizer
    travels alone, as an HF tokenizer folder that `Tokenizer.from_hf_dir` reads back."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer.backend.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": tokenizer.eos_token}))


def synthetic_tokenizer(vocab_size: int, seed: int = 0, base_dir: str | None = None) -> Any:
    """SmolLM2's tokenizer grown (or cut) to `vocab_size` tokens: each new token merges two random
    existing ones, so it is a valid byte-level BPE whose new tokens are plausible subword strings."""
    import tokenizers

    from fuserve.workers.tokenizer import Tokenizer

    base = Tokenizer.from_hf_dir(base_dir) if base_dir else default_tokenizer()
    doc = json.loads(base.backend.to_str())
    vocab: dict[str, int] = doc["model"]["vocab"]
    merges = doc["model"]["merges"]
    specials = {t["id"] for t in doc["added_tokens"]}
    pieces = [t for t, i in vocab.items() if i not in specials and len(t) <= 8]
    rng = random.Random(seed)
    if vocab_size < len(vocab):
        keep = sorted(vocab.items(), key=lambda kv: kv[1])[:vocab_size]
        vocab = dict(keep)
        merges = [m for m in merges if all(p in vocab for p in (m.split(" ") if isinstance(m, str) else m))]
        merges = [m for m in merges if "".join(m.split(" ") if isinstance(m, str) else m) in vocab]
    while len(vocab) < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append(f"{a} {b}" if merges and isinstance(merges[0], str) else [a, b])
    doc["model"]["vocab"], doc["model"]["merges"] = vocab, merges
    backend = tokenizers.Tokenizer.from_str(json.dumps(doc))
    return Tokenizer(backend=backend, eos_token_ids=base.eos_token_ids, special_ids=base.special_ids)


def json_grammar(schema: dict[str, Any]) -> str:
    from fuserve.router.guided_requests import json_schema_grammar

    return json_schema_grammar(schema, "schema")


def time_steps(
    engine: Any, batch: int, prompt_len: int, output_len: int, vocab: int, grammar: str | None
) -> dict:
    """Step times while all `batch` sequences decode (after each one's first token)."""
    from fuserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, grammar=grammar)
    for i, p in enumerate(prompts(batch, prompt_len, vocab, seed=batch)):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", p, params)
    steps = []
    while engine.has_unfinished():
        s = time.perf_counter()
        outs = engine.step()
        e = time.perf_counter()
        # every sequence decoding (each past its first token): the batch is whole
        if len(outs) == batch and all(len(o.token_ids) > 1 for o in outs):
            steps.append(e - s)
    steps.sort()
    n = len(steps)
    return dict(
        ms_per_token=1e3 * steps[n // 2] if n else float("nan"),
        itl_ms_p50=1e3 * steps[n // 2] if n else float("nan"),
        itl_ms_p99=1e3 * steps[min(n - 1, int(0.99 * n))] if n else float("nan"),
        num_steps=n,
    )


def mask_fill_ms(tokenizer: Any, vocab: int, grammar: str, batch: int, reps: int) -> float:
    """The CPU bitmask fill for `batch` guided rows mid-document, as the engine fills them."""
    from fuserve.sampling_params import SamplingParams
    from fuserve.workers.grammar_compiler import GrammarCompiler
    from fuserve.workers.guided_decoding import GuidedDecoding
    from fuserve.workers.sequence import Sequence

    compiler = GrammarCompiler(tokenizer, vocab, cache_size=4, num_threads=1)
    guided = GuidedDecoding(compiler, pin_memory=torch.cuda.is_available())
    prefix = tokenizer.encode(
        '{"name": "Alice Smith", "age": 42, "tags": ["admin", "de', add_special_tokens=False
    )
    seqs = []
    for i in range(batch):
        seq = Sequence(f"m{i}", [1], SamplingParams(max_tokens=64, grammar=grammar), 0.0, 64)
        guided.add(seq)
        seqs.append(seq)
    while guided.has_pending:
        guided.wait(1.0)
        guided.poll()
    for seq in seqs:
        seq.token_ids.extend(prefix)
        assert guided.advance(seq), "the benchmark's prefix does not follow its schema"
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        guided.bitmask([(seq, []) for seq in seqs])
        times.append(time.perf_counter() - t0)
    compiler.shutdown()
    return 1e3 * statistics.median(times)


def compile_times(tokenizer: Any, vocab: int, reps: int) -> dict[str, float]:
    import llguidance

    from fuserve.workers.grammar_compiler import llguidance_tokenizer

    lltok = llguidance_tokenizer(tokenizer, vocab)
    grammars = [json_grammar(s) for s in SCHEMAS]
    times = []
    for _ in range(reps):
        for g in grammars:
            t0 = time.perf_counter()
            m = llguidance.LLMatcher(lltok, g)
            times.append(time.perf_counter() - t0)
            assert not m.is_error(), m.get_error()
    times.sort()
    return dict(
        compile_ms_p50=1e3 * times[len(times) // 2],
        compile_ms_p99=1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
        num_schemas=len(grammars),
        reps=reps,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, just checks the script runs")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--compile-reps", type=int, default=5)
    ap.add_argument("--base-tokenizer", default=None, help="HF tokenizer folder (default: the model's)")
    ap.add_argument("--save-base-tokenizer", default=None, help="write the tokenizer there, exit")
    args = ap.parse_args()
    if args.save_base_tokenizer:
        save_tokenizer_dir(default_tokenizer(), Path(args.save_base_tokenizer))
        return
    cfg = dict(TINY, vocab_size=50000) if args.smoke else LLAMA3_8B
    batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
    prompt_len, output_len = (8, 6) if args.smoke else (args.prompt_len, args.output_len)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    from fuserve.configs import config_from_dict
    from fuserve.workers.engine import LLMEngine

    vocab = cfg["vocab_size"]
    tokenizer = synthetic_tokenizer(vocab, base_dir=args.base_tokenizer)
    assert tokenizer.vocab_size == vocab, (tokenizer.vocab_size, vocab)
    config = config_from_dict(dummy_engine_config(cfg, batches, prompt_len, output_len, args.smoke))
    engine = LLMEngine(config)
    engine.tokenizer = tokenizer  # a dummy model has none: guided decoding needs one
    grammar = json_grammar(NESTED)
    rows: list[dict[str, Any]] = []
    base = dict(model="tiny" if args.smoke else "llama3-8b", device=device, prompt_len=prompt_len)
    base |= dict(output_len=output_len, date=dt.date.today().isoformat(), commit=commit())
    time_steps(engine, batches[0], prompt_len, output_len, vocab, grammar)  # warm-up: compile, graphs
    for batch in batches:
        free = time_steps(engine, batch, prompt_len, output_len, vocab, None)
        guided = time_steps(engine, batch, prompt_len, output_len, vocab, grammar)
        fill = mask_fill_ms(tokenizer, vocab, grammar, batch, reps=5 if args.smoke else 50)
        rows.append(dict(base, bench="guided", engine="fuserve-unconstrained", batch=batch, **free))
        overhead = guided["ms_per_token"] - free["ms_per_token"]
        rows.append(
            dict(
                base,
                bench="guided",
                engine="fuserve-guided",
                batch=batch,
                **guided,
                overhead_ms=overhead,
                overhead_frac=overhead / free["ms_per_token"],
                mask_fill_ms_p50=fill,
            )
        )
        print(rows[-2], rows[-1], sep="\n", flush=True)
    rows.append(
        dict(
            base,
            bench="grammar-compile",
            engine="llguidance",
            **compile_times(tokenizer, vocab, 1 if args.smoke else args.compile_reps),
        )
    )
    print(rows[-1])
    engine.shutdown()
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{'batch':>5} {'free ms':>8} {'guided ms':>9} {'overhead':>9} {'fill ms':>8}")
    for free, guided in zip(rows[0:-1:2], rows[1:-1:2], strict=True):
        print(
            f"{free['batch']:>5} {free['ms_per_token']:>8.3f} {guided['ms_per_token']:>9.3f} "
            f"{100 * guided['overhead_frac']:>8.1f}% {guided['mask_fill_ms_p50']:>8.3f}"
        )


if __name__ == "__main__":
    main()
