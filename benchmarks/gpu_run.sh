#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, run the gpu-marked tests, then the
# benchmarks named in $BENCH (default: kernels decode). Everything lands under $OUT.
#   device run: bash benchmarks/gpu_run.sh            (carry: [".whl"])
set -uo pipefail
export PYTHONUNBUFFERED=1
# installed once per call: side_by_side_gpu_run.sh installs them before starting its jobs
. "$(dirname "$0")/device_site.sh" || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # a whole-run bound, and one per test where pytest-timeout is installed (the GPU image has it)
  PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${PER_TEST_TIMEOUT:-200}")
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x -m gpu ${TESTS:-tests/kernels tests/test_gpu_engine.py} $PER_TEST -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -25
fi
for b in ${BENCH:-kernels decode}; do
  case $b in
    kernels) timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    gemv) timeout 200 python3 benchmarks/bench_gemv.py --out "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.log" | tail -12 ;;
    profile) timeout 200 python3 benchmarks/profile_step.py --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" | tail -8 ;;
    # TP=N on two GPUs: bench_tp.py's --engines give the A/Bs; benchmarks/tp_two_gpu_run.sh is issue 14's run
    tp) timeout ${TP_TIMEOUT:-450} python3 benchmarks/bench_tp.py ${TP_ARGS:-} --out "$OUT/tp.json" 2>&1 | tee "$OUT/tp.log" | tail -45 ;;
    sampler) timeout 200 python3 benchmarks/bench_sampler.py --out "$OUT/sampler.json" 2>&1 | tee "$OUT/sampler.log" | tail -10 ;;
    spec_channel) timeout 400 python3 benchmarks/bench_spec_channel.py --out "$OUT/spec_channel.json" 2>&1 | tee "$OUT/spec_channel.log" | tail -30 ;;
    # issue 19: guided vs unconstrained decode; the tokenizer travels alone (save it with
    # `python benchmarks/bench_guided.py --out - --save-base-tokenizer .carry/smollm2-tokenizer`, carry .carry)
    guided) timeout 400 python3 benchmarks/bench_guided.py --base-tokenizer ${BASE_TOKENIZER:-.carry/smollm2-tokenizer} \
      --out "$OUT/guided.json" 2>&1 | tee "$OUT/guided.log" | tail -12 ;;
    # issue 17: verification's cost side at synthetic acceptance (random weights, free drafts)
    spec) timeout 450 python3 benchmarks/bench_spec.py --model llama3-8b --proposer repeat \
      --synthetic-acceptance 0.5,0.7,0.9 --batches 1,8,32,64 --ks 2,3,4 --max-tokens 128 --prompt-len 128 \
      --out "$OUT/spec-gpu.json" 2>&1 | tee "$OUT/spec.log" | tail -45 ;;
    # issue 18: each 8-bit scheme against bf16, kernel rows, the FP8 KV cache at a long context
    quant) timeout ${QUANT_TIMEOUT:-540} python3 benchmarks/bench_quant.py ${QUANT_ARGS:-} --out "$OUT/quant.json" 2>&1 \
      | tee "$OUT/quant.log" | tail -40 ;;
    # issue 15: a step with prompt tokens, eager against its CUDA graph (MixedGraphs)
    mixed) timeout 300 python3 benchmarks/bench_mixed_step.py --out "$OUT/mixed-step.json" 2>&1 | tee "$OUT/mixed-step.log" | tail -12 ;;
    decode) timeout 400 python3 benchmarks/bench_decode.py ${DECODE_ARGS:-} --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | tail -20 ;;
    # issue 18's offline throughput (trtllm-bench-shaped): 4 shapes x 3 schemes, ~8 min on an H100
    throughput) timeout ${THROUGHPUT_TIMEOUT:-570} python3 benchmarks/bench_throughput.py ${THROUGHPUT_ARGS:-} --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log" | tail -25 ;;
  esac
done
