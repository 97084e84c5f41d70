#!/usr/bin/env bash
# gpu_check.sh: every GPU-only figure of bayesdyn in one prepared command, for a bare machine with
# one H100 or H200 and no network, in about 9 minutes. It writes one results folder:
#   summary.txt (stage, status, seconds), RESULTS.md (the figures, as benchmarks/RESULTS.md
#   sections: copy them there), and one log per stage.
#
# Stages: (1) the CUDA tests; (2) every bench_* script on cuda; (3) training throughput of
# DUN-ResNet-18 against ResNet-18 (images/s, batch 256, fp32 and bf16 channels-last);
# (4) a short reproduction: DUN vs deterministic ResNet-18 on Fashion-MNIST, 2 seeds, 15 epochs,
# DUN's recipe with random-crop augmentation, bf16 channels-last.
#
# Usage:
#   benchmarks/gpu_check.sh [--wheels DIR] [--out DIR]     # on the GPU machine
#   benchmarks/gpu_check.sh --dry [--out DIR]              # every stage at toy size on the CPU
#
# The GPU machine has no network. Its Python image brings torch with CUDA; what it lacks comes
# from a folder of wheels made beforehand on a machine with network, the same Python version and
# platform (linux x86_64), from the repository root:
#   python3.12 -m pip download -d wheels -c constraints.txt ".[dev]"
# and copied beside the repository (or carried with it). Fashion-MNIST must be in
# $BAYESDYN_DATA or /usr/share/datasets/fashion-mnist (the four IDX files); without it stage 4
# runs on digits and says so.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
WHEELS=""
OUT="gpu-check-$(date -u +%Y%m%d-%H%M)"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export BAYESDYN_RESULTS="$OUT/RESULTS.md" MPLBACKEND=Agg

if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-}"  # the environment the tests run in, else the project's .venv
  [ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
  DEVICE=cpu
  export BAYESDYN_BENCH_QUICK=1 OMP_NUM_THREADS=1
else
  PY=python3
  if [ -n "$WHEELS" ]; then  # the image's torch, the rest from the wheels
    python3 -m venv --system-site-packages "$OUT/venv"
    "$OUT/venv/bin/pip" install -q --no-index --find-links "$WHEELS" --no-deps -e . &&
      "$OUT/venv/bin/pip" install -q --no-index --find-links "$WHEELS" pyro-ppl arviz h5netcdf \
        h5py scikit-learn tqdm ipywidgets pytest nbclient nbformat ipykernel jupytext
    PY="$OUT/venv/bin/python"
  fi
  DEVICE=cuda
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check.sh: no CUDA device visible to $PY (use --dry on a machine without one)" >&2
    exit 2; }
fi

FAILED=0
stage() {  # stage NAME COMMAND...: run, log, time, never stop the others
  local name="$1"; shift
  local started=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then status=ok; else status=FAILED; FAILED=1; fi
  printf '%-14s %-7s %4ds\n' "$name" "$status" $((SECONDS - started)) | tee -a "$OUT/summary.txt"
}

B=benchmarks
if [ "$DRY" = 1 ]; then
  stage cuda-tests   "$PY" -m pytest -q tests/test_cuda.py -p no:cacheprovider
  stage bench-fit    "$PY" $B/bench_fit_overhead.py --device $DEVICE --rounds 1
  stage bench-depth  "$PY" $B/bench_depth_step.py --device $DEVICE --width 32 --blocks 2 --batch 32
  stage bench-nested "$PY" $B/bench_nested.py --device $DEVICE --batch 8
  stage bench-scale  "$PY" $B/bench_scale.py --device $DEVICE --epochs 2 --examples 512 --width 16
  stage throughput   "$PY" $B/bench_throughput.py --device $DEVICE --width 4 --batch 16 --size 16 \
                       --steps 1 --rounds 1
  stage repro-depth  "$PY" $B/repro_depth.py --dataset digits --arch resnet18 --width 4 \
                       --epochs 1 --seeds 1 --train-size 256 --warmup 0 --dun-recipe \
                       --device $DEVICE --no-record
else
  stage cuda-tests   "$PY" -m pytest -q tests/test_cuda.py -p no:cacheprovider
  stage bench-fit    "$PY" $B/bench_fit_overhead.py --device cuda
  stage bench-depth  "$PY" $B/bench_depth_step.py --device cuda
  stage bench-nested "$PY" $B/bench_nested.py --device cuda
  stage bench-scale  "$PY" $B/bench_scale.py --device cuda --epochs 3 --examples 60000 --width 512
  stage throughput   "$PY" $B/bench_throughput.py --device cuda
  dataset=fashion-mnist
  "$PY" -c "from bayesdyn.data.ood import fashion_available as f; import sys; sys.exit(0 if f() else 1)" ||
    { dataset=digits; echo "Fashion-MNIST not found: stage repro-depth runs on digits" | tee -a "$OUT/summary.txt"; }
  stage repro-depth  "$PY" $B/repro_depth.py --dataset $dataset --arch resnet18 --width 64 \
                       --epochs 15 --seeds 2 --warmup 1 --dun-recipe --batch-size 256 \
                       --precision bf16 --channels-last --device cuda
fi
echo "results in $OUT"
exit $FAILED
