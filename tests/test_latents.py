"""encode-latents (kill and resume, the process split, the teacher check) and training on streamed data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides
from safetensors.torch import load_file
from test_cli import assert_user_error
from test_datasets import truncated_jpeg, write_captioned_folder, write_shards

from dmd2_train import checkpoint as ckpt
from dmd2_train.config import DistillConfig
from dmd2_train.data import DataError
from dmd2_train.latents import encode_latents, process_split, shards_of
from dmd2_train.loop import distill

FAST = ["batch_size=2", "ratio=2", "warmup_steps=1", "preview_every=1000", "log_every=1", "preview_prompts=[a 1]"]


def shard_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("latents-*.safetensors"))}


@pytest.fixture(scope="module")
def latent_folder(sd15_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The captioned test folder (5 images, 1 truncated, 1 uncaptioned) encoded in shards of 2."""
    root = tmp_path_factory.mktemp("latents")
    images = write_captioned_folder(root / "images")
    report = encode_latents(sd15_teacher, images, root / "latents", batch_size=2, shard_size=2, workers=0)
    assert (report.written, report.kept, report.samples, report.skipped, report.uncaptioned) == (3, 0, 4, 1, 1)
    return root / "latents"


def test_encode_latents_stores_mean_std_and_captions(latent_folder: Path, sd15_teacher: Path):
    from dmd2_serve.model.adapters import load_backbone
    from dmd2_train.datasets import load_image

    manifest = json.loads((latent_folder / "latents.json").read_text())
    assert manifest["shards"] == 3 and manifest["samples"] == 5 and manifest["sample_shape"] == [4, 8, 8]
    shards = shard_tensors(latent_folder)
    assert [len(t["mean"]) for t in shards.values()] == [1, 2, 1]  # the truncated JPEG left out of shard 0
    first = shards["latents-000000.safetensors"]
    assert first["mean"].dtype == first["std"].dtype == torch.float16
    mean, std = load_backbone(sd15_teacher).encode_distribution(
        load_image(latent_folder.parent / "images" / "a" / "one.png", 16, 3)[None])
    torch.testing.assert_close(first["mean"].float(), mean, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(first["std"].float(), std, atol=2e-3, rtol=1e-2)
    from safetensors import safe_open

    with safe_open(latent_folder / "latents-000001.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["captions"]) == ["a city", ""] and json.loads(meta["keys"]) == ["b/c/five.webp", "b/four.jpg"]


def test_killed_encoding_resumes_with_the_missing_shards_only(latent_folder: Path, sd15_teacher: Path, tmp_path: Path):
    import shutil

    out = tmp_path / "latents"
    shutil.copytree(latent_folder, out)
    before = shard_tensors(out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("latents-*.safetensors")}
    (out / "latents-000002.safetensors").unlink()  # killed while writing the last shard:
    (out / ".latents-000002.safetensors.partial").write_bytes(b"half a shard")  # only its partial file is left
    report = encode_latents(sd15_teacher, latent_folder.parent / "images", out, batch_size=2, shard_size=2, workers=0)
    assert (report.written, report.kept) == (1, 2)
    after = shard_tensors(out)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in ("mean", "std"))
    assert {n: (out / n).stat().st_mtime_ns for n in kept if n != "latents-000002.safetensors"} == {
        n: t for n, t in kept.items() if n != "latents-000002.safetensors"}
    assert not list(out.glob(".*.partial"))
    # a shard cut short (a full disk, a copy stopped): training names it; the same command redoes it
    from dmd2_serve.model.adapters import load_backbone
    from dmd2_train.datasets import open_real_source

    cut = out / "latents-000001.safetensors"
    cut.write_bytes(cut.read_bytes()[:-600])  # the header's lengths no longer fit: a traceback in training
    with pytest.raises(DataError, match="latents-000001.safetensors' cannot be read .*run the same encode-latents"):
        open_real_source(out, load_backbone(sd15_teacher))
    report = encode_latents(sd15_teacher, latent_folder.parent / "images", out, batch_size=2, shard_size=2, workers=0)
    assert (report.written, report.kept) == (1, 2)  # it was counted as done
    first, redone = shard_tensors(latent_folder), shard_tensors(out)  # (before: mmapped from the file cut in place)
    assert all(torch.equal(first[n][k], redone[n][k]) for n in first for k in ("mean", "std"))
    with pytest.raises(DataError, match="other settings .*shard_size"):
        encode_latents(sd15_teacher, latent_folder.parent / "images", out, shard_size=3, workers=0)


def test_processes_split_the_shards(latent_folder: Path, sd15_teacher: Path, tmp_path: Path, monkeypatch):
    assert list(shards_of(0, 2, 5)) == [0, 2, 4] and list(shards_of(1, 2, 5)) == [1, 3]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_split() == (1, 2, 0)
    images, out = latent_folder.parent / "images", tmp_path / "two"
    one = encode_latents(sd15_teacher, images, out, batch_size=2, shard_size=2, workers=0)  # rank 1 of 2, from the env
    assert one.written == 1 and [p.name for p in out.glob("latents-*")] == ["latents-000001.safetensors"]
    zero = encode_latents(sd15_teacher, images, out, batch_size=2, shard_size=2, workers=0, rank=0, world=2)
    assert zero.written == 2
    single, split = shard_tensors(latent_folder), shard_tensors(out)
    assert single.keys() == split.keys()
    assert all(torch.equal(single[n][k], split[n][k]) for n in single for k in ("mean", "std"))


def test_latents_of_another_teacher_are_refused(latent_folder: Path, sd15_teacher: Path, tmp_path: Path):
    import shutil

    from dmd2_serve.model.adapters import load_backbone
    from dmd2_train.datasets import open_real_source

    with pytest.raises(DataError, match=r"encoded from 16 px images; this run trains at 32 px: .* --image-size 32"):
        open_real_source(latent_folder, load_backbone(sd15_teacher, image_size=32))
    from dmd2_serve.model.adapters import ModelFolderError

    with pytest.raises(ModelFolderError, match="image_size 17 is not a multiple of the VAE's downsampling factor 2"):
        load_backbone(sd15_teacher, image_size=17)  # its latents were 16 px's, refused later as 'another VAE'
    other = tmp_path / "other"
    shutil.copytree(latent_folder, other)
    manifest = json.loads((other / "latents.json").read_text())
    (other / "latents.json").write_text(json.dumps(manifest | {"probe": [-v for v in manifest["probe"]]}))
    backbone = load_backbone(sd15_teacher)
    with pytest.raises(DataError, match="encoded with another VAE"):
        open_real_source(other, backbone)
    (other / "latents.json").write_text(json.dumps(manifest))
    (other / "latents-000001.safetensors").unlink()
    with pytest.raises(DataError, match=r"incomplete \(2 of 3 latent shards\)"):
        open_real_source(other, backbone)


def run(teacher: Path, out: Path, prompts: Path, real: Path, resume: bool = False, on_step=None, **extra) -> Path:
    cfg = DistillConfig(teacher=teacher, out=out, prompts=prompts, real_images=real,
                        **tiny_run_overrides(preview_every=100, **extra))
    return distill(cfg, resume=resume, on_step=on_step)


def scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_training_on_latent_shards_resumes_exactly(latent_folder: Path, sd15_teacher: Path, sd_data, tmp_path: Path):
    prompts, _ = sd_data
    common = dict(max_steps=4, checkpoint_every=2)
    run(sd15_teacher, tmp_path / "straight", prompts, latent_folder, **common)

    def interrupt(step: int) -> None:
        if step == 3:  # past the step-2 checkpoint: step 3 is lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(sd15_teacher, tmp_path / "cut", prompts, latent_folder, on_step=interrupt, **common)
    run(sd15_teacher, tmp_path / "cut", prompts, latent_folder, resume=True, **common)
    a, b = (ckpt.read_checkpoint(ckpt.latest(tmp_path / name)[1]) for name in ("straight", "cut"))
    assert a["meta"]["data"] == b["meta"]["data"] == {"consumed": 8, "world": 1, "skipped": 0, "uncaptioned": 2}
    for part in ("generator", "fake"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    assert scalars(tmp_path / "straight", "data/uncaptioned")[-1] == (4, 2.0)


def test_training_on_webdataset_shards_counts_skipped_samples(sd15_teacher: Path, sd_data, tmp_path: Path):
    prompts, _ = sd_data
    shards = write_shards(tmp_path / "shards")
    run(sd15_teacher, tmp_path / "run", prompts, shards / "*.tar", max_steps=3, data_workers=1)
    skipped = scalars(tmp_path / "run", "data/skipped")
    assert [s for s, _ in skipped] == [1, 2, 3] and skipped[-1][1] > 0  # a running total, every log step
    assert [v for _, v in skipped] == sorted(v for _, v in skipped)
    assert ckpt.read_meta(ckpt.latest(tmp_path / "run")[1])["data"]["skipped"] == skipped[-1][1]


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmd2_train", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_encode_latents_and_unreadable_sources(sd15_teacher: Path, sd_data, tmp_path: Path):
    prompts, images = sd_data
    done = cli("encode-latents", "--teacher", sd15_teacher, "--images", images, "--out", tmp_path / "lat",
               "--shard-size", "4", "--workers", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 shards written (6 samples), 0 already done; 0 unreadable samples skipped" in done.stdout
    (tmp_path / "lat" / "latents.json").write_text('{"format": ')  # damaged: was a JSONDecodeError traceback
    assert_user_error(cli("encode-latents", "--teacher", sd15_teacher, "--images", images, "--out", tmp_path / "lat",
                          "--shard-size", "4", "--workers", "0"), "latents.json' cannot be read (JSONDecodeError")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(truncated_jpeg())
    finished = tmp_path / "run" / "checkpoints" / "step_0000002"  # a finished checkpoint of an earlier run
    finished.mkdir(parents=True)
    (finished / "meta.json").write_text("{}")
    for args in (["encode-latents", "--teacher", sd15_teacher, "--images", bad, "--out", tmp_path / "o"],
                 ["--teacher", sd15_teacher, "--prompts", prompts, "--real-images", bad, "--out", tmp_path / "run",
                  "--resume", *FAST, "gan=true"]):
        result = cli(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "none of the 1 samples" in errors[0] and "x.jpg" in errors[0], result.stderr
    assert (finished / "meta.json").read_text() == "{}" and not (tmp_path / "o").exists()
