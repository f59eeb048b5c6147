"""./kernels installs as dmd2_kernels and can never shadow Hugging Face's `kernels` package."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_distribution_declares_dmd2_kernels_not_kernels() -> None:
    top = (importlib.metadata.distribution("dmd2-fast").read_text("top_level.txt") or "").split()
    assert "dmd2_kernels" in top and "kernels" not in top
    assert not (ROOT / "kernels" / "__init__.py").exists(), "a regular package here would shadow HF's kernels"


def test_a_regular_kernels_package_wins_even_from_the_repository_root(tmp_path: Path) -> None:
    # A stand-in for Hugging Face's `kernels`, installed after the current directory on sys.path.
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def get_kernel(name):\n    return 'hub:' + name\n")
    code = "import kernels, dmd2_kernels.renoise as r; print(kernels.get_kernel('x'), r.__name__)"
    assert _python(code, ROOT, PYTHONPATH=str(tmp_path / "site")).split() == ["hub:x", "dmd2_kernels.renoise"]


def test_diffusers_probe_sees_only_a_real_kernels_distribution() -> None:
    try:
        importlib.metadata.distribution("kernels")
        expected = "True"
    except importlib.metadata.PackageNotFoundError:
        expected = "False"
    code = "from diffusers.utils import is_kernels_available; print(is_kernels_available())"
    assert _python(code, ROOT).splitlines()[-1] == expected
