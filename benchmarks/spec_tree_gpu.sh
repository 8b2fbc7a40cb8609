#!/usr/bin/env bash
# Issue 17's two-branch tree (speculative.second_best) and the confidence cut on one GPU, with the default
# model and its shipped draft. The GGUF comes in three parts on three calls to the same warm machine
# (training/gpu_target.sh; bash training/pack_target.sh first):
#   call 1: carry [".carry/target/part-a", ".carry/whl-distill"]  GPU tests of the tree, then stashes
#   call 2: carry [".carry/target/part-b"]                         stashes
#   call 3: carry [".carry/target/part-c"]                         unpacks; bench_spec: chain / tree x tau 0 / 0.3
# Under $OUT: gpu_tests.log, spec-tree-gpu-*.json (one per setting), run.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/distill
if [ -d .carry/whl-distill ] && [ ! -d "$W/site" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" \
    .carry/whl-distill/*.whl || exit 1
fi
if [ -n "${GPU_TESTS:-}" ]; then
  PYTHONPATH=$W/site:$PWD timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_spec_alternatives.py tests/kernels/test_paged_decode_attention.py \
    tests/kernels/test_paged_prefill_attention.py tests/test_feature_draft.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
fi
. training/gpu_target.sh  # exits here until all three parts are in
DRAFT=fuserve/speculative/drafts/smollm2-135m-instruct-eagle.safetensors
for setting in ${SETTINGS:-"chain 0" "tree 0" "chain 0.3" "tree 0.3"}; do
  set -- $setting
  [ "$(left)" -lt 90 ] && { say "no time left for $setting"; break; }
  say "bench_spec: $1, tau $2"
  timeout $(( $(left) - 20 )) python3 benchmarks/bench_spec.py --model default --proposer "draft=$DRAFT" \
    --ks ${KS:-2,4} --batches ${BATCHES:-1,8} --max-tokens 128 --draft-confidence "$2" \
    $( [ "$1" = tree ] && echo --second-best ) --out "$OUT/spec-tree-gpu-$1-tau$2.json" 2>&1 \
    | grep -E "tok/s|wrote|Error|error" | tee -a "$LOG"
done
