"""Optional libraries' import-time noise is dropped; their other warnings are not."""

import importlib.util
import logging
import subprocess
import sys

import pytest

import dmd2_serve  # noqa: F401  (installs the filters)


def test_only_the_known_import_noise_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /venv/site-packages/torchao/_C_mxfp8.abi3.so: no")
        logging.getLogger("torchao").warning("Skipping import of cpp extensions due to incompatible torch version")
        logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning(
            "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`")
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an opaque"
            " value type.")
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping import of cpp extensions due to incompatible torch version"]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_a_diffusers_model_import_with_torchao_installed_says_nothing() -> None:
    """What every start of the server and the trainer printed: torchao's kernels built for another torch."""
    code = "import dmd2_serve; from diffusers import UNet2DConditionModel; import torchao"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "Failed to load" not in run.stderr and "Unable to import `torchao`" not in run.stderr, run.stderr[-2000:]
    assert "Enum subclass" not in run.stderr, run.stderr[-2000:]
