#!/usr/bin/env bash
# Preflight: fastmim against the GPU machine's own versions, on a CPU machine, before any GPU time is spent.
# The GPU image has Python 3.12 with torch 2.11.0 and triton 3.6.0 (no deepspeed, ffcv, xformers), and
# benchmarks/gpu_suite.sh installs fastmim there with --no-deps. This script builds a venv with those versions
# (outside the repository, kept for the next run), installs fastmim into it without dependencies, and runs
#   1. the versions check (the venv holds what the GPU image holds, and fastmim imports),
#   2. the kernel and model tests under the Triton interpreter (tests/kernels, tests/models),
#   3. the static kernel report (`fastmim bench kernels --static`: every kernel compiled for sm_80 / sm_90 with
#      triton 3.6, zero spill bytes required),
#   4. a tiny `fastmim bench step` on the CPU (both impls; the fast one on its torch fallbacks).
#
#   bash benchmarks/preflight.sh [OUT_DIR]      (default: a new temporary directory)
#
# Environment: PREFLIGHT_TORCH (2.11.0), PREFLIGHT_TRITON (3.6.0), PREFLIGHT_TORCHVISION (0.26.0, the release that
# pairs with that torch), PYTHON (python3.12), PREFLIGHT_VENV (default ~/.cache/fastmim/preflight-<versions>).
# The first run downloads about 3.3 GB of wheels (torch and its CUDA libraries: torch imports them even on a CPU).
# Exit status 0 only when every step passes; OUT_DIR receives preflight.log, the step logs and the JSON records.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH="${PREFLIGHT_TORCH:-2.11.0}" TRITON="${PREFLIGHT_TRITON:-3.6.0}" TORCHVISION="${PREFLIGHT_TORCHVISION:-0.26.0}"
PY="${PYTHON:-python3.12}"
VENV="${PREFLIGHT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastmim/preflight-py3.12-torch$TORCH-triton$TRITON}"
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
  # dependencies, which its --no-deps install does not bring. setuptools: for the --no-build-isolation install.
  # numpy < 2.4: triton 3.6's interpreter turns 1-element arrays into ints, which numpy 2.4 refuses (triton 3.8
  # squeezes them first); the tests run under that interpreter.
  pkgs=("torch==$TORCH" "triton==$TRITON" "torchvision==$TORCHVISION" "numpy<2.4" pillow tqdm matplotlib pytest
        timm "setuptools<82")
  start=$(date +%s)
  "$VENV/bin/pip" download -q -d "$wheels" "${pkgs[@]}" || { log "download failed"; exit 2; }
  log "downloaded $(du -sh "$wheels" | cut -f1) of wheels in $(( $(date +%s) - start )) s"
  start=$(date +%s)
  "$VENV/bin/pip" install -q --no-index --find-links "$wheels" "${pkgs[@]}" || { log "install failed"; exit 2; }
  rm -rf "$wheels"
  log "installed in $(( $(date +%s) - start )) s; venv $(du -sh "$VENV" | cut -f1)"
  touch "$VENV/.complete"
fi
PYV="$VENV/bin/python"
"$PYV" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3 | tee -a "$OUT_DIR/preflight.log"

step versions 120 "$PYV" -c "
import sys, torch, triton, fastmim, fastmim.kernels
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
assert torch.__version__.split('+')[0] == '$TORCH' and triton.__version__ == '$TRITON', 'not the pinned versions'
assert fastmim.__file__.startswith('$PWD/'), fastmim.__file__
for absent in ('deepspeed', 'ffcv', 'xformers'):
    assert __import__('importlib.util').util.find_spec(absent) is None, absent + ' is not on the GPU image'
"
step tests 1800 "$PYV" -m pytest -q -p no:cacheprovider tests/kernels tests/models
step static 900 "$PYV" -m fastmim bench kernels --static --out "$OUT_DIR"
step bench_step 600 "$PYV" -m fastmim bench step --model.img_size=32 --model.decoder_dim=32 --data.num_images=16 \
  --train.batch_size=4 --steps 2 --warmup 0 --breakdown-steps 1 --out "$OUT_DIR"
log "done (status $status); logs and records in $OUT_DIR"
exit $status
