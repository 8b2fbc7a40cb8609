#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, run the gpu-marked tests, then the
# benchmarks named in $BENCH (default: kernels decode). Everything lands under $OUT.
#   device run: bash benchmarks/gpu_run.sh            (carry: [".whl"])
set -uo pipefail
export PYTHONUNBUFFERED=1 FUSERVE_COMMIT=${FUSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
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
    decode) timeout 400 python3 benchmarks/bench_decode.py ${DECODE_ARGS:-} --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | tail -20 ;;
  esac
done
