#!/usr/bin/env bash
# The GPU suite: every GPU figure fastmim owes, in stages ordered by value, sized for one GPU lease (about 15
# minutes of device time with start-up, at most 10 minutes per command, at most 8 files coming back). The whole
# suite is ONE command that ends inside GPU_SUITE_BUDGET seconds (default 510: 8.5 minutes); every step has its own
# time limit, cut further to what the budget has left, and a step that no longer fits is skipped and named. After
# every stage the tarball of records and summary.md are rewritten, so a run cut short still returns everything
# measured until then.
#
# Stages (times on one H100 / H200 are the planned budget, not yet measured: suite.log times every step, and the
# first real run should replace these figures):
#   1. about 4 min: install (pip -e --no-deps); the gpu-marked kernel tests and the no-sync test with real Triton;
#      `bench step` LocalMIM ViT-B/16 (vit_base_100), batch 256, bf16, a fixed synthetic batch on the device:
#      reference+eager (the released computation, the baseline), fast+eager, fast+compile (compile time apart).
#   2. about 3 min: the kernel benchmarks at the recipe shapes with short timing (--rep-ms 30): hog, recon_loss
#      (heads + loss), gather, decoders, attention; each provider against eager and torch.compile of the reference.
#   3. what remains: MAE ViT-B (eager, compiled), LocalMIM-Swin-B (swin_base_hog_400: reference vs fast), the other
#      gpu-marked tests, ViT-L (vit_large_800: reference vs fast), `bench data` with GPU augmentation, and ViT-B
#      fast with torch.compile modes max-autotune-no-cudagraphs and reduce-overhead.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: $OUT if set, else benchmarks/results/gpu-<date>)
#
# Environment: PYTHON (default python3), GPU_SUITE_STAGES (default 1,2,3: e.g. 1 to rerun stage 1 alone),
# GPU_SUITE_BUDGET (seconds, default 510), GPU_SUITE_SMOKE=1 (every stage at CPU sizes without installing: how
# tests/bench/test_gpu_suite.py checks this script on a machine without a GPU; its numbers mean nothing).
#
# OUT_DIR receives: gpu_suite.tar.gz (every JSON record and PNG), summary.md, suite.log (every step's output and
# time), pytest-gpu.log, pytest-gpu-rest.log. Commit the JSON records under benchmarks/results/ (benchmarks/README.md).
# Before spending GPU time: bash benchmarks/preflight.sh passes on the CPU against the GPU image's torch / triton.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"  # the records; outside OUT_DIR, which may return only a few files
# Real kernels, never the interpreter (tests/conftest.py defaults TRITON_INTERPRET to 1 for CPU runs).
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"
STAGES=",${GPU_SUITE_STAGES:-1,2,3},"
BUDGET="${GPU_SUITE_BUDGET:-510}"
SMOKE="${GPU_SUITE_SMOKE:-0}"
START=$(date +%s)
status=0
failed=()
skipped=()

log() { echo "[gpu_suite $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT_DIR/suite.log"; }

# step NAME CAP LOGFILE CMD...: run CMD with a limit of CAP seconds, or less when the budget has less left (15 s
# are kept for the summary); skip it when under 20 s would be left. Output goes to LOGFILE (relative to OUT_DIR).
step() {
  local name=$1 cap=$2 logfile=$3
  shift 3
  local limit=$(( BUDGET - ($(date +%s) - START) - 15 ))
  (( limit > cap )) && limit=$cap
  if (( limit < 20 )); then
    log "SKIPPED (out of time): $name"
    skipped+=("$name")
    return 0
  fi
  log "start: $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$OUT_DIR/$logfile" 2>&1
  rc=$?
  log "end: $name: status $rc in $(( $(date +%s) - t0 ))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  if (( rc != 0 )); then
    failed+=("$name (status $rc)")
    status=1
  fi
  return 0
}

# After every stage: the summary and the tarball, rewritten from every record so far.
finish_stage() {
  "$PY" -m fastmim.bench.summary "$WORK" > "$OUT_DIR/summary.md" 2>&1
  tar -czf "$OUT_DIR/gpu_suite.tar.gz" -C "$WORK" .
  log "stage $1 done: $(find "$WORK" -name '*.json' | wc -l) records so far"
}

want() { [[ "$STAGES" == *",$1,"* ]]; }

# Sizes: the recipes' on a GPU; tiny ones for the CPU smoke run, which only checks that every step runs.
if [ "$SMOKE" = 1 ]; then
  STEP=(--train.precision=fp32 --data.num_images=8 --train.batch_size=2 --steps 2 --warmup 0 --breakdown-steps 1)
  TINY=(--model.img_size=32 --model.decoder_dim=32)
  VIT_B=(--config tiny_cpu "${TINY[@]}")
  MAE_B=(--config tiny_cpu --model.name=mae_vit_tiny_patch16 "${TINY[@]}")
  SWIN_B=(--config tiny_cpu --model.name=localmim_swin_nano_patch4_window4 --model.img_size=64 --model.decoder_dim=32)
  VIT_L=("${VIT_B[@]}")
  COMPILED="" EAGER="+eager"
  KERNEL=(--quick)
  DATA=(--config tiny_cpu --model.img_size=32 --train.batch_size=4 --steps 2 --warmup 1)
