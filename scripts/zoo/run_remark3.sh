#!/usr/bin/env bash
# Issue 16 on the full-fine-tune zoo: Remark 3 (DivMerge on TIES / DARE-TIES-processed task
# vectors) at k = 2..5 and the 32-step check, and every 3-subset for the stability table, in two
# lanes of one torch thread each; resumable (finished cells are skipped). Logs in ZOO_DIR/logs/.
#   scripts/zoo/run_remark3.sh ZOO_DIR
set -euo pipefail
. "$(dirname "$0")/lanes.sh" "$1"
(
  sweep remark3_k5
  sweep remark3_k3
  sweep stability_k3
) &
A=$!
(
  sweep remark3_pairwise
  sweep remark3_k4
) &
B=$!
wait_lanes "$A" "$B"
python "$REPO/scripts/zoo/report.py" "$ZOO" --out "$REPO/docs/results"
