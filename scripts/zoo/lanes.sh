# Sourced by run_*.sh (`. lanes.sh ZOO_DIR`): the zoo folder, one torch thread per lane (a 2-core
# machine), logs in ZOO_DIR/logs/, the two kinds of job and the wait for the lanes.
ZOO=$(realpath "$1")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)  # this file's checkout, whoever sources it
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$ZOO/logs"
# sweep NAME [--method LABEL ...]: one sweep file at a time (a lock per file), so two lanes may
# each run some of one file's methods without interleaving writes to its results
sweep() {
  flock "$ZOO/logs/.sweep_$1.lock" divmerge sweep "$ZOO/sweeps/$1.yaml" --cache-dir "$ZOO/cache" \
    "${@:2}" >>"$ZOO/logs/sweep_$1.log" 2>&1
}
peft() { python "$REPO/scripts/zoo/peft_merges.py" "$ZOO/sweeps/$1.yaml" >>"$ZOO/logs/peft_$1.log" 2>&1; }
# wait_lanes PID...: every lane, then stop (no report) if one failed
wait_lanes() {
  local pid failed=0
  for pid in "$@"; do wait "$pid" || failed=1; done
  if [ "$failed" != 0 ]; then echo "a lane failed (see $ZOO/logs/); no report written" >&2; exit 1; fi
}
