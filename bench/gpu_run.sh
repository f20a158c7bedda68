#!/usr/bin/env bash
# The one GPU command of issue 7: training throughput (kdreid vs plain PyTorch vs torchreid 0.2.5), CUDA graphs for
# ResNet-50 and OSNet x0.25, the distillation stage and its teacher forwards, D-MMD compiled, the pipeline's time per
# stage, and the fast-vs-plain accuracy check.
#
#   bash bench/gpu_run.sh                 # on the GPU machine, from the repository root; results under $OUT
#   TINY=1 bash bench/gpu_run.sh          # CPU smoke run of the same script (every step, tiny settings)
#
# Needs: python3 with torch, torchvision, numpy, scipy, pillow, pyyaml, tqdm, tensorboard (kdreid itself runs from
# src/ via PYTHONPATH) and torchreid 0.2.5's extracted sdist in .cache/reference/torchreid-0.2.5 (carried; no
# network). The whole script stays within BUDGET seconds (default 540, inside one 10-minute device call): the runs go
# in order of importance, each under `timeout`, and a step that no longer fits is skipped and said so.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/kdreid_gpu_out}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python3}
SCRATCH=${SCRATCH:-/tmp/kdreid_gpu_scratch}  # generated images and run folders: not copied back
DATA=$SCRATCH/data
# A rerun on the same warm machine keeps the generated images but never a previous run's pipeline stages: reused
# or resumed stages would give meaningless pipeline times.
rm -rf "$SCRATCH/pipeline"
mkdir -p "$OUT" "$SCRATCH/work"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
START=$(date +%s)
CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=$(( CORES > 2 ? CORES - 2 : 1 ))

if [ "${TINY:-0}" = 1 ]; then
  # Compilation takes minutes on a CPU: the compile steps are skipped here (tests/stages/test_optim_fast_path.py
  # covers the compile path and its fallback with a light backend).
  COMMON=(--tiny --device cpu)
  SPEED=(); COMPILE=(); ACCURACY=(--acc-epochs 1 --seeds 0 1)
  PIPE=(--tiny); PIPE_DATA=$SCRATCH/pipeline_data  # the tiny speed domains are too small for a source
  PIPE_MAX=400
  TEACHERS=(--device cpu --arch osnet_x0_25 --size 64x32 --batch 8 --repeats 1)
else
  COMMON=(--device cuda --workers "$WORKERS")
  SPEED=(--steps 80 --warmup 15)
  COMPILE=(--steps 60)
  ACCURACY=(--acc-epochs 15 --seeds 0 1 2 --size 128x64)  # 128x64: 3 seeds × 2 paths fit in ~2 min
  PIPE=(--device cuda --epochs-scale 0.05 --workers "$WORKERS"); PIPE_DATA=$DATA; PIPE_MAX=150
  TEACHERS=(--device cuda --arch resnet50 --size 256x128 --batch 32 64 --repeats 20)
fi

say() { echo "[gpu_run +$(( $(date +%s) - START ))s] $*"; }
FAILED=()  # steps that ran and did not exit 0 (timed out included): the script's own exit status says so


# step NAME MAX_SECONDS MIN_SECONDS COMMAND...: runs COMMAND under `timeout` for min(MAX, what is left of BUDGET);
# skipped when less than MIN_SECONDS are left. Output goes to the console and to $OUT/NAME.log.
step() {
  local name=$1 max=$2 min=$3; shift 3
  if [ "${TINY:-0}" = 1 ] && [ "${name#compile}" != "$name" ]; then
    say "SKIPPED $name in the CPU smoke run"; return
  fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( left < max ? left : max ))
  if [ "$limit" -lt "$min" ]; then
    say "SKIPPED $name: ${left}s of the budget left, it needs at least ${min}s"
    echo "skipped: ${left}s left" > "$OUT/$name.log"
    return
  fi
  say "START $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  # 124: timeout's own code when it sent its SIGTERM (whatever the child then returned); 137: killed after
  # --kill-after.
  local cut=""; case $rc in 124|137) cut=" (TIMED OUT at ${limit}s)";; esac
  say "END $name: exit $rc$cut"
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc$cut)")
}

