#!/usr/bin/env bash
# The feature-reading (EAGLE-1) draft trained on the GPU machine (issue 17): the data of gpu_distill.sh
# (the target's own continuations, generated on every GPU), the target's features from one prefill of each
# sequence on GPU 0, kept there, and train_eagle.py on GPU 0 for the time left; export.
#   calls 1-2 stash the model's first parts (training/gpu_target.sh), call 3 carries
#   [".carry/target/part-c"]: `GEN_S=200 bash training/gpu_eagle.sh`
# More data than one call holds (the twenty-sixth session's run): call 3 with DATA_ONLY=1 GEN_S=480
# TOP_K=0 SEED=1 SI_PER_SHARD=1 SELF_INSTRUCT=20000 only generates; call 4 (same env, no DATA_ONLY) trains.
# Drafts of other shapes, grown from the shipped one (twenty-seventh session): VARIANTS="2x1280 1x3072"
# INIT_FROM=fuserve/speculative/drafts/smollm2-135m-instruct-eagle.safetensors (see the training block).
# Under $OUT: eagle.safetensors, eagle_training_gpu.json (the curve), data_generation_gpu-<shard>.json,
# run.log. Held-out acceptance afterwards on the CPU: training/eval_eagle.py --draft OUT/eagle.safetensors
set -uo pipefail
. training/gpu_target.sh
generate_data
[ -n "${DATA_ONLY:-}" ] && { say "data only: features and training come next call"; exit 0; }
RUN_S=$(( $(left) - 15 ))
# VARIANTS="LAYERSxWIDTH ...", e.g. "2x1280 1x3072": one training process each, side by side on GPU 0 (the
# draft is small: one process leaves the GPU mostly idle), each grown from INIT_FROM and exported with
# int8 layers as eagle-<variant>.safetensors. Unset: one draft of the file's shape, eagle.safetensors.
say "features, then training: $RUN_S s in all; variants: ${VARIANTS:-one}"
train() {  # $1: the variant's suffix; the rest: extra train_eagle.py arguments
  local tag=$1; shift
  CUDA_VISIBLE_DEVICES=0 timeout $(( RUN_S + 10 )) python3 training/train_eagle.py --data "$DATA" \
    --device cuda --feature-batch-tokens 65536 --feature-dtypes ${FEATURE_DTYPES:-float32} --batch-tokens ${BATCH_TOKENS:-16384} --lr ${LR:-1e-3} \
    --warmup 200 --steps ${STEPS:-1000000} --eval-every 500 --max-val 400 --w-cls ${W_CLS:-1.0} \
    ${INIT_FROM:+--init-from $INIT_FROM} --passes ${PASSES:-3} --time-limit-s $RUN_S --budget-s $RUN_S --clock-schedule --ckpt "$W/eagle_ckpt$tag.pt" \
    --curve "$OUT/eagle_training_gpu$tag.json" --export "$OUT/eagle$tag.safetensors" "$@" 2>&1 \
    | grep -E "val_|sequences|features|time limit|Error|error" | tail -40 | sed "s/^/[${tag:-one}] /" | tee -a "$LOG"
}
if [ -z "${VARIANTS:-}" ]; then
  train ""
else
  for v in $VARIANTS; do
    train "-$v" --layers "${v%x*}" --intermediate "${v#*x}" --int8-layers &
  done
  wait
fi
say "done"
