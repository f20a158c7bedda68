#!/usr/bin/env bash
# Issue 5's stage rows at full size (scale 1, 256x128) on one GPU, in two calls of under 10 minutes on the same warm
# machine (the data and the source model stay in $SCRATCH between them):
#
#   PHASE=1 bash bench/full_size_rows.sh   # the domains (synth_msmt, synth_market, synth_duke), the source model
#   PHASE=2 bash bench/full_size_rows.sh   # teachers (tracklets), control, pseudo-labels, oracle; one table
#   TINY=1 PHASE=1 ...; TINY=1 PHASE=2 ... # CPU smoke run of both phases (tiny domains, 64x32, one epoch)
#
# ResNet-18 and the quick preset at 256x128 with 6 source epochs: the setting of the full-size calibration check in
# docs/synthetic.md, whose source model this reproduces. Results: $OUT/rows.md (and the runs' logs, tarred).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/full_size_out}; SCRATCH=${SCRATCH:-/tmp/full_size_scratch}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$OUT" "$SCRATCH/runs"
DATA=$SCRATCH/data; RUNS=$SCRATCH/runs; SRC=synth_msmt
if [ "${TINY:-0}" = 1 ]; then
  SCALE=0.03; SIZE=(--height 64 --width 32); GEN_SIZE=64x32; SRC_EPOCHS=1; EXTRA=(--epochs 1); LIMIT=400
  WAVE_LIMIT=(250 250); export OMP_NUM_THREADS=1  # 2 cores, four runs at a time
else
  SCALE=1; SIZE=(--height 256 --width 128); GEN_SIZE=256x128; SRC_EPOCHS=6; EXTRA=(); LIMIT=360
  WAVE_LIMIT=(${WAVE_A:-200} ${WAVE_B:-200})  # with the start, both calls fit a 15-minute device budget
fi
KDREID=("$PY" -c "import sys; from kdreid.cli import main; sys.exit(main())")
START=$(date +%s); say() { echo "[+$(( $(date +%s) - START ))s] $*"; }

if [ "${PHASE:-1}" = 1 ]; then
  say "writing the domains at scale $SCALE, $GEN_SIZE"
  "${KDREID[@]}" data synth --out "$DATA" --domains $SRC synth_market synth_duke --scale $SCALE --size $GEN_SIZE \
    --workers "$(nproc)" > "$OUT/data.log" 2>&1 || { tail -5 "$OUT/data.log"; exit 1; }
  say "source model ($SRC_EPOCHS epochs)"
  timeout "$LIMIT" "${KDREID[@]}" train-source -s $SRC \
    -t synth_market synth_duke -a resnet18 --root "$DATA" --preset quick --epochs $SRC_EPOCHS "${SIZE[@]}" \
    --out "$RUNS/source" > "$OUT/source.log" 2>&1
  tail -4 "$OUT/source.log"; say "phase 1 done"
  exit 0
fi

[ -f "$RUNS/source/model.pt" ] || { echo "no source model at $RUNS/source/model.pt: run PHASE=1 first"; exit 1; }
# One wave per target, its four runs at once (each is launch-bound at batch 32, so several share the GPU better
# than one after another): a wave cut by its limit leaves the other target's row whole.
declare -A FLAGS=([teacher]="" [control]="--dmmd-weight 0" [pseudo]="--grouping pseudo" [oracle]="--grouping oracle")
wave() {
  local limit=$1 target=$2
  say "wave: $target (limit ${limit}s)"
  for variant in teacher control pseudo oracle; do
    # shellcheck disable=SC2086  # FLAGS values are word lists
    timeout "$limit" "${KDREID[@]}" adapt -s $SRC -t "$target" -a resnet18 --init "$RUNS/source/model.pt" \
      --root "$DATA" --preset quick "${SIZE[@]}" "${EXTRA[@]}" ${FLAGS[$variant]} --out "$RUNS/${variant}_$target" \
      > "$RUNS/${variant}_$target.log" 2>&1 &
  done
  wait
}
wave "${WAVE_LIMIT[0]}" synth_market
wave "${WAVE_LIMIT[1]}" synth_duke
say "adaptation runs done"
$PY - "$RUNS" > "$OUT/rows.md" <<'PYEOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
def cell(folder, target):
    try:
        m = json.loads((runs / folder / "metrics.json").read_text())["final"][target]
        return f"{m['mAP']:.1f} / {m['rank1']:.1f}"
    except (OSError, KeyError, ValueError):
        return "not finished"
print("| target (mAP / rank-1, %) | source only | teacher (tracklets) | control (--dmmd-weight 0) | pseudo-labels | oracle |")
print("|---|---|---|---|---|---|")
for t in ("synth_market", "synth_duke"):
    print(f"| {t} | {cell('source', t)} | " + " | ".join(cell(f"{v}_{t}", t) for v in ("teacher", "control", "pseudo", "oracle")) + " |")
PYEOF
cat "$OUT/rows.md"
tar czf "$OUT/logs.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d *.log */log.txt */metrics.json 2>/dev/null)
say "phase 2 done"
