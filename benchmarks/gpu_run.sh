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
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x -m gpu ${TESTS:-tests/kernels tests/test_gpu_engine.py} -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -25
fi
for b in ${BENCH:-kernels decode}; do
  case $b in
    kernels) timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    gemv) timeout 200 python3 benchmarks/bench_gemv.py --out "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.log" | tail -12 ;;
    profile) timeout 200 python3 benchmarks/profile_step.py --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" | tail -8 ;;
    tp) timeout ${TP_TIMEOUT:-450} python3 benchmarks/bench_tp.py ${TP_ARGS:-} --out "$OUT/tp.json" 2>&1 | tee "$OUT/tp.log" | tail -45 ;;
    # the same TP=N engine with its step plans over gloo instead of the shared-memory ring (A/B)
    tp-gloo-plans) timeout ${TP_TIMEOUT:-450} python3 benchmarks/bench_tp.py --skip-tp1 --skip-collectives \
      --plan-transport gloo ${TP_GLOO_ARGS:---all-reduce auto --batches 1} --out "$OUT/tp-gloo-plans.json" 2>&1 \
      | tee "$OUT/tp-gloo-plans.log" | tail -20 ;;
    # the TP=1 and TP=N batch-1 decode again with each L2 prefetch budget in $L2_MBS (A/B against "tp")
    tp-l2-prefetch) for mb in ${L2_MBS:-8 24}; do
      FUSERVE_L2_PREFETCH_MB=$mb timeout ${TP_TIMEOUT:-450} python3 benchmarks/bench_tp.py --skip-collectives \
        ${TP_L2_ARGS:---all-reduce auto --batches 1} --out "$OUT/tp-l2-$mb.json" 2>&1 | tee "$OUT/tp-l2-$mb.log" | tail -8
    done ;;
    sampler) timeout 200 python3 benchmarks/bench_sampler.py --out "$OUT/sampler.json" 2>&1 | tee "$OUT/sampler.log" | tail -10 ;;
    decode) timeout 400 python3 benchmarks/bench_decode.py ${DECODE_ARGS:-} --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | tail -20 ;;
  esac
done
