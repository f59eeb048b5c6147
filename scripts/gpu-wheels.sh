#!/usr/bin/env bash
# The wheels scripts/gpu-bench.sh installs on a lent GPU host (which has torch, triton, accelerate and
# transformers, no PyPI): downloaded into .whl/ (git-ignored; a new checkout has none), each at the
# version this venv holds, for the host's Python 3.12 on x86_64. Run here, in the repository root,
# before the first device call of a session:
#
#   bash scripts/gpu-wheels.sh [DIR]        (default .whl; ~23 wheels, ~18 MB)
#
# fastapi needs opentelemetry-api and annotated-doc, importlib_metadata needs lazy-importer,
# litserve asks for uvicorn[standard] (httptools, python-dotenv, watchfiles, websockets).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
packages=(diffusers importlib_metadata zipp pydantic pydantic-core annotated-types typing-inspection torchao
          litserve fastapi starlette uvicorn pyzmq python-multipart braceexpand lazy-importer opentelemetry-api
          annotated-doc httptools python-dotenv watchfiles websockets fastapi-offline)
pinned=()
for name in "${packages[@]}"; do
  version=$(python3 -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  pinned+=("$name${version:+==$version}")  # not installed here: the newest release
done
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dest" "${pinned[@]}"
ls "$dest" | wc -l | xargs -I{} echo "{} wheels in $dest: carry=[\"$dest\"] on the device call"
