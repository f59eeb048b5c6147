"""dmd2_serve: run few-step generators. A library first (sampling, adapters, folder loading)."""

from pathlib import Path

# The generator distilled from the bundled digits teacher by ``python -m dmd2_train --preset digits``.
BUNDLED_DIGITS_GENERATOR = Path(__file__).parent / "assets" / "digits-generator"
