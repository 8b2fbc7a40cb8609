#!/usr/bin/env bash
# Independent one- or two-GPU runs side by side on a multi-GPU machine, each on its own GPUs: device time
# is the time a machine is held, so four one-GPU benchmarks on an x4 machine cost what one does. Each
# argument is a job, "GPUS NAME COMMAND...", e.g.
#   bash benchmarks/side_by_side_gpu_run.sh "0 guided BENCH=guided SKIP_TESTS=1 bash benchmarks/gpu_run.sh" \
#                                           "1 quant BENCH=quant SKIP_TESTS=1 bash benchmarks/gpu_run.sh"
# A job sees only its GPUs (CUDA_VISIBLE_DEVICES), writes under $OUT/NAME with its log, and is killed at
# JOB_TIMEOUT_S; each job's folder comes back as one $OUT/NAME.tgz (the device returns at most 8 files).
# The jobs share the host's CPUs: rows measured this way say so (side_by_side).
#   device run: bash benchmarks/side_by_side_gpu_run.sh "..." "..."     (carry: [".whl", ".carry"])
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
. "$(dirname "$0")/device_site.sh" || exit 1
export PATH=/tmp/site/bin:$PATH FUSERVE_SIDE_BY_SIDE=$#
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ echo "commit $FUSERVE_COMMIT, $# jobs"; date -u; nvidia-smi --query-gpu=index,name,memory.total --format=csv; } \
  | tee "$OUT/side_by_side.log"
pids=()
for job in "$@"; do
  read -r gpus name cmd <<< "$job"
  root=$OUT; mkdir -p "$root/$name"
  ( export CUDA_VISIBLE_DEVICES=$gpus OUT=$root/$name
    start=$SECONDS
    timeout "${JOB_TIMEOUT_S:-560}" bash -c "$cmd" > "$root/$name/job.log" 2>&1
    echo "job $name on GPU $gpus: exit $? after $(( SECONDS - start )) s" | tee -a "$root/side_by_side.log" ) &
  pids+=($!)
done
wait "${pids[@]}"
for job in "$@"; do
  read -r _ name _ <<< "$job"
  echo "=== $name"; grep -v -i "warn" "$OUT/$name/job.log" | tail -"${TAIL_LINES:-14}"
  tar czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
done
