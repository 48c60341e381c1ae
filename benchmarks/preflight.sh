#!/usr/bin/env bash
# Preflight: fastmim against the GPU machine's own versions, on a CPU machine, before any GPU time is spent.
# The GPU image has Python 3.12 with torch 2.11.0, triton 3.6.0 and numpy 2.5.2 (no deepspeed, ffcv, xformers), and
# benchmarks/gpu_suite.sh installs fastmim there itself. This script builds a venv with those versions (outside the
# repository, kept for the next run) and runs
#   1. the versions check (the venv holds what the GPU image holds),
#   2. the suite's no-build install (benchmarks/srcpath) in that venv with fastmim uninstalled: fastmim, its kernels
#      and recipes import from this tree,
#   3. gpu_suite.sh stage 1 at CPU sizes (GPU_SUITE_SMOKE=1) with the suite's own install (GPU_SUITE_INSTALL=auto:
#      pip's editable install, as on the device): bench step reference+eager, fast+eager and fast+compile (inductor
#      with torch 2.11 and Python 3.12), every kernel benchmark,
#   4. the kernel and model tests under the Triton interpreter (tests/kernels, tests/models),
#   5. the bf16 correctness gates of the kernel benchmarks at their GPU shapes (batch 256), emulated on the CPU
#      (`bench_<op>.py --gate-only --device cpu`: the fast paths on their PyTorch fallbacks),
#   6. the static kernel report (`fastmim bench kernels --static`: every kernel compiled for sm_80 / sm_90 with
#      triton 3.6, zero spill bytes required).
#
#   bash benchmarks/preflight.sh [OUT_DIR]      (default: a new temporary directory)
#
# Environment: PREFLIGHT_TORCH (2.11.0), PREFLIGHT_TRITON (3.6.0), PREFLIGHT_NUMPY (2.5.2), PREFLIGHT_TORCHVISION
# (0.26.0, the release that pairs with that torch), PYTHON (python3.12), PREFLIGHT_VENV (default
# ~/.cache/fastmim/preflight-<versions>). The first run downloads about 2.6 GB of wheels (torch and its CUDA
# libraries: torch imports them even on a CPU). Exit status 0 only when every step passes; OUT_DIR receives
# preflight.log, the step logs and the JSON records.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH="${PREFLIGHT_TORCH:-2.11.0}" TRITON="${PREFLIGHT_TRITON:-3.6.0}" TORCHVISION="${PREFLIGHT_TORCHVISION:-0.26.0}"
NUMPY="${PREFLIGHT_NUMPY:-2.5.2}"
PY="${PYTHON:-python3.12}"
VENV="${PREFLIGHT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastmim/preflight-py3.12-torch$TORCH-triton$TRITON-numpy$NUMPY}"
# numpy for the steps under the Triton interpreter only: triton 3.6's interpreter turns 1-element arrays into ints,
# which numpy >= 2.4 refuses (triton 3.8 squeezes them first). Installed apart and put first on PYTHONPATH for
# those steps; everything else runs the image's numpy.
INTERP_NUMPY="$VENV/numpy-for-interpreter"
OUT_DIR="${1:-$(mktemp -d -t fastmim-preflight-XXXX)}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
status=0
log() { echo "[preflight $(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/preflight.log"; }
step() {  # step NAME TIMEOUT_S CMD...: run a step, its output in OUT_DIR/NAME.log, its tail and verdict in the log
  local name=$1 limit=$2 start rc
  shift 2
  log "$name"
  echo "+ $*" > "$OUT_DIR/$name.log"
  start=$(date +%s)
  timeout "$limit" "$@" >> "$OUT_DIR/$name.log" 2>&1
  rc=$?
  tail -4 "$OUT_DIR/$name.log" | tee -a "$OUT_DIR/preflight.log"
  if [ $rc -eq 0 ]; then log "$name: ok ($(( $(date +%s) - start )) s)"; else log "$name: FAILED (exit $rc)"; status=1; fi
}

