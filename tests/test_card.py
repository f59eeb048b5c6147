"""The model card (dmd2.json): one pydantic model for every reader and writer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmd2_serve import BUNDLED_DIGITS_GENERATOR
from dmd2_serve.model.adapters import ModelFolderError, load_schedule, read_card
from dmd2_serve.model.card import CARD_FILE, ModelCard
from dmd2_train.config import DISTILL_PRESETS


def edited(tmp_path: Path, change) -> Path:
    """A copy of the bundled generator whose card ``change`` edits (a dict in, a dict out)."""
    folder = shutil.copytree(BUNDLED_DIGITS_GENERATOR, tmp_path / "gen")
    card = json.loads((folder / CARD_FILE).read_text())
    (folder / CARD_FILE).write_text(json.dumps(change(card)))
    return folder


def test_the_shipped_cards_read_and_round_trip(tmp_path: Path):
    card = read_card(BUNDLED_DIGITS_GENERATOR)
    assert card.is_generator and card.family == "digits" and card.timesteps == DISTILL_PRESETS["digits"]["timesteps"]
    assert card.version == 1 and card.prediction_type == "epsilon" and card.image_size == 8
    card.write(tmp_path)
    assert ModelCard.read(tmp_path / CARD_FILE) == card
    assert "lora" not in json.loads((tmp_path / CARD_FILE).read_text())  # unset fields are left out


@pytest.mark.parametrize("change, field", [
    (lambda c: {k: v for k, v in c.items() if k != "family"}, "field 'family' is missing"),
    (lambda c: c | {"timesteps": [400, 999]}, "field 'timesteps': Value error, must be strictly decreasing"),
    (lambda c: c | {"image_size": "big"}, "field 'image_size'"),
    (lambda c: c | {"prediction_type": "sample"}, "field 'prediction_type'"),
    (lambda c: c | {"timestep": [999]}, "field 'timestep' is not a model card field"),
    (lambda c: c | {"version": 2}, "field 'version'"),
    (lambda c: c | {"family": "sd9"}, "names family 'sd9'"),
])
def test_a_bad_card_is_refused_naming_the_field(tmp_path: Path, change, field):
    with pytest.raises(ModelFolderError, match=field):
        read_card(edited(tmp_path, change))


def test_a_card_that_disagrees_with_its_scheduler_is_refused(tmp_path: Path):
    folder = edited(tmp_path, lambda c: c | {"prediction_type": "v_prediction"})
    with pytest.raises(ModelFolderError, match="prediction_type 'v_prediction' but the scheduler config says 'epsilon'"):
        load_schedule(folder)


def test_the_server_refuses_a_bad_card_at_start(tmp_path: Path):
    folder = edited(tmp_path, lambda c: {k: v for k, v in c.items() if k != "family"})
    run = subprocess.run([sys.executable, "-m", "dmd2_serve", "--model", str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "field 'family' is missing" in run.stderr and "Traceback" not in run.stderr


def test_a_run_folder_points_at_its_generator(tmp_path: Path):
    """`--model runs/x` (or eval --generator runs/x) instead of runs/x/generator: said as such."""
    shutil.copytree(BUNDLED_DIGITS_GENERATOR, tmp_path / "run" / "generator")
    with pytest.raises(ModelFolderError, match="is a training run's folder; its exported generator is '.*generator'"):
        read_card(tmp_path / "run")
