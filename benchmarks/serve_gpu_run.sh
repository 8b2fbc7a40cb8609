#!/usr/bin/env bash
# Issue 15 on the lent GPU machine: the serving path against the in-process engine. One call per PART:
#   PART=overhead  (1 GPU)  closed loop at 16/64/128/256 streams, through Serve's Python proxy, then
#                           through HAProxy (serve.ingress: haproxy); each beside the in-process engine;
#                           FRONTENDS="1 3" runs HAProxy with each serve.frontend_processes in turn
#   PART=scale     (2 GPUs) a 400-request burst on 2 replicas behind HAProxy beside one in-process engine
#                           (FRONTENDS=2: two frontend processes a replica);
#                           then one tensor-parallel (TP=2) replica served by `fuserve serve`, answering
#   PART=routers   (2 GPUs) issue 16: 2 replicas behind HAProxy, pow2 vs length_aware vs prefix_affinity
#                           on the mix, heavy-tailed and multi-turn workloads, each in a burst and then
#                           at 80% of the rate pow2 completed in that burst; the simulator's prediction
#                           (with the replicas' measured step cost) in each row's sim_* fields
#   device run: PART=overhead bash benchmarks/serve_gpu_run.sh        (carry: [".whl"])
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# installed once per call: side_by_side_gpu_run.sh installs them before starting its jobs
. "$(dirname "$0")/device_site.sh" || exit 1
export PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# ROUTERS_PER_NODE: Serve's body-aware router replicas per node (each answers HAProxy's routing calls
# one at a time; a burst queues behind them)
HAPROXY=(env RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1
         RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2
         RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE=${ROUTERS_PER_NODE:-4})
MODEL=configs/llama3-8b-dummy.yaml
RPC=${RPC:-4}  # requests per client at each concurrency level

# PROFILE_S=N: py-spy (its wheel carried beside .whl and installed with it) samples the HTTP replica's
# engine core and its frontend for N seconds from the end of the level at PROFILE_AFTER streams (so,
# with LEVELS=128,256, the 256-stream level), as collapsed stacks with thread names under $OUT; then the
# in-process engine's process over its second level.
profile_replica() {
  local log="$OUT/overhead-haproxy.log" front="" pid="" c
  for _ in $(seq 1200); do
    grep -q "http   at concurrency ${PROFILE_AFTER:-128}:" "$log" 2>/dev/null && break
    sleep 0.25
  done
  # the engine core: a spawned child of the Engine replica (the router replica has no such child)
  for c in $(pgrep -f spawn_main); do
    front=$(ps -o ppid= -p "$c" | tr -d ' ')
    tr '\0' ' ' < "/proc/$front/cmdline" | grep -q "ServeReplica:bench_overhead:Engine\b" && { pid=$c; break; }
  done
  [ -n "$pid" ] || { echo "profile: no engine core found"; ps -eo pid,ppid,args | grep -E "ray::|spawn" | cut -c1-160; return; }
  echo "profile: frontend $front, engine core $pid"
  py-spy record -p "$pid" -d "$PROFILE_S" -r 200 --threads --nonblocking -f raw -o "$OUT/profile-engine-core.txt" &
  py-spy record -p "$front" -d "$PROFILE_S" -r 200 --threads --nonblocking -f raw -o "$OUT/profile-frontend.txt" &
  wait
  # the same level in the in-process engine, which runs in the benchmark's own process after HTTP
  for _ in $(seq 2400); do grep -q "engine level 1/" "$log" 2>/dev/null && break; sleep 0.25; done
  pid=$(pgrep -f "^python3 benchmarks/bench_serve.py" | head -1)
  py-spy record -p "$pid" -d "$PROFILE_S" -r 200 --threads --nonblocking -f raw -o "$OUT/profile-in-process.txt"
}

# model_config F INGRESS: the config with serve.frontend_processes F and serve.ingress INGRESS, plus SET
# ('{"kernels": {"cuda_graph_max_tokens": 2048}}': merged into the config's sections, an A/B); prints its path
model_config() {
  local cfg=/tmp/model-f$1-$2.yaml
  python3 -c "import json,yaml; c=yaml.safe_load(open('$MODEL')); c['serve']['frontend_processes']=$1; \
c['serve']['ingress']='$2'; [c.setdefault(k, {}).update(v) for k, v in json.loads('${SET:-{\}}').items()]; \
yaml.safe_dump(c, open('$cfg','w'))"
  echo "$cfg"
}

