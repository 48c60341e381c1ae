#!/usr/bin/env bash
# The GPU suite: every GPU figure fastmim owes, in stages ordered by value, sized for one GPU lease (about 15
# minutes of device time with start-up, at most 10 minutes per command, few files coming back).
#
#   The first call of a lease is stage 1 alone (about 3-4 min, at most GPU_SUITE_BUDGET = 300 s: it fits twice in a
#   lease, so a fix can be rerun), with the commit passed in (the device's copy of the tree has no .git):
#     FASTMIM_GIT_COMMIT=<sha> GPU_SUITE_STAGES=1 bash benchmarks/gpu_suite.sh "$OUT"      (device timeout_s 330)
#   then, with what the lease has left, stages 2 and 3:
#     FASTMIM_GIT_COMMIT=<sha> GPU_SUITE_STAGES=2,3 GPU_SUITE_BUDGET=<left - 60> bash benchmarks/gpu_suite.sh "$OUT"
#
# Stages (times on one H100 / H200 are the planned budget, not yet measured: suite.log times every step, and the
# first real run should replace these figures):
#   1. install; `bench step` LocalMIM ViT-B/16 (vit_base_100), batch 256, bf16, a fixed synthetic batch:
#      reference+eager (the released computation, the baseline), fast+eager, reference+compile, fast+compile (img/s,
#      MFU, peak memory; compile time apart); then every kernel benchmark without its torch.compile providers
#      (released / eager / triton, attention backends) at the recipe shapes, --rep-ms 30. A failure in stage 1 stops
#      the suite: stages 2-3 would spend the lease on a broken build.
#   2. the kernel benchmarks' torch.compile providers beside eager and triton (each kernel against torch.compile of
#      the reference, in one process); the gpu-marked kernel tests and the no-sync test with real Triton.
#   3. what remains: MAE ViT-B (eager, compiled), LocalMIM-Swin-B (swin_base_hog_400: reference vs fast), the other
#      gpu-marked tests, ViT-L (vit_large_800: reference vs fast), `bench data` with GPU augmentation, and ViT-B
#      fast under torch.compile modes max-autotune-no-cudagraphs and reduce-overhead (one process per mode).
#
# Nothing finished is lost: every benchmark writes each row into its JSON record as the row finishes; the tarball
# of records and summary.md are rebuilt (written to a temporary, then renamed) after every step, every 30 s during
# one, and on exit, also on SIGTERM / SIGINT (the running step is stopped first).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: $OUT if set, else benchmarks/results/gpu-<date>)
#
# Environment: PYTHON (default python3), GPU_SUITE_STAGES (default 1,2,3), GPU_SUITE_BUDGET (seconds; default 300
# for stage 1 alone, else 510), FASTMIM_GIT_COMMIT (the commit, written into every record when there is no .git),
# GPU_SUITE_INSTALL (auto: `pip install -e . --no-deps --no-build-isolation` when setuptools >= 68 is there, and
# benchmarks/srcpath (no build: PYTHONPATH) when it is not or the install fails; editable; srcpath),
# GPU_SUITE_WORK (where the records are written; default a new temporary directory), GPU_SUITE_SMOKE=1 (every stage
# at CPU sizes, installed through srcpath: how tests/bench/test_gpu_suite.py checks this script without a GPU).
#
# OUT_DIR receives: gpu_suite.tar.gz (every JSON record and PNG), summary.md, suite.log (every step's output and
# time), pytest-gpu.log, pytest-gpu-rest.log. Commit the JSON records under benchmarks/results/ (benchmarks/README.md).
# Before spending GPU time: bash benchmarks/preflight.sh passes on the CPU against the GPU image's torch / triton.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${GPU_SUITE_WORK:-$(mktemp -d)}"  # the records; outside OUT_DIR, which may return only a few files
mkdir -p "$WORK"
# Real kernels, never the interpreter (tests/conftest.py defaults TRITON_INTERPRET to 1 for CPU runs). pip: no
# network on the GPU machine, so no version check and no index.
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_NO_INPUT=1
PY="${PYTHON:-python3}"
STAGES=",${GPU_SUITE_STAGES:-1,2,3},"
[ "$STAGES" = ",1," ] && BUDGET="${GPU_SUITE_BUDGET:-300}" || BUDGET="${GPU_SUITE_BUDGET:-510}"
SMOKE="${GPU_SUITE_SMOKE:-0}"
START=$(date +%s)
status=0
failed=()
skipped=()
child=""

