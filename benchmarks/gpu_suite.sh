#!/usr/bin/env bash
# The GPU suite: one command on a GPU machine (its own python3 with torch, triton, timm, numpy, pytest; no network;
# no deepspeed / ffcv / xformers). Installs fastmim without dependencies, runs the gpu-marked tests, every kernel
# benchmark (benchmarks/bench_*.py) and `bench step` for LocalMIM ViT-B (reference eager, fast eager, fast compiled)
# and MAE ViT-B (eager, compiled), and LocalMIM Swin-B (reference vs fast, eager) at batch 256 in bf16, then writes
# a summary. Budget: about 12 minutes on one H100. Run benchmarks/preflight.sh on a CPU machine first: it checks these
# versions (Python 3.12, torch 2.11.0, triton 3.6.0) and compiles every kernel for sm_80 / sm_90 without a GPU.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]      (default: $OUT if set, else benchmarks/results/gpu-<date>)
#
# OUT_DIR receives: gpu_suite.tar.gz (every JSON and PNG), summary.md, pytest-gpu.log, suite.log. Commit the JSON
# files under benchmarks/results/ (see benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
# Real kernels, never the interpreter (tests/conftest.py defaults TRITON_INTERPRET to 1 for CPU runs).
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"
status=0
log() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/suite.log"; }

log "install"
"$PY" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3 | tee -a "$OUT_DIR/suite.log"
"$PY" -c "import torch, fastmim; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$OUT_DIR/suite.log" || { log "fastmim does not import or no GPU"; exit 1; }

log "pytest -m gpu"
timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT_DIR/pytest-gpu.log" 2>&1
rc=$?; tail -3 "$OUT_DIR/pytest-gpu.log" | tee -a "$OUT_DIR/suite.log"
# exit 5 = no gpu tests collected yet: not a failure of the suite
[ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1

for bench in benchmarks/bench_*.py; do
  log "$bench"
  timeout 150 "$PY" "$bench" --out "$WORK" --plot >> "$OUT_DIR/suite.log" 2>&1 || { log "FAILED: $bench"; status=1; }
done

# LocalMIM: the reference as released (eager) vs the fast impl eager and compiled (the headline figure);
# MAE on the same stack, eager and compiled, for the LocalMIM-vs-MAE cost ratio.
for spec in "localmim_vit_base_patch16 reference+eager,fast+eager,fast+compile" \
            "mae_vit_base_patch16 reference+eager,reference+compile"; do
  set -- $spec
  log "bench step $1 ($2)"
  timeout 300 "$PY" -m fastmim bench step --config vit_base_100 --model.name="$1" --impls "$2" --model.target= \
    --model.nbins=0 --train.batch_size=256 --train.accum_steps=1 --train.precision=bf16 --data.source=synthetic \
    --data.num_workers=0 --data.num_images=256 --fixed-batch --steps 20 --warmup 5 --out "$WORK" --plot \
    >> "$OUT_DIR/suite.log" 2>&1 || { log "FAILED: bench step $1"; status=1; }
done

# LocalMIM-Swin-B, the swin_base_hog_400 recipe (HOG 18 bins + bias): impl=fast = the HOG kernel, heads on masked
# units only and the fused loss kernel (issue #10).
log "bench step localmim_swin_base_patch4_window7 (reference+eager,fast+eager)"
timeout 300 "$PY" -m fastmim bench step --config swin_base_hog_400 --impls reference+eager,fast+eager \
  --train.batch_size=256 --train.accum_steps=1 --train.precision=bf16 --data.source=synthetic --data.num_workers=0 \
  --data.num_images=256 --fixed-batch --steps 20 --warmup 5 --out "$WORK" --plot >> "$OUT_DIR/suite.log" 2>&1 \
  || { log "FAILED: bench step localmim_swin_base_patch4_window7"; status=1; }

"$PY" -m fastmim.bench.summary "$WORK" > "$OUT_DIR/summary.md" 2>&1
tar -czf "$OUT_DIR/gpu_suite.tar.gz" -C "$WORK" .
log "done (status $status); results in $OUT_DIR"
cat "$OUT_DIR/summary.md"
exit $status
