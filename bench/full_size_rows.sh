#!/usr/bin/env bash
# Issue 5's stage rows at full size (256x128, Market- and Duke-size targets) on one GPU, in one device call of under
# 10 minutes:
#
#   bash bench/full_size_rows.sh          # domains, source model, then teacher (tracklets), control, pseudo-labels
#                                         # and oracle for both targets, eight runs at once; one table
#   TINY=1 bash bench/full_size_rows.sh   # CPU smoke run of the same (tiny domains, 64x32, one epoch)
#
# ResNet-18 and the quick preset at 256x128 with 6 source epochs: the setting of the full-size calibration check in
# docs/synthetic.md, except that the source synth_msmt is drawn at scale MSMT_SCALE (default 0.5: 16k training
# images; at scale 1 its 126k images, the source epochs and the adaptation epochs, which each walk the source once,
# do not fit one 10-minute call). Everything stays inside DEADLINE seconds: the adaptation runs get what the domains
# and the source model leave. Results: $OUT/rows.md (and the runs' logs, tarred: a call returns only a few files).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/full_size_out}; SCRATCH=${SCRATCH:-/tmp/full_size_scratch}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$OUT" "$SCRATCH/runs"
DATA=$SCRATCH/data; RUNS=$SCRATCH/runs; SRC=synth_msmt; TARGETS=(synth_market synth_duke)
if [ "${TINY:-0}" = 1 ]; then
  SCALE=0.03; MSMT_SCALE=0.03; SIZE=(--height 64 --width 32); GEN_SIZE=64x32; SRC_EPOCHS=1; EXTRA=(--epochs 1)
  SRC_LIMIT=400; DEADLINE=${DEADLINE:-900}; export OMP_NUM_THREADS=1  # 2 cores, eight runs at a time
else
  SCALE=1; MSMT_SCALE=${MSMT_SCALE:-0.5}; SIZE=(--height 256 --width 128); GEN_SIZE=256x128; SRC_EPOCHS=6; EXTRA=()
  SRC_LIMIT=240; DEADLINE=${DEADLINE:-560}
fi
KDREID=("$PY" -c "import sys; from kdreid.cli import main; sys.exit(main())")
START=$(date +%s); say() { echo "[+$(( $(date +%s) - START ))s] $*"; }

say "writing $SRC at scale $MSMT_SCALE and ${TARGETS[*]} at scale $SCALE, $GEN_SIZE"
"${KDREID[@]}" data synth --out "$DATA" --domains $SRC --scale "$MSMT_SCALE" --size $GEN_SIZE --workers "$(nproc)" \
  > "$OUT/data.log" 2>&1 || { tail -5 "$OUT/data.log"; exit 1; }
"${KDREID[@]}" data synth --out "$DATA" --domains "${TARGETS[@]}" --scale $SCALE --size $GEN_SIZE \
  --workers "$(nproc)" >> "$OUT/data.log" 2>&1 || { tail -5 "$OUT/data.log"; exit 1; }

say "source model ($SRC_EPOCHS epochs, limit ${SRC_LIMIT}s)"
timeout "$SRC_LIMIT" "${KDREID[@]}" train-source -s $SRC -t "${TARGETS[@]}" -a resnet18 --root "$DATA" \
  --preset quick --epochs $SRC_EPOCHS "${SIZE[@]}" --out "$RUNS/source" > "$RUNS/source.log" 2>&1
tail -4 "$RUNS/source.log"
[ -f "$RUNS/source/model.pt" ] || { say "no source model: see $RUNS/source.log"; exit 1; }

# All eight runs at once: each is launch-bound at batch 32 (D-MMD's many small kernels), so they share the GPU better
# than they would take turns. A run cut by the limit leaves resumable checkpoints and reads "not finished".
LIMIT=$(( DEADLINE - ($(date +%s) - START) - 20 ))
declare -A FLAGS=([teacher]="" [control]="--dmmd-weight 0" [pseudo]="--grouping pseudo" [oracle]="--grouping oracle")
say "adaptation: 8 runs at once (limit ${LIMIT}s)"
for target in "${TARGETS[@]}"; do
  for variant in teacher control pseudo oracle; do
    # shellcheck disable=SC2086  # FLAGS values are word lists
    timeout "$LIMIT" "${KDREID[@]}" adapt -s $SRC -t "$target" -a resnet18 --init "$RUNS/source/model.pt" \
      --root "$DATA" --preset quick "${SIZE[@]}" "${EXTRA[@]}" ${FLAGS[$variant]} --out "$RUNS/${variant}_$target" \
      > "$RUNS/${variant}_$target.log" 2>&1 &
  done
done
wait
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
tar czf "$OUT/logs.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d *.log */log.txt */metrics.json */config.yaml 2>/dev/null)
say "done"