# The log file first, then stdout, whose reader may be gone (a killed caller): a write to a closed pipe must not
# end the suite before it has returned its records, so SIGPIPE is ignored and such writes fail quietly.
trap '' PIPE
log() {
  local line
  line="[gpu_suite $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"
  echo "$line" >> "$OUT_DIR/suite.log"
  echo "$line" 2> /dev/null
}

# The summary and the tarball, rebuilt from every record so far, each written to a temporary and then renamed, so
# that what OUT_DIR holds is whole at every moment. Records still being written (.*.tmp) are left out.
refresh() {
  "$PY" -m fastmim.bench.summary "$WORK" > "$OUT_DIR/.summary.md.tmp" 2>&1
  mv -f "$OUT_DIR/.summary.md.tmp" "$OUT_DIR/summary.md"
  tar -czf "$OUT_DIR/.gpu_suite.tar.gz.tmp" --exclude='*.tmp' -C "$WORK" . \
    && mv -f "$OUT_DIR/.gpu_suite.tar.gz.tmp" "$OUT_DIR/gpu_suite.tar.gz"
}

report() {
  log "done in $(( $(date +%s) - START ))s (status $status); $(find "$WORK" -name '*.json' | wc -l) records; results in $OUT_DIR"
  for f in "${failed[@]}"; do log "FAILED: $f"; done
  for s in "${skipped[@]}"; do log "SKIPPED: $s"; done
  tail -n 3 "$OUT_DIR"/pytest-gpu*.log 2>/dev/null
  cat "$OUT_DIR/summary.md"
}

