#!/usr/bin/env bash
# The shipped draft's data and training on the GPU machine (issue 17: ~50x the CPU run's data).
# Calls on one warm machine bring the default model in parts (training/gpu_target.sh); the last generates on
# every GPU (one shard each, GEN_S s), trains on GPU 0 for the time left and exports.
#   a later call (machine still warm, RESUME=1): more training from the checkpoint, then export
# The shipped draft (2026-11-27): nvidia-h100-x4, call 2 `BUDGET_S=505 GEN_S=195 bash training/gpu_distill.sh`
# Under $OUT: draft.safetensors (with its reduced-vocabulary head), draft_training_gpu.json (the curve),
# data_generation_gpu-<shard>.json, run.log.
set -uo pipefail
. training/gpu_target.sh
generate_data
RESUME_ARG=""; [ "${RESUME:-0}" = 1 ] && RESUME_ARG=--resume
TRAIN_S=$(( $(left) - 60 ))
say "training for $TRAIN_S s"
CUDA_VISIBLE_DEVICES=0 timeout $(( TRAIN_S + 50 )) python3 training/train_draft.py --data "$DATA" --device cuda \
  --init target --layers 0,29 --batch ${TRAIN_BATCH:-64} --lr ${LR:-2e-3} --warmup 100 --steps ${STEPS:-100000} \
  --eval-every 250 --time-limit-s ${TOTAL_TRAIN_S:-$TRAIN_S} --clock-schedule --ckpt "$W/ckpt.pt" \
  --ckpt-every-s 60 $RESUME_ARG --curve "$OUT/draft_training_gpu.json" --vocab-size 4096 \
  --export "$OUT/draft.safetensors" 2>&1 | grep -E "val_|sequences|time limit|wrote|Error|error" | tail -40 | tee -a "$LOG"
say "done"
