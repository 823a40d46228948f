#!/usr/bin/env bash
# Issue 16 on the full-fine-tune zoo: Remark 3 (DivMerge on TIES / DARE-TIES-processed task
# vectors) at k = 2..5 and the 32-step check, and every 3-subset for the stability table, in two
# lanes of one torch thread each; resumable (finished cells are skipped). Logs in ZOO_DIR/logs/.
# Layer-level cells first (DivMerge's best granularity), the lanes balanced by measured cell
# times; the stability sweep reuses the k = 3 cells it shares with per_k3 and remark3_k3.
#   scripts/zoo/run_remark3.sh ZOO_DIR
set -euo pipefail
. "$(dirname "$0")/lanes.sh" "$1"
LAYER=(--method divmerge_ties_js_layer --method divmerge_dare_ties_js_layer)
TASK=(--method divmerge_ties_js_task --method divmerge_dare_ties_js_task)
(
  sweep remark3_k5 "${LAYER[@]}"
  sweep remark3_k4 "${LAYER[@]}"
  sweep remark3_k3 "${LAYER[@]}"
  sweep remark3_k3 "${TASK[@]}"
  flock "$ZOO/logs/.sweep_stability_k3.lock" python "$REPO/scripts/zoo/reuse_cells.py" \
    "$ZOO/sweeps/stability_k3.yaml" "$ZOO/results/per_k3.jsonl" "$ZOO/results/remark3_k3.jsonl" \
    >>"$ZOO/logs/sweep_stability_k3.log" 2>&1
  sweep stability_k3
) &
A=$!
(
  sweep remark3_pairwise "${LAYER[@]}"
  sweep remark3_k5 "${TASK[@]}"
  sweep remark3_k4 "${TASK[@]}"
  sweep remark3_k5
  sweep remark3_pairwise "${TASK[@]}"
) &
B=$!
wait_lanes "$A" "$B"
python "$REPO/scripts/zoo/report.py" "$ZOO" --out "$REPO/docs/results"
