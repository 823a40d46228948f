#!/usr/bin/env bash
# Issue 16 on the full-fine-tune zoo: Remark 3 (DivMerge on TIES / DARE-TIES-processed task
# vectors) at k = 2..5 and the 32-step check, and every 3-subset for the stability table, in two
# lanes of one torch thread each; resumable (finished cells are skipped). Logs in ZOO_DIR/logs/.
#   scripts/zoo/run_remark3.sh ZOO_DIR
set -euo pipefail
ZOO=$(realpath "$1")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$ZOO/logs"
sweep() { divmerge sweep "$ZOO/sweeps/$1.yaml" --cache-dir "$ZOO/cache" >>"$ZOO/logs/sweep_$1.log" 2>&1; }
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
failed=0
wait "$A" || failed=1
wait "$B" || failed=1
if [ "$failed" != 0 ]; then echo "a lane failed (see $ZOO/logs/); no report written" >&2; exit 1; fi
python "$REPO/scripts/zoo/report.py" "$ZOO" --out "$REPO/docs/results"
