#!/usr/bin/env bash
# checkov (tests/test_deploy.py) pins networkx<2.7 and packaging<24, older than torch's stack, so it
# lives in its own virtual environment under build/ (git-ignored). Idempotent; about 30 s the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/checkov/bin/checkov ] || { python -m venv build/checkov && build/checkov/bin/pip install -q "checkov>=3.2,<4"; }
