#!/usr/bin/env bash
# Issue 14's two-GPU run: one call of under ~550 s on nvidia-h200-x2, everything under $OUT.
#   PART=8b (default)  the gpu-marked tests of tests/test_tensor_parallel.py three times, each test under a
#                      per-test timeout (a hang dumps every thread's stack and fails that test), then
#                      bench_tp.py: the all-reduce alone (NCCL vs one-shot vs fused) and the Llama-3-8B
#                      engines of $ENGINES_8B in order, batch 1 and 64, as many as the time left allows.
#                      Measured on two H200s (2026-11-26): a cold test run takes ~260 s, so three runs and
#                      the benchmarks do not fit one call: PART=tests runs only the tests, PART=bench8b
#                      only the benchmarks; PART=tests+bench8b RUNS=1 one test run, then the benchmarks
#   PART=70b           the 8B baseline of the same machine ($ENGINES_8B_BASE: TP=1 and TP=2 one-shot), then
#                      the Llama-3-70B shape at TP=2 (70.6 GB of weights per GPU: fits an H100 80GB at
#                      --gpu-memory-utilization 0.9, ran there 2026-11-26), batch 1 and
#                      64, against its floor (weights per GPU / the copy bandwidth measured in the run);
#                      then the 8B engines of $ENGINES_8B, if any, in the time left
#   STRESS_S=N         first the fused all-reduce's stress for N seconds (stress_push_all_reduce.py)
#   PAIRS=2            (four GPUs) the tests on GPUs 0,1 and 2,3 at once, RUNS each
#   TESTS_K=EXPR       only the tests pytest's -k selects (e.g. TESTS_K=llama3_8b_shape)
#   device run: bash benchmarks/tp_two_gpu_run.sh          (kind nvidia-h200-x2, carry [".whl"])
#   WHEELS=DIR: another wheel folder than .whl (carry it instead); since device_wheelhouse.sh recompresses
#                      every large wheel and strips ray's binaries (2026-11-28) the whole .whl fits beside
#                      the tree (61.8 of 67.1 MB)
#   engine names: bench_tp.py's EngineSpec (tp1, nccl, auto; +no-keyed, +gloo-plans, +l2=MB)
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-540}  # the whole call, install included
PART=${PART:-8b}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
. "$(dirname "$0")/device_site.sh" || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/run.log"
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
{ echo "commit $FUSERVE_COMMIT part $PART"; date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv
  nvidia-smi topo -m; } 2>&1 | tee "$LOG"

# STRESS_S=60: first the fused all-reduce called for that long on GPUs 0 and 1, every call checked
# (stress_push_all_reduce.py; on 2026-11-28 ~1% of its 128-row calls summed wrong before the call-count
# fix, all_reduce_rmsnorm.next_call_count)
if [ -n "${STRESS_S:-}" ]; then
  timeout $(( STRESS_S + 90 )) python3 benchmarks/stress_push_all_reduce.py --seconds "$STRESS_S" --out "$OUT" 2>&1 \
    | grep -v -i warn | tail -3 | tee -a "$LOG"
fi
if [ "$PART" = 8b ] || [ "$PART" = tests ] || [ "$PART" = tests+bench8b ]; then
  # a test's own bound (--timeout, pytest-timeout, on the GPU machine only) and the compare_greedy child's
  # (it dumps its stacks and exits first); the 3 GB test checkpoint is cached between the runs
  if python3 -c "import pytest_timeout" 2>/dev/null; then PER_TEST="--timeout=${TEST_TIMEOUT:-300}"  # autoloaded
  else PER_TEST="-o faulthandler_timeout=${TEST_TIMEOUT:-300}"; fi
  export FUSERVE_GPU_CHECK_TIMEOUT_S=$(( ${TEST_TIMEOUT:-300} - 30 ))
  test_runs() {  # $1: the pair's name; its GPUs come in CUDA_VISIBLE_DEVICES
    for i in $(seq 1 "${RUNS:-3}"); do
      [ "$(left)" -gt "${RUN_MIN_S:-330}" ] || { echo "pair $1 test run $i skipped: $(left) s left" | tee -a "$LOG"; continue; }
      t0=$SECONDS
      # SIGINT, not SIGTERM, at the call's end: pytest then prints the failures it has so far (2026-11-27's
      # second run failed a test and was cut before its traceback was printed)
      timeout -s INT -k 15 $(( $(left) - 35 )) python3 -m pytest -v -m gpu tests/test_tensor_parallel.py $PER_TEST \
        ${TESTS_K:+-k "$TESTS_K"} \
        --durations=0 -rA -o cache_dir=/tmp/pytest-cache-$1 --basetemp=/tmp/pytest-$1 -W ignore::DeprecationWarning 2>&1 \
        | tee "$OUT/tp-tests-$1-$i.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout" | tail -8
      echo "pair $1 (GPUs $CUDA_VISIBLE_DEVICES) test run $i: exit ${PIPESTATUS[0]} in $(( SECONDS - t0 )) s" | tee -a "$LOG"
    done
  }
  # which processes hold each GPU, every 10 s: a process left waiting for a dead peer shows here
  ( while sleep 10; do echo "$(( SECONDS - START )) s: $(nvidia-smi --query-compute-apps=gpu_bus_id,pid,used_memory \
      --format=csv,noheader | tr '\n' ';')"; done > "$OUT/gpu-apps.log" 2>&1 ) &
  MONITOR=$!
  # PAIRS=2 on a four-GPU machine: two independent pairs (own Ray instance, store and temp dirs) at once
  for pair in $(seq 0 $(( ${PAIRS:-1} - 1 ))); do
    CUDA_VISIBLE_DEVICES=$(( 2 * pair )),$(( 2 * pair + 1 )) test_runs "p$pair" &
  done
  wait $(jobs -p | grep -vx "$MONITOR")
  kill "$MONITOR" 2>/dev/null
