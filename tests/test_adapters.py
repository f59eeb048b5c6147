"""The backbone adapters: the registry is the only place that knows a model family."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import dmd2_serve
import dmd2_train
from dmd2_serve.model import adapters
from dmd2_serve.model.adapters import ADAPTERS, ModelFolderError, load_backbone, read_card
from dmd2_serve.model.adapters.sd import StableDiffusionBackbone

# A branch on a family outside the adapters package: `family == ...`, `... in ("sd15", ...)`.
FAMILY_BRANCH = re.compile(r"family\s*(==|!=|\bin\b)|(==|!=)\s*[\"'](digits|sd15|sdxl)[\"']|"
                           r"[\"'](digits|sd15|sdxl)[\"']\s*(==|!=)")


def test_no_family_branches_outside_the_adapters():
    roots = [Path(dmd2_serve.__file__).parent, Path(dmd2_train.__file__).parent]
    inside = Path(adapters.__file__).parent
    found = [f"{path}:{n}: {line.strip()}" for root in roots for path in root.rglob("*.py")
             if inside not in path.parents
             for n, line in enumerate(path.read_text().splitlines(), 1) if FAMILY_BRANCH.search(line)]
    assert not found, "\n".join(found)


def test_the_registry_tells_the_families_apart(digits_teacher: Path, sd15_teacher: Path, sdxl_teacher: Path):
    assert [read_card(f).family for f in (digits_teacher, sd15_teacher, sdxl_teacher)] == ["digits", "sd15", "sdxl"]
    for family, cls in ADAPTERS.items():
        assert cls.family == family and cls.title


def test_a_new_family_is_one_adapter(sd15_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class ToyBackbone(StableDiffusionBackbone):
        family = "toy"
        title = "a toy family"
        pipeline_classes = ("ToyPipeline",)

        @classmethod
        def size_rule(cls, native: int, width: int, height: int) -> str | None:
            return None if (width, height) == (native, native) else f"only {native}x{native}"

    folder = shutil.copytree(sd15_teacher, tmp_path / "toy")
    index = json.loads((folder / "model_index.json").read_text())
    # an unknown class with a part no family has (else the SD family's parts would claim it)
    index |= {"_class_name": "ToyPipeline", "prior": ["diffusers", "PriorTransformer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="ToyPipeline, which is not supported; supported teachers:"):
        read_card(folder)
    monkeypatch.setitem(ADAPTERS, "toy", ToyBackbone)
    assert read_card(folder).family == "toy"
    backbone = load_backbone(folder)
    assert isinstance(backbone, ToyBackbone) and backbone.image_size == 16
    assert adapters.adapter("toy").size_rule(16, 32, 32) == "only 16x16"


def test_request_sizes_are_the_adapters_rule():
    digits, sd = adapters.adapter("digits"), adapters.adapter("sd15")
    assert digits.size_rule(8, 64, 64) is None and "square multiples of 8" in digits.size_rule(8, 64, 32)
    assert digits.render_size(8, 64, 64) == (8, 8)
    assert sd.size_rule(512, 768, 512) is None and "multiples of 64" in sd.size_rule(512, 500, 512)
    assert sd.render_size(512, 768, 512) == (768, 512)


def test_unsupported_families_are_refused_with_what_is_supported(tmp_path: Path):
    for name in ("StableDiffusion3Pipeline", "FluxPipeline"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name, "transformer": ["d", "x"]}))
        with pytest.raises(ModelFolderError, match="flow matching.*supported teachers: .*Stable Diffusion XL"):
            read_card(folder)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_prompt_encoding_builds_no_autograd_graph(family: str, sd15_teacher: Path, sdxl_teacher: Path) -> None:
    """encode_prompts runs under no_grad, whatever the encoders' weights say (they serve text_encoders() too)."""
    backbone = load_backbone({"sd15": sd15_teacher, "sdxl": sdxl_teacher}[family])
    for module in backbone.text_encoders():
        module.requires_grad_(True)
    cond = backbone.encode_prompts(["a red cube"])
    assert not cond.hidden.requires_grad and not any(v.requires_grad for v in cond.added.values())