if [ ! -f "$VENV/.complete" ]; then
  version="$("$PY" -c 'import platform; print(platform.python_version())' 2> /dev/null)" \
    || { log "$PY does not run: set PYTHON to a Python 3.12 interpreter"; exit 2; }
  [[ "$version" == 3.12.* ]] || log "warning: Python $version, not 3.12 as on the GPU image"
  log "building $VENV (Python $version)"
  rm -rf "$VENV" && "$PY" -m venv "$VENV" || exit 2
  wheels="$(mktemp -d)"
  # What the GPU image has: torch, triton, timm (with its torchvision), numpy, pytest; plus fastmim's own
  # dependencies, which its --no-deps install does not bring. setuptools: for the suite's editable install.
  pkgs=("torch==$TORCH" "triton==$TRITON" "torchvision==$TORCHVISION" "numpy==$NUMPY" pillow tqdm matplotlib pytest
        timm "setuptools<82")
  start=$(date +%s)
  { "$VENV/bin/pip" download -q -d "$wheels" "${pkgs[@]}" && "$VENV/bin/pip" download -q -d "$wheels" "numpy<2.4"; } \
    || { log "download failed"; exit 2; }
  log "downloaded $(du -sh "$wheels" | cut -f1) of wheels in $(( $(date +%s) - start )) s"
  start=$(date +%s)
  "$VENV/bin/pip" install -q --no-index --find-links "$wheels" "${pkgs[@]}" || { log "install failed"; exit 2; }
  "$VENV/bin/pip" install -q --no-index --find-links "$wheels" --target "$INTERP_NUMPY" "numpy<2.4" \
    || { log "install failed"; exit 2; }
  rm -rf "$wheels"
  log "installed in $(( $(date +%s) - start )) s; venv $(du -sh "$VENV" | cut -f1)"
  touch "$VENV/.complete"
fi
PYV="$VENV/bin/python"

step versions 120 "$PYV" -c "
import sys, numpy, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)
assert torch.__version__.split('+')[0] == '$TORCH' and triton.__version__ == '$TRITON', 'not the pinned versions'
assert numpy.__version__ == '$NUMPY', 'not the GPU image numpy'
for absent in ('deepspeed', 'ffcv', 'xformers'):
    assert __import__('importlib.util').util.find_spec(absent) is None, absent + ' is not on the GPU image'
"
# The suite's two install paths, as on the device: first the one that needs no build, with no fastmim installed;
# then its default (an editable install, setuptools permitting) followed by stage 1 at CPU sizes.
"$PYV" -m pip uninstall -q -y fastmim > /dev/null 2>&1
suite=(env PYTHON="$PYV" GPU_SUITE_SMOKE=1)
step suite_srcpath 300 "${suite[@]}" GPU_SUITE_INSTALL=srcpath GPU_SUITE_STAGES=0 \
  bash benchmarks/gpu_suite.sh "$OUT_DIR/suite-srcpath"
step suite_stage1 1800 "${suite[@]}" GPU_SUITE_INSTALL=auto GPU_SUITE_STAGES=1 GPU_SUITE_BUDGET=1700 \
  bash benchmarks/gpu_suite.sh "$OUT_DIR/suite-stage1"
grep -q "install: editable" "$OUT_DIR/suite-stage1/suite.log" \
  || { log "suite_stage1: the suite did not install fastmim with pip -e (see suite-stage1/suite.log)"; status=1; }
step tests 1800 env PYTHONPATH="$INTERP_NUMPY" "$PYV" -m pytest -q -p no:cacheprovider tests/kernels tests/models
# The bf16 gates at batch 256 (the fast paths on their PyTorch fallbacks: TRITON_INTERPRET=0 on a CPU)
declare -A GATED=([recon_loss]=eager,triton [gather]=eager,triton [decoders]=separate,grouped [attention]=eager,sdpa,math)
for op in recon_loss gather decoders attention; do
  step "bf16_gate_$op" 1800 env TRITON_INTERPRET=0 "$PYV" "benchmarks/bench_$op.py" --gate-only --device cpu \
    --providers "${GATED[$op]}" --modes full --out "$OUT_DIR"
done
step static 900 "$PYV" -m fastmim bench kernels --static --out "$OUT_DIR"
log "done (status $status); logs and records in $OUT_DIR"
exit $status
