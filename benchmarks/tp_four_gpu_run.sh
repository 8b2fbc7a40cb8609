#!/usr/bin/env bash
# Issue 22 on a four-GPU machine (nvidia-h200-x4 or nvidia-h100-x4), everything under $OUT, one call per PART:
#   PART=bench  the all-reduce alone at TP=4 with Llama-3-70B's message sizes (hidden 8192: batch 1 = 16 KiB
#               ... batch 256 = 4 MiB): NCCL vs the engine's one-shot vs one-shot at any size vs torch's
#               two-shot, eager and in a CUDA graph; then the 70B shape at TP=4 (auto = one-shot, and NCCL
#               only), batch 1 and 64, against its floor (weights per GPU / the copy bandwidth measured)
#   PART=serve  one TP=4 replica of the 70B shape (dummy weights) through `fuserve serve`: a request, then
#               closed-loop load at 16 and 64 streams through HTTP (bench_serve --url)
#   device run: PART=bench bash benchmarks/tp_four_gpu_run.sh    (kind nvidia-h200-x4, carry [".whl"])
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-560}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
# installed once per call: PART=bench runs PART=serve through this script again
. "$(dirname "$0")/device_site.sh" || exit 1
export PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TP=${TP:-4}
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
{ echo "commit $FUSERVE_COMMIT part ${PART:-bench} tp $TP"; date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv; nvidia-smi topo -m; } 2>&1 | tee "$OUT/run.log"

case ${PART:-bench} in
  bench)
    # A rank stuck in a collective dumps its stack and exits (the first call of 2026-11-26 waited silently
    # for 540 s in the all-reduce part, the symmetric-memory ops new then the suspects): the NCCL and
    # one-shot rows first, the engines, then torch's symmetric-memory ops alone in the time left.
    collectives() {  # $1: FUSERVE_BENCH_SYMM_OPS, $2: name
      FUSERVE_BENCH_SYMM_OPS=$1 FUSERVE_COLLECTIVES_TIMEOUT_S=${COLLECTIVES_TIMEOUT_S:-100} timeout 120 \
        python3 benchmarks/bench_tp.py --model llama3-70b --tp "$TP" --engines "" \
        --collective-batches 16,32,128,256 --out "$OUT/tp$TP-70b-$2.json" > "$OUT/tp$TP-$2.log" 2>&1
      echo "collectives $2: exit $? at $(( SECONDS - START )) s" | tee -a "$OUT/run.log"
      grep -v "^{" "$OUT/tp$TP-$2.log" | grep -v -i warn | tail -40
    }
    collectives 1 collectives
    timeout $(( $(left) - 10 )) python3 benchmarks/bench_tp.py --model llama3-70b --tp "$TP" --skip-collectives \
      --engines "${ENGINES:-auto,nccl}" --gpu-memory-utilization 0.9 \
      --engine-timeout-s 260 --budget-s $(( $(left) - 150 )) --out "$OUT/tp$TP-70b.json" 2>&1 \
      | tee "$OUT/tp$TP-70b.log" | grep -v "^{" | tail -30
    [ "$(left)" -gt 120 ] && MODEL_SHAPE=8b PART=serve BUDGET_S=$(( $(left) - 5 )) bash "$0" ;;
  serve)
    python3 - <<PY
import yaml
c = yaml.safe_load(open("configs/llama3-8b-dummy.yaml"))
if "${MODEL_SHAPE:-70b}" == "70b":
    c["model"]["name"] = "llama3-70b-dummy"
    c["model"]["hf_config"].update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8)
c["cache"]["gpu_memory_utilization"] = 0.85
c["parallel"] = {"tensor_parallel_size": $TP, "init_timeout_s": 300}
c["serve"] = {"port": 8011, "grpc_port": 9011, "num_cpus_per_replica": $TP}
yaml.safe_dump(c, open("/tmp/tp-serve.yaml", "w"))
PY
    (timeout $(( $(left) - 20 )) python3 -m fuserve.cli serve /tmp/tp-serve.yaml > "$OUT/tp$TP-serve.log" 2>&1 &)
    t0=$SECONDS
    for _ in $(seq 300); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
    echo "healthy after $(( SECONDS - t0 )) s" | tee -a "$OUT/run.log"
    curl -s localhost:8011/health | tee "$OUT/tp$TP-health.json"; echo
    curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": [128000, 791, 6864, 315, 9822, 374], "max_tokens": 16, "temperature": 0, "ignore_eos": true}' \
      | tee "$OUT/tp$TP-answer.json"; echo
    timeout $(( $(left) - 40 )) python3 benchmarks/bench_serve.py --config /tmp/tp-serve.yaml --url http://127.0.0.1:8011 \
      --compare none --concurrency ${LEVELS:-16,64} --requests-per-client 2 --scale 0.5 \
      --out "$OUT/serve-tp$TP-${MODEL_SHAPE:-70b}.json" 2>&1 | tee "$OUT/tp$TP-load.log" | tail -20
    curl -s localhost:8011/metrics | grep -E "^fuserve_(requests|generation_tokens|time_to_first)" | head -20 > "$OUT/tp$TP-metrics.txt"
    pkill -TERM -f "fuserve.cli serve /tmp/tp-serve.yaml"; sleep 10; tail -5 "$OUT/tp$TP-serve.log" ;;
esac
bash "$(dirname "$0")/collect_give_ups.sh" "$OUT"  # the workers' give-up records
echo "done in $(( SECONDS - START )) s" | tee -a "$OUT/run.log"