case ${PART:-overhead} in
  both)  # one call on two GPUs: the overhead levels through HAProxy, then the burst on 2 replicas
    INGRESSES=haproxy PART=overhead bash "$0"; TP2=0 PART=scale bash "$0" ;;
  overhead)
    [ -n "${PROFILE_S:-}" ] && profile_replica > "$OUT/profile.log" 2>&1 &
    # FRONTENDS="1 3": serve.frontend_processes per run, each beside its own in-process engine (haproxy only)
    for ingress in ${INGRESSES:-haproxy python}; do
      for f in ${FRONTENDS:-1}; do
        run=(); [ "$ingress" = haproxy ] && run=("${HAPROXY[@]}")
        cfg=$MODEL tag=$ingress
        if [ "$f" != 1 ] || [ -n "${SET:-}" ]; then
          cfg=$(model_config "$f" "$ingress") tag=$ingress-f$f
        fi
        timeout ${LEVEL_TIMEOUT:-280} "${run[@]}" python3 benchmarks/bench_serve.py --config $cfg \
          --compare overhead --concurrency ${LEVELS:-16,64,128,256} --requests-per-client $RPC --scale 1 \
          --out "$OUT/serve-overhead-$tag.json" 2>&1 | tee "$OUT/overhead-$tag.log" | tail -32
      done
    done ;;
  routers)
    timeout ${ROUTERS_TIMEOUT:-570} "${HAPROXY[@]}" python3 benchmarks/bench_serve.py --config $MODEL \
      --compare routers --routers ${ROUTERS:-pow2,length_aware,prefix_affinity} \
      --workloads ${WORKLOADS:-mix,heavy_tail,multi_turn} \
      --load 0.8 --num-requests ${ROUTER_REQUESTS:-300} ${LOAD_REQUESTS:+--load-requests $LOAD_REQUESTS} \
      --scale 1 --think-s ${THINK_S:-0.2,0.6} \
      --out "$OUT/serve-routers-haproxy.json" 2>&1 | tee "$OUT/routers.log" | tail -45 ;;
  scale)
    # FRONTENDS=2: each replica with two frontend processes (as the GPU example configs)
    cfg=$MODEL; [ "${FRONTENDS:-1}" != 1 ] && cfg=$(model_config "$FRONTENDS" haproxy)
    timeout 330 "${HAPROXY[@]}" python3 benchmarks/bench_serve.py --config $cfg --compare routers \
      --routers length_aware --rate inf --num-requests ${BURST:-400} --scale 1 --engine-baseline \
      --workloads ${SCALE_WORKLOAD:-mix} \
      --out "$OUT/serve-2replicas-haproxy.json" 2>&1 | tee "$OUT/scale.log" | tail -25
    [ "${TP2:-1}" = 1 ] || exit 0
    # One TP=2 replica (both GPUs) through `fuserve serve`, and a real request (issue 14, item 6).
    python3 - <<'PY'
import yaml
c = yaml.safe_load(open("configs/llama3-8b-dummy.yaml"))
c["parallel"] = {"tensor_parallel_size": 2}
c["serve"] = {"port": 8011, "grpc_port": 9011, "num_cpus_per_replica": 2}
yaml.safe_dump(c, open("/tmp/tp2-dummy.yaml", "w"))
PY
    (timeout 200 python3 -m fuserve.cli serve /tmp/tp2-dummy.yaml > "$OUT/tp2-serve.log" 2>&1 &)
    for _ in $(seq 150); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
    curl -s localhost:8011/health | tee "$OUT/tp2-health.json"; echo
    curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": [128000, 791, 6864, 315, 9822, 374], "max_tokens": 16, "temperature": 0, "ignore_eos": true}' \
      | tee "$OUT/tp2-answer.json"; echo
    pkill -TERM -f "fuserve.cli serve /tmp/tp2-dummy.yaml"; sleep 15; tail -5 "$OUT/tp2-serve.log" ;;
esac