say "machine: $CORES CPU cores"
(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true) | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$OUT/gpu.txt"
[ -d .cache/reference/torchreid-0.2.5/torchreid ] || \
  say "WARNING: .cache/reference/torchreid-0.2.5 missing: the torchreid and plain rows and the accuracy check will fail"

# The steps go in order of what is still unmeasured on an H100 (docs/training-speed.md): the budget cuts the last.
# 1. Throughput: kdreid (eager) / bare step / plain / torchreid for ResNet-50 and OSNet x0.25, then adaptation and
#    distillation —
#    side by side in one run (the H100 has never run torchreid's row). Generates the synthetic domains first
#    (synth_market 0.2 = 2.6k training images; 3 targets at 0.04).
step train_speed 240 60 $PY bench/train_speed.py "${COMMON[@]}" "${SPEED[@]}" \
  --only kdreid bare data plain torchreid adapt distill --data "$DATA" --work "$SCRATCH/work" --json "$OUT/train_speed.json"

# 1b. The distillation's teacher forwards: sequential (the stage) vs batched across targets (vmap) vs a CUDA graph.
step teacher_forward 60 30 $PY bench/teacher_forward.py "${TEACHERS[@]}"

# 2. CUDA graphs (torch.compile reduce-overhead) for both models: ResNet-50's never timed, OSNet's only on an H200.
step compile_graphs 200 90 $PY bench/train_speed.py "${COMMON[@]}" "${COMPILE[@]}" --only compiled \
  --models resnet50 osnet_x0_25 --compile reduce-overhead --data "$DATA" --work "$SCRATCH/work" \
  --json "$OUT/compile_graphs.json" --compare "$OUT/train_speed.json"

# 2b. The adaptation stage (the pipeline's main cost) compiled: the model to CUDA graphs, the D-MMD terms fused.
step compile_adapt 150 90 $PY bench/train_speed.py "${COMMON[@]}" "${SPEED[@]}" --only adapt \
  --adapt-compile reduce-overhead --data "$DATA" --work "$SCRATCH/work" --json "$OUT/compile_adapt.json"

# 4. The distillation stage with its student compiled to CUDA graphs (eager row: step 1's).
step compile_distill 150 90 $PY bench/train_speed.py "${COMMON[@]}" "${SPEED[@]}" --only distill \
  --distill-compile reduce-overhead --data "$DATA" --work "$SCRATCH/work" --json "$OUT/compile_distill.json"

# 5. D-MMD's terms eager vs compiled (what `kdreid adapt --compile` adds), ResNet-50's 2048-d embeddings.
step compile_dmmd 90 60 $PY bench/dmmd_cost.py --device cuda --compiled --dims 2048 --batch-sizes 32 64 --repeats 50

# 6. Whatever time is left: the pipeline's stages on the same domains, a shortened paper schedule, extrapolated
#    to Market-size domains.
step pipeline_time "$PIPE_MAX" 45 $PY bench/pipeline_time.py "${PIPE[@]}" --data "$PIPE_DATA" --out "$SCRATCH/pipeline" \
  --json "$OUT/pipeline_time.json"

# 7. Measured on an H200 already (docs/training-speed.md): fast vs plain accuracy over 3 seeds; ResNet-50 compiled
#    without graphs.
step accuracy 160 60 $PY bench/train_speed.py "${COMMON[@]}" "${ACCURACY[@]}" --only none --accuracy \
  --data "$DATA" --work "$SCRATCH/work" --json "$OUT/accuracy.json"
step compile_r50 120 80 $PY bench/train_speed.py "${COMMON[@]}" "${COMPILE[@]}" --only compiled \
  --models resnet50 --compile default --data "$DATA" --work "$SCRATCH/work" --json "$OUT/compile_r50.json" \
  --compare "$OUT/train_speed.json"

say "done; logs and JSON in $OUT:"
ls -la "$OUT"
# Every step runs whatever an earlier one did (each is measured on its own); a step that failed makes the whole
# command fail at the end, so that a caller (a device call's rc, CI) sees it without reading every log.
if [ "${#FAILED[@]}" -gt 0 ]; then
  say "FAILED: ${FAILED[*]}"
  exit 1
fi
