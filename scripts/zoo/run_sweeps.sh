#!/usr/bin/env bash
# Table 2 and every zoo sweep, in two lanes of one torch thread each (a 2-core machine); resumable:
# rerun after an interruption and finished cells are skipped. Logs in ZOO_DIR/logs/.
#   scripts/zoo/run_sweeps.sh ZOO_DIR
set -euo pipefail
. "$(dirname "$0")/lanes.sh" "$1"
(
  python "$REPO/scripts/zoo/table2.py" "$ZOO" --out "$REPO/docs/results/table2" >"$ZOO/logs/table2.log" 2>&1
  sweep pairwise_divmerge_js
  sweep per_k5
  sweep lr_k5
  sweep per_k3
  sweep pairwise_divmerge_kl
  sweep epochs4_k5_divmerge
) &
A=$!
(
  sweep pairwise_datafree
  sweep pairwise_adamerging
  sweep per_k4
  sweep epochs4_k5_adamerging
) &
B=$!
wait_lanes "$A" "$B"
python "$REPO/scripts/zoo/report.py" "$ZOO" --out "$REPO/docs/results"
