"""`fuserve generate|serve|build|k8s|deploy|status|scale|bench serve|bench throughput`: the command line."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from fuserve.cluster_cli import add_cluster_commands
from fuserve.configs import HAPROXY_ENV, ConfigError, load_config


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
        f"[{llm.engine.model_name} on {llm.engine.device.type}: {n} tokens in {dt:.2f} s = "
        f"{n / dt:.1f} tokens/s; prompt {result.num_prompt_tokens} tokens; load {load_s:.1f} s]",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config.serve.ingress == "haproxy":
        for key, value in HAPROXY_ENV.items():
            os.environ.setdefault(key, value)
    from fuserve.cluster.bootstrap import serve_until_stopped

    for field in ("host", "port", "grpc_port"):
        if getattr(args, field) is not None:
            setattr(config.serve, field, getattr(args, field))
    serve_until_stopped(config, args.address)
    return 0


def _build(args: argparse.Namespace) -> int:
    from fuserve.workers.models.checkpoint_build import build_checkpoint

    t0 = time.perf_counter()
    try:
        manifest = build_checkpoint(
            args.src,
            Path(args.out),
            args.tp,
            args.quant,
            args.dtype,
            args.max_model_len,
            args.kv_cache,
            args.calibrate,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"fuserve build: {err}", file=sys.stderr)
        return 2
    kv_scales = f" (scales calibrated on {manifest.kv_scales['calibration']})" if manifest.kv_scales else ""
    rounding = f" ({manifest.calibration['method']})" if manifest.calibration else ""
    print(
        f"built {args.out}: {manifest.tensor_parallel_size} rank file(s), quantization "
        f"{manifest.quantization}{rounding}, {manifest.dtype}, "
        f"KV cache {manifest.kv_cache_dtype}{kv_scales}, "
        f"max_model_len {manifest.limits['max_model_len']}, "
        f"from {manifest.source['path']} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _bench_script(args: argparse.Namespace) -> int:
    """Runs benchmarks/bench_NAME.py (`fuserve bench NAME`) from the source checkout (benchmarks are not
    installed)."""
    name = f"bench_{args.bench}"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not script.is_file():
        print(f"fuserve: {script} not found; `fuserve bench` runs from a source checkout", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.main(args.bench_args)


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

    srv = sub.add_parser(
        "serve",
        help="serve a deployment over HTTP (OpenAI API) and gRPC on Ray Serve until Ctrl-C",
        description="Start a local Ray cluster (or join one with --address) and serve CONFIG: the OpenAI "
        "API at http://HOST:PORT/v1, /health and /metrics, and gRPC on GRPC_PORT.",
    )
    srv.add_argument("config", nargs="?", default=None, help="deployment YAML (default: SmolLM2 on CPU)")
    srv.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, ray://head:10001)")
    srv.add_argument("--host", default=None, help="HTTP host (default: serve.host)")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port)")
    srv.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: serve.grpc_port)")
    srv.set_defaults(func=_serve)

    build = sub.add_parser(
        "build",
        help="convert a checkpoint ahead of time: fused, sharded per rank, quantized",
        description="Read SRC (an HF folder or a .gguf file) and write OUT: one safetensors file per "
        "tensor-parallel rank (QKV and gate/up fused, sharded, optionally 8-bit with per-channel scales) "
        "and fuserve-build.json. Serve it with model.path: OUT.",
    )
    build.add_argument("src", help="HF model folder or .gguf file")
    build.add_argument("--out", required=True, help="folder to write (created; rank files replaced)")
    build.add_argument("--tp", type=int, default=1, help="tensor-parallel size it will be served with")
    build.add_argument("--quant", default="none", choices=["none", "int8-wo", "fp8-wo", "fp8"])
    build.add_argument(
        "--kv-cache", default="auto", choices=["auto", "fp8"], help="KV cache dtype it serves with"
    )
    build.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    build.add_argument("--max-model-len", type=int, default=None, help="longest context it may serve")
    build.add_argument(
        "--calibrate",
        default="none",
        choices=["none", "gptq"],
        help="round 8-bit weights by GPTQ on calibration text instead of to nearest (more accurate, ~1-2 min "
        "on a CPU for SmolLM2-135M)",
    )
    build.set_defaults(func=_build)
    add_cluster_commands(sub)

    bench = sub.add_parser("bench", help="benchmarks (from a source checkout)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bench_serve = bench_sub.add_parser(
        "serve", add_help=False, help="serving load generator and comparisons (see --help)"
    )
    bench_serve.set_defaults(func=_bench_script)
    bench_throughput = bench_sub.add_parser(
        "throughput",
        add_help=False,
        help="offline throughput like trtllm-bench: fixed lengths, all requests at once (see --help)",
    )
    bench_throughput.set_defaults(func=_bench_script)

    # `fuserve bench NAME ...` hands every option after NAME to the benchmark's own parser.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fuserve: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
