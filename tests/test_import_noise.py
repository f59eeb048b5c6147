"""Optional libraries' import-time noise is dropped; their other warnings are not."""

import enum
import importlib.util
import logging
import subprocess
import sys

import pytest

import dmd2_serve  # noqa: F401  (installs the filters)

ENUM_NOTICE = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. Calling"
               " register_constant() on Enum subclasses is deprecated and will be an error in a future release.")


class _Kept(logging.Handler):
    """Collects what passes each logger's own filters, whether or not the logger propagates to the root.

    Once ``torch._logging`` is set up (any earlier compile in the same process), torch's loggers stop
    propagating, so pytest's ``caplog`` on the root would see nothing of them.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_known_import_noise_is_dropped() -> None:
    theirs = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common.kernel_preference")
    others = enum.Enum("Mode", "A", module="somelib.config")
    names = ["torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"]
    kept, levels = _Kept(), {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).addHandler(kept)
        logging.getLogger(name).setLevel(logging.WARNING)  # whatever an earlier test's torch._logging set
    try:
        logging.getLogger("torchao").warning("Failed to load /venv/site-packages/torchao/_C_mxfp8.abi3.so: no")
        logging.getLogger("torchao").warning("Skipping import of cpp extensions due to incompatible torch version")
        logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning(
            "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`")
        logging.getLogger("torch.utils._pytree").warning(ENUM_NOTICE, theirs)
        logging.getLogger("torch.utils._pytree").warning(ENUM_NOTICE, others)  # another library's: kept
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(kept)
            logging.getLogger(name).setLevel(levels[name])
    assert kept.messages == [
        "Skipping import of cpp extensions due to incompatible torch version", ENUM_NOTICE % others]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_a_diffusers_model_import_with_torchao_installed_says_nothing() -> None:
    """What every start of the server and the trainer printed: torchao's kernels built for another torch."""
    def stderr(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              check=True).stderr

    imports = "from diffusers import UNet2DConditionModel; import torchao"
    plain = stderr(imports)
    if "Failed to load" not in plain and "Unable to import `torchao`" not in plain:
        pytest.skip("this torchao and diffusers import quietly: nothing to drop")
    quiet = stderr("import dmd2_serve; " + imports)
    assert "Failed to load" not in quiet and "Unable to import `torchao`" not in quiet, quiet[-2000:]
    assert "Enum subclass" not in quiet, quiet[-2000:]