else
  STEP=(--train.batch_size=256 --train.accum_steps=1 --train.precision=bf16 --data.num_images=256 --steps 20
        --warmup 5)
  VIT_B=(--config vit_base_100)
  MAE_B=(--config vit_base_100 --model.name=mae_vit_base_patch16 --model.target= --model.nbins=0)
  SWIN_B=(--config swin_base_hog_400)
  VIT_L=(--config vit_large_800)
  COMPILED=",fast+compile" EAGER="+eager"
  KERNEL=(--rep-ms 30)
  DATA=(--config vit_base_100 --train.batch_size=256 --data.num_workers=8 --steps 20 --warmup 4)
fi
BENCH_STEP=("$PY" -m fastmim bench step --data.source=synthetic --data.num_workers=0 --fixed-batch --out "$WORK"
            --plot "${STEP[@]}")

log "output in $OUT_DIR; stages ${GPU_SUITE_STAGES:-1,2,3}; budget ${BUDGET}s; smoke $SMOKE"
if [ "$SMOKE" != 1 ]; then
  log "install"
  "$PY" -m pip install -q -e . --no-deps --no-build-isolation >> "$OUT_DIR/suite.log" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv >> "$OUT_DIR/suite.log" 2>&1
fi
"$PY" -c "
import torch, triton, fastmim, fastmim.kernels
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print('fastmim', fastmim.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
      triton.__version__, gpu)
assert torch.cuda.is_available() or '$SMOKE' == '1', 'no CUDA device'
" 2>&1 | tee -a "$OUT_DIR/suite.log"
(( PIPESTATUS[0] == 0 )) || { log "fastmim does not import, or there is no GPU: nothing measured"; exit 1; }

if want 1; then
  step "pytest -m gpu: kernels and no-sync" 150 pytest-gpu.log \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/train/test_no_sync.py
  step "bench step localmim ViT-B" 210 suite.log \
    "${BENCH_STEP[@]}" "${VIT_B[@]}" --impls "reference$EAGER,fast$EAGER$COMPILED"
  finish_stage 1
fi

if want 2; then
  for op in hog recon_loss gather decoders attention; do
    providers=()  # smoke: the eager providers only (compiling each reference on a CPU costs minutes)
    [ "$SMOKE" = 1 ] && providers=(--providers "$([ $op = decoders ] && echo separate,grouped || echo eager)")
    step "bench_$op" 75 suite.log "$PY" "benchmarks/bench_$op.py" --out "$WORK" --plot "${KERNEL[@]}" "${providers[@]}"
  done
  finish_stage 2
fi

if want 3; then
  step "bench step MAE ViT-B" 150 suite.log "${BENCH_STEP[@]}" "${MAE_B[@]}" --impls "reference$EAGER${COMPILED/fast/reference}"
  step "bench step LocalMIM-Swin-B" 150 suite.log "${BENCH_STEP[@]}" "${SWIN_B[@]}" --impls "reference$EAGER,fast$EAGER"
  step "pytest -m gpu: the rest" 120 pytest-gpu-rest.log \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests --ignore=tests/kernels --ignore=tests/train/test_no_sync.py
  step "bench step localmim ViT-L" 150 suite.log "${BENCH_STEP[@]}" "${VIT_L[@]}" --impls "reference$EAGER,fast$EAGER"
  step "bench data (demo images, cpu vs gpu augmentation)" 90 suite.log \
    "$PY" -m fastmim bench data "${DATA[@]}" --sources demo --augment cpu,gpu --out "$WORK"
  # The loader's CPU cost per decode mode with the device half on the GPU (data.decode=gpu: nvJPEG), on an
  # ImageNet-like folder converted to JPEG and raw .beton files: converting needs FFCV, which the GPU image lacks.
  if [ "$SMOKE" != 1 ] && "$PY" -c "import ffcv" > /dev/null 2>&1; then
    step "imagenet-like folder" 60 suite.log "$PY" -m fastmim data imagenet-like "$WORK/inet" --images 512
    step "bench data (ffcv jpeg/raw, augment gpu, decode cpu/gpu)" 150 suite.log "$PY" -m fastmim bench data \
      --model.img_size=224 --data.num_workers=1 --train.batch_size=64 --steps 48 --warmup 8 \
      --data.path="$WORK/inet" --sources ffcv --storage jpeg,raw --augment gpu --decode cpu,gpu --out "$WORK"
    rm -rf "$WORK/inet"
  fi
  if [ "$SMOKE" != 1 ]; then  # compile modes: minutes of autotuning on a GPU, nothing to learn from on a CPU
    step "bench step ViT-B compile modes" 240 suite.log "${BENCH_STEP[@]}" "${VIT_B[@]}" \
      --impls reference+eager,fast+compile:max-autotune-no-cudagraphs,fast+compile:reduce-overhead
  fi
  finish_stage 3
fi

log "done in $(( $(date +%s) - START ))s (status $status); results in $OUT_DIR"
for f in "${failed[@]}"; do log "FAILED: $f"; done
for s in "${skipped[@]}"; do log "SKIPPED: $s"; done
tail -n 3 "$OUT_DIR"/pytest-gpu*.log 2>/dev/null
cat "$OUT_DIR/summary.md"
exit $status
