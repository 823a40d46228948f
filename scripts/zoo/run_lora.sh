#!/usr/bin/env bash
# The LoRA zoo's sweeps (docs/zoo/sweeps/lora_*.yaml) and PEFT's combinations of the same
# adapters (peft_merges.py), in two lanes of one torch thread each; resumable: rerun after an
# interruption and finished cells are skipped. Logs in ZOO_DIR/logs/. Needs ZOO_DIR/lora/ (build
# with scripts/zoo/build_experts.py ZOO_DIR --lora-rank 16 --lr 1e-3 --steps 100).
#   scripts/zoo/run_lora.sh ZOO_DIR
set -euo pipefail
ZOO=$(realpath "$1")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$ZOO/logs"
sweep() { divmerge sweep "$ZOO/sweeps/$1.yaml" --cache-dir "$ZOO/cache" >>"$ZOO/logs/sweep_$1.log" 2>&1; }
peft() { python "$REPO/scripts/zoo/peft_merges.py" "$ZOO/sweeps/$1.yaml" >>"$ZOO/logs/peft_$1.log" 2>&1; }
(
  sweep lora_k5
  peft lora_k5
  sweep lora_pairwise_datafree
  sweep lora_pairwise_adamerging
) &
A=$!
(
  sweep lora_pairwise_divmerge
  peft lora_pairwise_divmerge
) &
B=$!
failed=0
wait "$A" || failed=1
wait "$B" || failed=1
if [ "$failed" != 0 ]; then echo "a lane failed (see $ZOO/logs/); no report written" >&2; exit 1; fi
python "$REPO/scripts/zoo/report.py" "$ZOO" --lora --out "$REPO/docs/results/lora" --full "$REPO/docs/results"
