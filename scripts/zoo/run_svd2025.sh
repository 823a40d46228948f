#!/usr/bin/env bash
# Issue 27 on the full-fine-tune zoo: the SVD merges (TSV-M, Iso-C, Iso-CTS, WUDI) against task
# arithmetic, TIES and DivMerge-JS layer on plain / TIES / TSV-processed task vectors, at one epoch
# and with `epochs: auto`, k = 2..5 over every subset, in two lanes of one torch thread each.
# Resumable across machines: the committed results (docs/results/svd2025/) are copied back first
# (report.py --restore: only onto a zoo whose weights hash to that folder's zoo.json), then finished
# cells are skipped. The one k = 5 subset first, then pairs, then k = 3 and 4; WUDI (300 Adam steps
# over every matrix, 20-30 min a cell on one core) runs in lane B beside the rest.
# With --lora the same grid on the LoRA zoo (ZOO_DIR/lora/, built with
# scripts/zoo/build_experts.py ZOO_DIR --lora-rank 16 --lr 1e-3 --steps 100): svd2025_lora_*;
# and, when ZOO_DIR/lora_distinct/ is built (the same with --distinct-init), its k = 5 control.
#   scripts/zoo/run_svd2025.sh ZOO_DIR [--lora]
set -euo pipefail
. "$(dirname "$0")/lanes.sh" "$1"
Z=svd2025
if [ "${2:-}" = --lora ]; then
  Z=svd2025_lora
  if [ ! -d "$ZOO/lora" ]; then
    echo "$ZOO/lora: no LoRA zoo; build it with scripts/zoo/build_experts.py $ZOO --lora-rank 16 --lr 1e-3 --steps 100" >&2
    exit 2
  fi
fi
OUT="$REPO/docs/results/svd2025"
if [ -f "$OUT/zoo.json" ]; then
  python "$REPO/scripts/zoo/report.py" "$ZOO" --restore --out "$OUT"
fi
DATA_FREE=(--method task_arithmetic --method ties --method tsv --method iso_c --method iso_cts)
LEARNED=(--method divmerge_js_layer --method divmerge_ties_js_layer --method divmerge_tsv_js_layer)
(
  sweep ${Z}_k5 "${DATA_FREE[@]}"
  sweep ${Z}_k5 "${LEARNED[@]}"
  sweep ${Z}_k2 "${DATA_FREE[@]}"
  sweep ${Z}_k2 "${LEARNED[@]}"
  sweep ${Z}_k3
  sweep ${Z}_k4
  sweep ${Z}_auto_k2
  sweep ${Z}_auto_k3
) &
A=$!
(
  sweep ${Z}_wudi_k5
  sweep ${Z}_auto_k5
  sweep ${Z}_wudi_k2
  sweep ${Z}_auto_k4
  sweep ${Z}_wudi_k3
  sweep ${Z}_wudi_k4
  if [ "$Z" = svd2025_lora ] && [ -d "$ZOO/lora_distinct" ]; then sweep svd2025_lora_distinct_k5; fi
) &
B=$!
wait_lanes "$A" "$B"
python "$REPO/scripts/zoo/report.py" "$ZOO" --svd2025 --out "$OUT"
