"""Real-scale evaluation (FID, patch-FID, CLIP score) against hand computations, with tiny stand-ins
for the Inception network and for CLIP."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from dmd2_serve.bench.random_folder import write_byte_clip_tokenizer
from dmd2_train.fid_protocol import FidProtocol, InceptionFeatures
from dmd2_train.realscale import ClipScore, EvalError, score_real_scale

CAPTIONS = [f"a photo of thing {i}" for i in range(16)]


class StandInLayers(torch.nn.Module):
    """Per channel: mean, mean square and mean absolute horizontal step of the normalised pixels
    (sharpness, which the resize filter changes): (N, 3, H, W) -> (N, 9, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = (x[..., 1:] - x[..., :-1]).abs().mean((2, 3))
        return torch.cat([x.mean((2, 3)), (x * x).mean((2, 3)), step], 1)[..., None, None]


class StandInInception(torch.nn.Module):
    """The call structure of inception-2015-12-05.pt: ``forward(img, return_features)`` and ``layers``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = StandInLayers()

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((img.float() - 128) / 128).flatten(1)


def hand_features(image: Image.Image, size: int, resample: int, patch: bool = False) -> np.ndarray:
    """The stand-in's features of one image under the official protocol, written out in numpy."""
    w, h = image.size
    side = 299 if patch else min(w, h)
    left, top = round((w - side) / 2), round((h - side) / 2)
    crop = image.crop((left, top, left + side, top + side))
    small = np.asarray(crop if patch else crop.resize((size, size), resample))
    x = np.stack([np.asarray(Image.fromarray(small[..., c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
                  for c in range(3)]).clip(0, 255).astype(np.float64)
    x = (x - 128) / 128  # (3, 299, 299)
    return np.concatenate([x.mean((1, 2)), (x * x).mean((1, 2)), np.abs(np.diff(x, axis=2)).mean((1, 2))])


def hand_fid(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                 - 2 * np.trace(linalg.sqrtm(s_a @ s_b).real))


def random_pixels(n: int, h: int, w: int, seed: int, low: int = 0, high: int = 256) -> np.ndarray:
    """(n, h, w, 3) uint8 images with a per-image brightness, so that the features spread."""
    rng = np.random.default_rng(seed)
    base = rng.integers(low, high, (n, 1, 1, 3))
    return (base + rng.integers(-40, 40, (n, h, w, 3))).clip(0, 255).astype(np.uint8)


def write_folder(folder: Path, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    return folder


def sampler_of(pixels: np.ndarray):
    """A 'generator' whose images cast back to exactly ``pixels`` (bin centres survive truncation)."""
    images = torch.from_numpy(pixels.astype(np.float32) + 0.5).permute(0, 3, 1, 2) / 127.5 - 1

    def sample(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return images[seeds]

    return sample


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("realscale")
    inception = root / "inception.pt"
    torch.jit.script(StandInInception()).save(str(inception))
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    tok = write_byte_clip_tokenizer(root / "clip", max_length=16)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": len(tok) - 2,
                     "eos_token_id": len(tok) - 1, "pad_token_id": len(tok) - 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    processor.save_pretrained(root / "clip")
    return {"inception": inception, "captions": captions, "clip": root / "clip", "root": root}


@pytest.fixture(scope="module")
def odd_sets(inputs: dict[str, Path]) -> tuple[Path, np.ndarray]:
    """16 reference images of 47x36 on disk; 16 brighter generated ones of 36x45 (both need a crop)."""
    reference = write_folder(inputs["root"] / "odd", random_pixels(16, 36, 47, seed=1))
    return reference, random_pixels(16, 45, 36, seed=2, low=60)


def test_fid_matches_a_hand_computed_reference_for_each_resize_filter(inputs: dict[str, Path],
                                                                      odd_sets: tuple[Path, np.ndarray]) -> None:
    reference, generated = odd_sets
    fids = {}
    for name, resample in (("lanczos", Image.LANCZOS), ("bilinear", Image.BILINEAR)):
        protocol = FidProtocol(eval_resolution=24, resize_filter=name)
        scores = score_real_scale(sampler_of(generated), inputs["captions"], reference, inputs["inception"],
                                  protocol=protocol, batch_size=5, workers=2)
        real = np.stack([hand_features(Image.open(p).convert("RGB"), 24, resample)
                         for p in sorted(reference.glob("*.png"))])
        fake = np.stack([hand_features(Image.fromarray(p), 24, resample) for p in generated])
        expected = hand_fid(fake, real)
        assert scores.fid == pytest.approx(expected, rel=1e-6, abs=1e-6), name
        assert (scores.images, scores.reference_images, scores.image_size) == (16, 16, [45, 36])
        fids[name] = scores.fid
    assert fids["lanczos"] > 0.01
    # the filter is applied: the two differ by far more than float error
    assert abs(fids["lanczos"] - fids["bilinear"]) > 1e-3 * fids["lanczos"]


def test_fid_is_zero_against_itself_and_grows_with_a_brightness_shift(inputs: dict[str, Path]) -> None:
    pixels = random_pixels(16, 40, 40, seed=3, low=40, high=200)
    reference = write_folder(inputs["root"] / "square", pixels)
    protocol = FidProtocol(eval_resolution=32)

    def fid(shift: int) -> float:
        shifted = (pixels.astype(np.int16) + shift).clip(0, 255).astype(np.uint8)
        return score_real_scale(sampler_of(shifted), inputs["captions"], reference, inputs["inception"],
                                protocol=protocol, batch_size=8, workers=2).fid

    same, near, far = fid(0), fid(10), fid(40)
    assert abs(same) < 1e-6
    assert near > 1e-3 and far > 4 * near


def test_patch_fid_scores_the_centre_299_of_the_full_image(inputs: dict[str, Path]) -> None:
    size, centre = 331, slice(16, 315)  # the centred 299 of 331 starts at round(32 / 2) = 16
    pixels = random_pixels(12, size, size, seed=4, low=40, high=200)
    reference = write_folder(inputs["root"] / "large", pixels)
    protocol = FidProtocol(eval_resolution=64, patch_fid=True, num_images=12)
    new_border = pixels.copy()
    new_border[:, :16] = new_border[:, -16:] = new_border[:, :, :16] = new_border[:, :, -16:] = 255
    new_centre = pixels.copy()
    new_centre[:, centre, centre] = (pixels[:, centre, centre].astype(np.int16) + 50).clip(0, 255)

    def scores(generated: np.ndarray) -> tuple[float, float]:
        s = score_real_scale(sampler_of(generated), inputs["captions"], reference, inputs["inception"],
                             protocol=protocol, batch_size=6, workers=2)
        assert s.protocol["patch_fid"] is True and s.protocol["patch_size"] == 299
        return s.fid, s.patch_fid

    border_fid, border_patch = scores(new_border)
    centre_fid, centre_patch = scores(new_centre)
    assert border_fid > 1e-3 and abs(border_patch) < 1e-6  # the border is outside the patch
    assert centre_patch > 1e-2 and centre_fid > 1e-3
    expected = hand_fid(*(np.stack([hand_features(Image.fromarray(p), 64, Image.LANCZOS, patch=True) for p in images])
                          for images in (new_centre, pixels)))
    assert centre_patch == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_patch_fid_refuses_images_smaller_than_299(inputs: dict[str, Path],
                                                   odd_sets: tuple[Path, np.ndarray]) -> None:
    reference, generated = odd_sets
    with pytest.raises(EvalError, match=r"centre 299x299.*36x45.*--no-patch-fid"):
        score_real_scale(sampler_of(generated), inputs["captions"], reference, inputs["inception"],
                         protocol=FidProtocol(patch_fid=True), workers=2)


def test_the_output_records_every_setting_and_the_file_hashes(inputs: dict[str, Path],
                                                              odd_sets: tuple[Path, np.ndarray]) -> None:
    reference, generated = odd_sets
    protocol = FidProtocol(eval_resolution=20, resize_filter="bicubic", num_images=10)
    out = json.loads(json.dumps(score_real_scale(
        sampler_of(generated), inputs["captions"], reference, inputs["inception"], inputs["clip"],
        protocol=protocol, batch_size=4, workers=2).as_dict()))
    assert out["images"] == 10 and out["reference_images"] == 16 and out["image_size"] == [45, 36]
    p = out["protocol"]
    assert (p["eval_resolution"], p["resize_filter"], p["num_images"], p["patch_fid"]) == (20, "bicubic", 10, False)
    assert "centre square" in p["crop"] and "bicubic" in p["inception_input"] and "truncated" in p["quantisation"]
    assert p["clip_prompt_prefix"] == "A photo depicts " and p["clip_image_resolution"] == 256
    assert out["patch_fid"] is None and -1 <= out["clip_score"] <= 1
    files = out["inputs"]
    assert files["inception_sha256"] == hashlib.sha256(inputs["inception"].read_bytes()).hexdigest()
    weights = inputs["clip"] / "model.safetensors"
    assert files["clip"] == str(inputs["clip"])
    assert files["clip_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_clip_score_is_the_cosine_with_the_official_prefix_and_crop(inputs: dict[str, Path]) -> None:
    from transformers import CLIPModel, CLIPProcessor

    images = [Image.fromarray(p) for p in random_pixels(3, 40, 64, seed=5)]
    captions = ["a red cube", "a small dog", "a city"]
    got = ClipScore(inputs["clip"])(images, captions)
    model, processor = CLIPModel.from_pretrained(inputs["clip"]).eval(), CLIPProcessor.from_pretrained(inputs["clip"])
    squares = [im.crop((12, 0, 52, 40)).resize((256, 256), Image.LANCZOS) for im in images]
    batch = processor(text=[f"A photo depicts {c}" for c in captions], images=squares, return_tensors="pt",
                      padding=True, truncation=True, max_length=16)  # the official cut: 77 tokens, EOT kept
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output
    expected = (image / image.norm(dim=1, keepdim=True) * text / text.norm(dim=1, keepdim=True)).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_family_defaults_are_the_official_runs_and_flags_override_them() -> None:
    assert FidProtocol.for_family("sd15") == FidProtocol(256, "lanczos", False, 30_000)
    assert FidProtocol.for_family("sdxl") == FidProtocol(512, "lanczos", True, 10_000)
    assert FidProtocol.for_family("sdxl", 1024, "bicubic", False, 50) == FidProtocol(1024, "bicubic", False, 50)
    with pytest.raises(EvalError, match="lanczos, bicubic"):
        FidProtocol(resize_filter="sinc")
    with pytest.raises(EvalError, match="256 for SD1.5"):
        FidProtocol(eval_resolution=0)


def test_eval_cli_scores_an_sd15_teacher_at_real_scale(sd15_teacher: Path, inputs: dict[str, Path],
                                                       odd_sets: tuple[Path, np.ndarray]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dmd2_train", "eval", "--teacher", str(sd15_teacher), "--steps", "2", "--guidance", "1",
         "--captions", str(inputs["captions"]), "--reference", str(odd_sets[0]),
         "--inception", str(inputs["inception"]), "--clip", str(inputs["clip"]), "--num", "8",
         "--batch-size", "4", "--eval-resolution", "32", "--resize-filter", "bicubic"],
        capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    scores = json.loads(out.stdout)
    assert scores["images"] == 8 and scores["reference_images"] == 16
    assert scores["protocol"]["eval_resolution"] == 32 and scores["protocol"]["resize_filter"] == "bicubic"
    assert scores["protocol"]["patch_fid"] is False and scores["patch_fid"] is None  # sd15's default
    assert math.isfinite(scores["fid"]) and scores["fid"] > 1e-3  # random teacher vs random images
    assert -1 <= scores["clip_score"] <= 1 and scores["ms_per_image"] > 0


def test_real_scale_mistakes_are_one_line_errors(sd15_teacher: Path, inputs: dict[str, Path],
                                                 odd_sets: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dmd2_train", "eval", "--teacher", str(sd15_teacher), *extra],
                              capture_output=True, text=True, timeout=300, check=False)

    real = ("--captions", str(inputs["captions"]), "--reference", str(odd_sets[0]))
    no_captions = run()
    assert no_captions.returncode == 2 and "--captions" in no_captions.stderr
    missing = run(*real, "--inception", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "inception-2015-12-05.pt" in missing.stderr
    bad_filter = run(*real, "--inception", str(inputs["inception"]), "--resize-filter", "sinc")
    assert bad_filter.returncode == 2 and "lanczos" in bad_filter.stderr
    for result in (missing, bad_filter):
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")
    with pytest.raises(EvalError, match="not a TorchScript file"):
        (tmp_path / "bad.pt").write_text("not a model")
        InceptionFeatures(tmp_path / "bad.pt")
    torch.jit.script(StandInLayers()).save(str(tmp_path / "other.pt"))
    with pytest.raises(EvalError, match="not the FID Inception"):
        InceptionFeatures(tmp_path / "other.pt")
    with pytest.raises(EvalError, match="CLIP folder .* does not exist"):
        ClipScore(tmp_path / "no-clip")
    with pytest.raises(EvalError, match="does not exist"):
        score_real_scale(sampler_of(odd_sets[1]), inputs["captions"], tmp_path / "no-images", inputs["inception"])