fi
# PYSPY=1 (py-spy's wheel copied into the wheel folder, installed with it): every engine process of
# bench_tp (rank 0) and every TP worker actor (ranks >= 1) is sampled at 250 Hz with all its threads, as
# a speedscope timeline (samples in order) under $OUT/pyspy-<pid>-<name>.json, its start time (epoch s)
# in pyspy-start.log: to line a TP=2 run's stalls (its step_ms, started_at) up with what each rank ran;
# PYSPY_IDLE=1 samples the waits too (without it a stalled wait leaves no samples)
profile_ranks() {
  local seen=" " pid name
  while sleep 0.5; do
    for pid in $(pgrep -f "multiprocessing.spawn|ray::TPWorker"); do
      case "$seen" in *" $pid "*) continue ;; esac
      seen="$seen$pid "
      name=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q TPWorker && echo rank1 || echo rank0)
      echo "$pid $name $(date +%s.%N)" >> "$OUT/pyspy-start.log"
      py-spy record -p "$pid" -r 250 --threads --nonblocking ${PYSPY_IDLE:+--idle} -f speedscope \
        -o "$OUT/pyspy-$pid-$name.json" > /dev/null 2>&1 &
    done
  done
}
if [ "$PART" = 8b ] || [ "$PART" = bench8b ] || [ "$PART" = tests+bench8b ]; then
  ENGINES=${ENGINES_8B:-tp1,auto,nccl,auto+l2=0}
  if [ "${PYSPY:-0}" = 1 ]; then export PATH=/tmp/site/bin:$PATH; profile_ranks & PROFILER=$!; fi
  # the GPUs' clocks, power and throttle reasons every 100 ms, to set beside each run's step_ms/started_at
  nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader -lms 100 > "$OUT/gpu-clocks.log" 2>&1 &
  CLOCKS=$!
  timeout $(( $(left) > 30 ? $(left) : 30 )) python3 benchmarks/bench_tp.py --engines "$ENGINES" ${TP_8B_ARGS:-} \
    --budget-s $(( $(left) - 15 )) --out "$OUT/tp-8b.json" 2>&1 | tee "$OUT/tp-8b.log" | tail -40
  kill "$CLOCKS" 2>/dev/null
  if [ -n "${PROFILER:-}" ]; then  # each py-spy writes its file as its process ends (with --idle, seconds later)
    kill "$PROFILER"
    for _ in $(seq 60); do pgrep -f "py-spy record" > /dev/null || break; sleep 1; done
    # one archive: the device returns a few files a call, and a profile of each engine's ranks is many
    (cd "$OUT" && tar czf pyspy.tgz pyspy-*.json pyspy-start.log && rm -f pyspy-*.json pyspy-start.log)
  fi
fi
if [ "$PART" = 70b ]; then
  timeout $(( $(left) - 30 )) python3 benchmarks/bench_tp.py --engines "${ENGINES_8B_BASE:-tp1,auto}" --skip-collectives \
    --out "$OUT/tp-8b-base.json" 2>&1 | tee "$OUT/tp-8b-base.log" | tail -8
  timeout $(( $(left) - 30 )) python3 benchmarks/bench_tp.py --model llama3-70b --engines auto --skip-collectives \
    --gpu-memory-utilization 0.9 --engine-timeout-s 400 --out "$OUT/tp-70b.json" 2>&1 | tee "$OUT/tp-70b.log" | tail -12
  if [ -n "${ENGINES_8B:-}" ] && [ "$(left)" -gt 90 ]; then
    timeout $(( $(left) - 10 )) python3 benchmarks/bench_tp.py --engines "$ENGINES_8B" ${TP_8B_ARGS:---skip-collectives} \
      --budget-s $(( $(left) - 20 )) --out "$OUT/tp-8b-more.json" 2>&1 | tee "$OUT/tp-8b-more.log" | tail -25
  fi
fi
bash "$(dirname "$0")/collect_give_ups.sh" "$OUT"  # the workers' give-up records
echo "done in $(( SECONDS - START )) s" | tee -a "$LOG"
# the logs as one archive: a call brings back only so many files (2026-11-28: the ninth, a test run's
# log, did not come back), and the run's own log and results stay beside it as plain files
(cd "$OUT" && logs=$(ls tp-tests-*.log gpu-apps.log gpu-clocks.log give-ups.log 2>/dev/null || true) \
  && [ -n "$logs" ] && tar czf logs.tgz $logs && rm -f $logs)
