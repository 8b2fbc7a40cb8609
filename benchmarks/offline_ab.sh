#!/usr/bin/env bash
# The offline throughput benchmark as an A/B on one GPU, the two sides alternating on one machine.
#
# Why: identical engines spread 20.8-25.1k output tok/s between machines and runs (benchmarks/NOTES.md,
# "Is the offline run host-bound where it is slow?"), so a change is judged only against itself on the
# same machine, several runs a side, in the order A B B A A B (a drift over the call then falls on
# both sides alike).
#   B: the tree as carried.  A: the same tree with PATCH undone (`patch -R`), i.e. before the change.
#
#   here:   mkdir -p .ab && git diff OLD HEAD -- fuserve > .ab/change.patch      (.ab is git-excluded)
#   device: PATCH=.ab/change.patch bash benchmarks/offline_ab.sh    (nvidia-h100-x1, carry [".whl", ".ab"])
#   RUNS=3 (a side)  ARGS="--shapes 128/128 --schemes fp8 --kv-cache-dtype fp8"  BUDGET_S=570
#   RUN_MIN_S=80 (a run is skipped with less time left: one takes ~60-80 s, engine build included)
# Writes $OUT/offline-ab.json: every run's rows with `variant` (A or B) and `run` (its place in the
# order), then prints each side's output tok/s.
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
: "${PATCH:?set PATCH to the change to undo for side A (git diff OLD HEAD -- fuserve > .ab/change.patch)}"
ARGS=${ARGS:---shapes 128/128 --schemes fp8 --kv-cache-dtype fp8}
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/device_site.sh" || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/runs"
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
patch -s -p1 -R --dry-run < "$PATCH" || { echo "$PATCH does not undo cleanly on this tree"; exit 1; }

order=""
for i in $(seq 1 "${RUNS:-3}"); do
  if [ $(( i % 2 )) -eq 1 ]; then order="$order A B"; else order="$order B A"; fi
done
n=0
for side in $order; do
  n=$(( n + 1 ))
  [ "$(left)" -gt "${RUN_MIN_S:-80}" ] || { echo "run $n ($side) skipped: $(left) s left"; continue; }
  [ "$side" = A ] && patch -s -p1 -R < "$PATCH"
  timeout $(( $(left) - 10 )) python3 benchmarks/bench_throughput.py $ARGS --out "$OUT/runs/$n-$side.json" 2>&1 \
    | grep -E "^(fp8|none|int8|fp8-wo|int8-wo) " | sed "s/^/run $n $side: /"
  [ "$side" = A ] && patch -s -p1 < "$PATCH"
done

python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "runs", "*.json")), key=lambda p: int(os.path.basename(p).split("-")[0])):
    run, side = os.path.basename(path)[:-5].split("-")
    for row in json.load(open(path)):
        rows.append({**row, "variant": side, "run": int(run)})
json.dump(rows, open(os.path.join(out, "offline-ab.json"), "w"), indent=1)
def key(r):
    return r["quantization"], r["kv_cache_dtype"], f'{r["input_len"]}/{r["output_len"]}'
for k in sorted({key(r) for r in rows}):
    for side in "AB":
        tok = [round(r["output_tok_s"]) for r in rows if r["variant"] == side and key(r) == k]
        if tok:
            print(f"{side} {' '.join(k)}: {tok} mean {statistics.mean(tok):.0f}")
PY
rm -rf "$OUT/runs"
echo "done in $(( SECONDS - START )) s"
