#!/usr/bin/env bash
# Issue 17's GPU cost side with a real draft: the Llama-3-8B-shape target (random weights) with a
# Llama-3.2-1B-shape draft in a draft server process (the deployment's channel), co-located on the
# target's GPU, or on DRAFT_GPU (a second GPU); free drafts (`repeat`) beside it in the same engine.
# Synthetic acceptance (benchmark-only, rows labelled). PROFILE_STEPS=N: each row's batch N steps under
# the CUDA profiler (wall against GPU-busy time, kernels by family); KERNELS='{"pdl": false}': a
# kernel switch (the config's kernels section). STEADY=M: batch x M requests with `batch` kept in flight
# (a server under load) instead of one batch run to completion. PHASE_TIMES=1: each row's ms a token by
# phase of the engine's step loop, and the device's busy and idle time (phase_times.py). No Ray needed:
# carry a small wheel folder (pydantic, msgspec, pyzmq, gguf, llguidance: .carry/whl-distill plus .whl's
# pyzmq) as WHEELS=.carry/whl-spec, or .whl.
#   run: bash benchmarks/spec_draft_gpu.sh        -> $OUT/spec-draft-gpu.json, $OUT/run.log
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. "$(dirname "$0")/device_site.sh" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/run.log"
timeout ${BENCH_TIMEOUT:-540} python3 benchmarks/bench_spec.py --model llama3-8b \
  --proposer ${PROPOSERS:-repeat,server=llama3.2-1b} ${DRAFT_GPU:+--draft-gpu $DRAFT_GPU} \
  --synthetic-acceptance ${ACCEPTANCE:-0.5,0.7,0.9} --batches ${BATCHES:-1,8,32,64} --ks ${KS:-2,3,4} \
  ${PROFILE_STEPS:+--profile-steps $PROFILE_STEPS} ${PHASE_TIMES:+--phase-times} ${STEADY:+--steady $STEADY} ${KERNELS:+--kernels "$KERNELS"} --out "$OUT/spec-draft-gpu.json" 2>&1 | grep -vE "^\s*$|Warning|warn\(" | tee -a "$OUT/run.log" | tail -120
