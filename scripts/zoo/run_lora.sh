#!/usr/bin/env bash
# The LoRA zoo's sweeps (docs/zoo/sweeps/lora_*.yaml) and PEFT's combinations of the same
# adapters (peft_merges.py), in two lanes of one torch thread each; resumable: rerun after an
# interruption and finished cells are skipped. Logs in ZOO_DIR/logs/. Needs ZOO_DIR/lora/ (build
# with scripts/zoo/build_experts.py ZOO_DIR --lora-rank 16 --lr 1e-3 --steps 100).
#   scripts/zoo/run_lora.sh ZOO_DIR
set -euo pipefail
. "$(dirname "$0")/lanes.sh" "$1"
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
wait_lanes "$A" "$B"
python "$REPO/scripts/zoo/report.py" "$ZOO" --lora --out "$REPO/docs/results/lora" --full "$REPO/docs/results"
