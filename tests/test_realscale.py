"""Real-scale evaluation (FID, CLIP score) with tiny local stand-ins for Inception and CLIP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder, write_tiny_clip_tokenizer

from dmd2_train.realscale import EvalError, InceptionFeatures, read_reference, score_real_scale

CAPTIONS = ["a red cube", "a small dog", "a city", "a blue car", "two cats", "a tree",
            "a boat", "a lamp", "a green hat", "a bird", "a house", "a cup"]


class TinyInception(torch.nn.Module):
    """Same call signature as the TorchScript FID Inception: (uint8 NCHW, return_features) -> features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(12, 6)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)
        return self.proj(pooled)


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("realscale")
    inception = root / "inception.pt"
    torch.jit.script(TinyInception()).save(str(inception))
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    reference = write_image_folder(root / "coco", n=12, size=24)
    tok = write_tiny_clip_tokenizer(root / "clip")
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": len(tok) - 2,
                     "eos_token_id": len(tok) - 1, "pad_token_id": len(tok) - 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    processor.save_pretrained(root / "clip")
    return {"inception": inception, "captions": captions, "reference": reference, "clip": root / "clip"}


def reference_sampler(folder: Path, size: int):
    """A 'generator' that returns the reference images themselves (in [-1, 1])."""
    real = torch.cat(list(read_reference(folder, size, batch_size=64)))

    def sample(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return real[seeds].float() / 127.5 - 1

    return sample


def test_fid_is_zero_for_the_reference_itself_and_large_for_noise(eval_inputs: dict[str, Path]) -> None:
    same = score_real_scale(reference_sampler(eval_inputs["reference"], 16), eval_inputs["captions"],
                            eval_inputs["reference"], eval_inputs["inception"], batch_size=5)
    assert same.images == 12 and same.reference_images == 12 and same.clip_score is None
    assert abs(same.fid) < 1e-3

    def noise(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return torch.rand(len(seeds), 3, 16, 16, generator=torch.Generator().manual_seed(seeds[0])) * 0.2 + 0.7

    far = score_real_scale(noise, eval_inputs["captions"], eval_inputs["reference"], eval_inputs["inception"])
    assert far.fid > 100 * max(same.fid, 1e-6) and far.fid > 0.01


def test_eval_cli_scores_an_sd15_teacher_at_real_scale(sd15_teacher: Path, eval_inputs: dict[str, Path]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dmd2_train", "eval", "--teacher", str(sd15_teacher), "--steps", "2", "--guidance", "1",
         "--captions", str(eval_inputs["captions"]), "--reference", str(eval_inputs["reference"]),
         "--inception", str(eval_inputs["inception"]), "--clip", str(eval_inputs["clip"]), "--num", "8",
         "--batch-size", "4"], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    scores = json.loads(out.stdout)
    assert scores["images"] == 8 and scores["reference_images"] == 12
    assert math.isfinite(scores["fid"]) and scores["fid"] >= 0
    assert math.isfinite(scores["clip_score"]) and scores["ms_per_image"] > 0


def test_real_scale_mistakes_are_one_line_errors(sd15_teacher: Path, eval_inputs: dict[str, Path],
                                                 tmp_path: Path) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dmd2_train", "eval", "--teacher", str(sd15_teacher), *extra],
                              capture_output=True, text=True, timeout=300, check=False)

    no_captions = run()
    assert no_captions.returncode == 2 and "--captions" in no_captions.stderr
    missing = run("--captions", str(eval_inputs["captions"]), "--reference", str(eval_inputs["reference"]),
                  "--inception", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "inception-2015-12-05.pt" in missing.stderr
    assert "Traceback" not in missing.stderr
    with pytest.raises(EvalError, match="not a TorchScript file"):
        (tmp_path / "bad.pt").write_text("not a model")
        InceptionFeatures(tmp_path / "bad.pt")
