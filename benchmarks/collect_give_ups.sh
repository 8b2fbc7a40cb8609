#!/usr/bin/env bash
# The TP workers' own all-reduce give-up records (fuserve/parallel/tp_worker.py logs them) into
# $OUT/give-ups.log, printed when there are any: Ray keeps worker stderr in its session logs, which an
# engine started in a child process (log_to_driver off) does not print.
#   usage: bash benchmarks/collect_give_ups.sh "$OUT"
out=${1:?usage: collect_give_ups.sh OUT_DIR}
grep -h "gave up waiting" /tmp/ray/session_*/logs/*.err /tmp/ray/session_*/logs/*.out 2>/dev/null \
  | sort -u | head -50 > "$out/give-ups.log"
[ -s "$out/give-ups.log" ] && cat "$out/give-ups.log"
exit 0
