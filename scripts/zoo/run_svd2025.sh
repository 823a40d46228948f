#!/usr/bin/env bash
# Issue 27 on the full-fine-tune zoo: the SVD merges (TSV-M, Iso-C, Iso-CTS, WUDI) against task
# arithmetic, TIES and DivMerge-JS layer on plain / TIES / TSV-processed task vectors, at one epoch
# and with `epochs: auto`, k = 2..5 over every subset, in two lanes of one torch thread each.
# Resumable across machines: the committed results are copied back first (report.py --restore,
# only onto the same weights), then the cells earlier sweeps share are reused, and finished cells
# are skipped. Cheapest and most telling cells first; WUDI (300 Adam steps over every matrix,
# ~45 min a cell on one core) has a lane of its own until its k = 5 cell is done.
#   scripts/zoo/run_svd2025.sh ZOO_DIR
set -euo pipefail
. "$(dirname "$0")/lanes.sh" "$1"
python "$REPO/scripts/zoo/report.py" "$ZOO" --restore --out "$REPO/docs/results"
reuse() {  # reuse NAME SOURCE...: cells of earlier sweeps (same labels and parameters)
  flock "$ZOO/logs/.sweep_$1.lock" python "$REPO/scripts/zoo/reuse_cells.py" "$ZOO/sweeps/$1.yaml" \
    "${@:2}" >>"$ZOO/logs/sweep_$1.log" 2>&1
}
R="$ZOO/results"
reuse svd2025_k2 "$R/pairwise_datafree.jsonl" "$R/pairwise_divmerge_js.jsonl" "$R/remark3_pairwise.jsonl"
reuse svd2025_k3 "$R/stability_k3.jsonl"
reuse svd2025_k4 "$R/per_k4.jsonl" "$R/remark3_k4.jsonl"
reuse svd2025_k5 "$R/per_k5.jsonl" "$R/remark3_k5.jsonl"
SVD=(--method tsv --method iso_c --method iso_cts)
FIXED=(--method task_arithmetic --method ties --method divmerge_js_layer --method divmerge_ties_js_layer)
(
  sweep svd2025_k2 "${SVD[@]}"
  sweep svd2025_k5 "${SVD[@]}" --method divmerge_tsv_js_layer
  sweep svd2025_k2 --method divmerge_tsv_js_layer
  sweep svd2025_k3 "${SVD[@]}"
  sweep svd2025_k4 "${SVD[@]}" "${FIXED[@]}"
  sweep svd2025_k3 --method divmerge_tsv_js_layer
  sweep svd2025_k4 --method divmerge_tsv_js_layer
  sweep svd2025_auto_k2
  sweep svd2025_auto_k3
) &
A=$!
(
  sweep svd2025_k5 --method wudi
  sweep svd2025_auto_k5
  sweep svd2025_auto_k4
  sweep svd2025_k2 --method wudi
  sweep svd2025_k3 --method wudi
  sweep svd2025_k4 --method wudi
) &
B=$!
wait_lanes "$A" "$B"
python "$REPO/scripts/zoo/report.py" "$ZOO" --out "$REPO/docs/results"