# SIGTERM / SIGINT (a time limit, a Ctrl-C): stop the running step, then the EXIT trap returns every record.
on_signal() {
  trap - TERM INT
  log "interrupted by SIG$1: stopping the running step; every record written so far is returned"
  if [ -n "$child" ]; then
    kill -TERM "$child" 2> /dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$child" 2> /dev/null || break; sleep 1; done
    kill -KILL "$child" 2> /dev/null
  fi
  failed+=("interrupted by SIG$1")
  status=1
  exit 1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'refresh; report' EXIT

# step NAME CAP LOGFILE CMD...: run CMD with a limit of CAP seconds, or less when the budget has less left (15 s
# are kept for the summary); skip it when under 20 s would be left. Output goes to LOGFILE (relative to OUT_DIR).
# The step runs in the background so that a signal is handled at once; the results are refreshed every 30 s.
step() {
  local name=$1 cap=$2 logfile=$3
  shift 3
  [ "$SMOKE" = 1 ] && cap=$BUDGET  # the caps are sized for a GPU; a (loaded) CPU is bounded by the budget alone
  local limit=$(( BUDGET - ($(date +%s) - START) - 15 ))
  (( limit > cap )) && limit=$cap
  if (( limit < 20 )); then
    log "SKIPPED (out of time): $name"
    skipped+=("$name")
    return 0
  fi
  log "start: $name (limit ${limit}s)"
  local t0 rc last
  t0=$(date +%s)
  last=$t0
  timeout --kill-after=10 "$limit" "$@" >> "$OUT_DIR/$logfile" 2>&1 &
  child=$!
  while kill -0 "$child" 2> /dev/null; do
    sleep 1
    (( $(date +%s) - last >= 30 )) && { refresh; last=$(date +%s); }
  done
  wait "$child"
  rc=$?
  child=""
  log "end: $name: status $rc in $(( $(date +%s) - t0 ))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  if (( rc != 0 )); then
    failed+=("$name (status $rc)")
    status=1
  fi
  refresh
  return 0
}

want() { [[ "$STAGES" == *",$1,"* ]]; }

# fastmim importable from this tree, by pip's editable install where it can build, else through benchmarks/srcpath
# (no build). Either way the check is the same: fastmim, its kernels and recipes import from this tree.
install() {
  local how="${GPU_SUITE_INSTALL:-auto}" rc
  [ "$SMOKE" = 1 ] && [ -z "${GPU_SUITE_INSTALL:-}" ] && how=srcpath  # never touch the test's own environment
  if [ "$how" = auto ]; then
    local setuptools
    setuptools="$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2> /dev/null || echo none)"
    if [[ "$setuptools" =~ ^([0-9]+)\. ]] && (( BASH_REMATCH[1] >= 68 )); then
      how=editable
    else
      how=srcpath
      log "setuptools $setuptools (an editable install needs >= 68, else pip fails with \"invalid command 'bdist_wheel'\")"
    fi
  fi
  if [ "$how" = editable ]; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT_DIR/suite.log" 2>&1
    rc=$?
    if (( rc != 0 )) || ! imports_here; then
      log "pip install -e . failed (status $rc) or does not import this tree: using benchmarks/srcpath instead"
      how=srcpath
    fi
  fi
  [ "$how" = srcpath ] && export PYTHONPATH="$ROOT/benchmarks/srcpath${PYTHONPATH:+:$PYTHONPATH}"
  imports_here || { log "fastmim does not import from $ROOT (install: $how): nothing measured"; exit 1; }
  log "install: $how; fastmim imports from $ROOT"
}

imports_here() {
  (cd / && "$PY" -c "
import sys, fastmim, fastmim.kernels, fastmim.recipes
files = (fastmim.__file__, fastmim.kernels.__file__, fastmim.recipes.__file__)
sys.exit(0 if all(f.startswith('$ROOT/') for f in files) else 1)" >> "$OUT_DIR/suite.log" 2>&1)
}

# Sizes: the recipes' on a GPU; tiny ones for the CPU smoke run, which only checks that every step runs.
if [ "$SMOKE" = 1 ]; then
  STEP=(--train.precision=fp32 --data.num_images=8 --train.batch_size=2 --steps 2 --warmup 0 --breakdown-steps 1)
  TINY=(--model.img_size=32 --model.decoder_dim=32)
  VIT_B=(--config tiny_cpu "${TINY[@]}")
  MAE_B=(--config tiny_cpu --model.name=mae_vit_tiny_patch16 "${TINY[@]}")
  SWIN_B=(--config tiny_cpu --model.name=localmim_swin_nano_patch4_window4 --model.img_size=64 --model.decoder_dim=32)
  VIT_L=("${VIT_B[@]}")
  # fast+compile: inductor on the CPU (the only compile the smoke run pays for: the kernel benches' compile
  # providers would cost minutes; stage 2 runs their references only)
  VIT_B_IMPLS=reference+eager,fast+eager,fast+compile
  MAE_IMPLS=reference+eager
  KERNEL=(--quick)
  DATA=(--config tiny_cpu --model.img_size=32 --train.batch_size=4 --steps 2 --warmup 1)
else
  STEP=(--train.batch_size=256 --train.accum_steps=1 --train.precision=bf16 --data.num_images=256 --steps 20
        --warmup 5)
  VIT_B=(--config vit_base_100)
  MAE_B=(--config vit_base_100 --model.name=mae_vit_base_patch16 --model.target= --model.nbins=0)
  SWIN_B=(--config swin_base_hog_400)
  VIT_L=(--config vit_large_800)
  VIT_B_IMPLS=reference+eager,fast+eager,reference+compile,fast+compile
  MAE_IMPLS=reference+eager,reference+compile
  KERNEL=(--rep-ms 30)
  DATA=(--config vit_base_100 --train.batch_size=256 --data.num_workers=8 --steps 20 --warmup 4)
fi
BENCH_STEP=("$PY" -m fastmim bench step --data.source=synthetic --data.num_workers=0 --fixed-batch --out "$WORK"
            --plot "${STEP[@]}")
# The kernel benchmarks (benchmarks/bench_<op>.py) and each one's providers per stage, from the benchmarks themselves
# (fastmim.bench.suite): stage 1 every provider but torch.compile's; stage 2 torch.compile's beside the others.
declare -A EAGER_PROVIDERS=() COMPILE_PROVIDERS=()
KERNEL_OPS=()
kernel_plan() {
  local plan op first second
  plan="$("$PY" -m fastmim.bench.suite benchmarks $([ "$SMOKE" = 1 ] && echo --smoke) 2>> "$OUT_DIR/suite.log")" || {
    log "FAILED: the kernel benchmarks' providers (python -m fastmim.bench.suite): no kernel benchmark runs"
    failed+=("kernel benchmark plan")
    status=1
    return 0
  }
  while read -r op first second; do
    [ -n "$op" ] || continue
    KERNEL_OPS+=("$op")
    EAGER_PROVIDERS[$op]=$first
    COMPILE_PROVIDERS[$op]=$second
  done <<< "$plan"
  log "kernel benchmarks: ${KERNEL_OPS[*]}"
}

log "output in $OUT_DIR; records in $WORK; stages ${GPU_SUITE_STAGES:-1,2,3}; budget ${BUDGET}s; smoke $SMOKE"
commit="$(git rev-parse HEAD 2> /dev/null || echo "${FASTMIM_GIT_COMMIT:-}")"
[ -n "$commit" ] && log "commit $commit" \
  || log "WARNING: no .git and no FASTMIM_GIT_COMMIT: the records will name no commit"
install
[ "$SMOKE" != 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv >> "$OUT_DIR/suite.log" 2>&1
"$PY" -c "
import torch, triton, fastmim, fastmim.kernels
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print('fastmim', fastmim.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
      triton.__version__, gpu)
assert torch.cuda.is_available() or '$SMOKE' == '1', 'no CUDA device'
" 2>&1 | tee -a "$OUT_DIR/suite.log"
(( PIPESTATUS[0] == 0 )) || { log "fastmim does not import, or there is no GPU: nothing measured"; exit 1; }
kernel_plan

if want 1; then
  step "bench step localmim ViT-B" 180 suite.log "${BENCH_STEP[@]}" "${VIT_B[@]}" --impls "$VIT_B_IMPLS"
  for op in "${KERNEL_OPS[@]}"; do
    step "bench_$op" 25 suite.log "$PY" "benchmarks/bench_$op.py" --out "$WORK" "${KERNEL[@]}" \
      --providers "${EAGER_PROVIDERS[$op]}"
  done
  log "stage 1 done: $(find "$WORK" -name '*.json' | wc -l) records so far"
  if (( ${#failed[@]} )); then
    log "stage 1 failed: stopping here (the stages after it would spend the lease on a broken build)"
    exit 1
  fi
fi

if want 2; then
  for op in "${KERNEL_OPS[@]}"; do
    [ "${COMPILE_PROVIDERS[$op]}" = - ] && continue  # no torch.compile provider
    step "bench_$op (torch.compile providers)" 90 suite.log "$PY" "benchmarks/bench_$op.py" --out "$WORK" --plot \
      "${KERNEL[@]}" --providers "${COMPILE_PROVIDERS[$op]}"
  done
  step "pytest -m gpu: kernels and no-sync" 150 pytest-gpu.log \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/train/test_no_sync.py
  log "stage 2 done: $(find "$WORK" -name '*.json' | wc -l) records so far"
fi

if want 3; then
  step "bench step MAE ViT-B" 150 suite.log "${BENCH_STEP[@]}" "${MAE_B[@]}" --impls "$MAE_IMPLS"
  step "bench step LocalMIM-Swin-B" 150 suite.log "${BENCH_STEP[@]}" "${SWIN_B[@]}" --impls reference+eager,fast+eager
  step "pytest -m gpu: the rest" 120 pytest-gpu-rest.log \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests --ignore=tests/kernels --ignore=tests/train/test_no_sync.py
  step "bench step localmim ViT-L" 150 suite.log "${BENCH_STEP[@]}" "${VIT_L[@]}" --impls reference+eager,fast+eager
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
    for mode in max-autotune-no-cudagraphs reduce-overhead; do  # one process each: CUDA graphs and autotuning
      step "bench step ViT-B compile mode $mode" 150 suite.log "${BENCH_STEP[@]}" "${VIT_B[@]}" \
        --impls "reference+eager,fast+compile:$mode"
    done
  fi
  log "stage 3 done: $(find "$WORK" -name '*.json' | wc -l) records so far"
fi
exit $status
