#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call on a lent card (under 8 minutes):
# the training benchmark first (python -m dmd2_train.bench), then the serving one
# (python -m dmd2_serve.bench), each within its own time budget; both print their tables and
# write their JSON under $OUT (or docs/bench).
#
# The GPU host has torch, triton, accelerate and transformers; the rest travels as wheels in
# .whl/ (git-ignored). Made here, in the repository root, with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers importlib_metadata zipp pydantic pydantic-core annotated-types typing-inspection torchao
# then: run(command="bash scripts/gpu-bench.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# dmd2_kernels is ./kernels installed under another name (pyproject's package-dir): link it.
mkdir -p /tmp/k && ln -sfn "$PWD/kernels" /tmp/k/dmd2_kernels
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/k:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-docs/bench}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
day=$(date +%Y-%m-%d)
python3 -m dmd2_train.bench --budget-s "${TRAIN_BUDGET_S:-330}" --out "$out/train-$card-$day.json"
python3 -m dmd2_serve.bench --budget-s "${SERVE_BUDGET_S:-120}" --skip-cold-start --archs sd15,sdxl --batches 1 \
  --out "$out/serve-$card-$day.json"
