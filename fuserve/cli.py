"""`fuserve generate|serve|bench`: the command line."""

from __future__ import annotations

import argparse
import sys
import time

from fuserve.configs import ConfigError, load_config


def _generate(args: argparse.Namespace) -> int:
    from fuserve.llm import LLM
    from fuserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(load_config(args.config))
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    t1 = time.perf_counter()
    if args.raw or llm.tokenizer is None:
        result = llm.generate(args.prompt, params)[0]
    else:
        result = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    dt = time.perf_counter() - t1
    out = result.outputs[0]
    print(out.text)
    n = len(out.token_ids)
    print(
        f"[{llm.engine.model_name} on {llm.engine.device.type}: {n} tokens in {dt:.2f} s = {n / dt:.1f} tokens/s; "
        f"prompt {result.num_prompt_tokens} tokens; load {load_s:.1f} s]",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuserve", description="Serve LLMs on a Ray cluster, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run one prompt offline and print the answer and tokens/s")
    gen.add_argument("--config", default=None, help="deployment YAML (default: the embedded SmolLM2 config)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.set_defaults(func=_generate)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fuserve: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
