#!/usr/bin/env bash
# Issue 27 on the full-fine-tune zoo: the SVD merges (TSV-M, Iso-C, Iso-CTS, WUDI) against task
# arithmetic, TIES and DivMerge-JS layer on plain / TIES / TSV-processed task vectors, at one epoch
# and with `epochs: auto`, k = 2..5 over every subset, in two lanes of one torch thread each.
# Resumable across machines: the committed results (docs/results/svd2025/) are copied back first
# (report.py --restore: only onto a zoo whose weights hash to that folder's zoo.json), then finished
# cells are skipped. The one k = 5 subset first, then pairs, then k = 3 and 4; WUDI (300 Adam steps
# over every matrix, ~45 min a cell on one core) runs in lane B beside the rest.
#   scripts/zoo/run_svd2025.sh ZOO_DIR
set -euo pipefail
. "$(dirname "$0")/lanes.sh" "$1"
OUT="$REPO/docs/results/svd2025"
if [ -f "$OUT/zoo.json" ]; then
  python "$REPO/scripts/zoo/report.py" "$ZOO" --restore --out "$OUT"
fi
DATA_FREE=(--method task_arithmetic --method ties --method tsv --method iso_c --method iso_cts)
LEARNED=(--method divmerge_js_layer --method divmerge_ties_js_layer --method divmerge_tsv_js_layer)
(
  sweep svd2025_k5 "${DATA_FREE[@]}"
  sweep svd2025_k5 "${LEARNED[@]}"
  sweep svd2025_k2 "${DATA_FREE[@]}"
  sweep svd2025_k2 "${LEARNED[@]}"
  sweep svd2025_k3
  sweep svd2025_k4
  sweep svd2025_auto_k2
  sweep svd2025_auto_k3
) &
A=$!
(
  sweep svd2025_wudi_k5
  sweep svd2025_auto_k5
  sweep svd2025_wudi_k2
  sweep svd2025_auto_k4
  sweep svd2025_wudi_k3
  sweep svd2025_wudi_k4
) &
B=$!
wait_lanes "$A" "$B"
python "$REPO/scripts/zoo/report.py" "$ZOO" --svd2025 --out "$OUT"
