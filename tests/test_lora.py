"""LoRA generators: config, training only the adapter, and the export stock diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from dmd2_serve.model.adapters import load_backbone, load_unet, read_card
from dmd2_serve.model.pipeline import FewStepPipeline
from dmd2_train import checkpoint as ckpt
from dmd2_train.config import DISTILL_PRESETS, ConfigError, DistillConfig, build_config, parse_overrides
from dmd2_train.export import export_generator
from dmd2_train.init_from import read_initial_weights
from dmd2_train.loop import distill, prepare_run
from dmd2_train.lora import LoraSpec
from dmd2_train.run import RunError, make_accelerator

PROMPTS = ["a red cube", "a small dog"]


def latents_for(pipe: FewStepPipeline, n: int) -> torch.Tensor:
    return torch.randn((n, *pipe.backbone.sample_shape), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------- config


def test_lora_keys_and_their_conflicts():
    cfg = build_config(DistillConfig, DISTILL_PRESETS, "sdxl", [parse_overrides(["lora_rank=64"])])
    spec = LoraSpec.of(cfg)
    assert spec == LoraSpec(64, 64.0, ("to_q", "to_k", "to_v", "to_out.0")) and spec.scale == 1.0
    assert LoraSpec.of(build_config(DistillConfig, DISTILL_PRESETS, None, [])) is None  # rank 0: full fine-tune
    assert LoraSpec.of(DistillConfig(lora_rank=8, lora_alpha=4)).scale == 0.5
    for pairs, needle in [(["lora_fake=true"], "lora_fake=true needs lora_rank > 0"),
                          (["lora_rank=-1"], "config key 'lora_rank'"),
                          (["lora_rank=4", "lora_alpha=0"], "config key 'lora_alpha'"),
                          (["lora_targets=[]"], "config key 'lora_targets'")]:
        with pytest.raises(ConfigError, match=needle) as err:
            build_config(DistillConfig, DISTILL_PRESETS, "sdxl", [parse_overrides(pairs)])
        assert "\n" not in str(err.value)


def test_targets_that_match_nothing_are_named(sd15_teacher: Path):
    with pytest.raises(ValueError, match=r"lora_targets \['to_qq'\] do not fit this UNet.*to_out\.0"):
        LoraSpec(4, 4.0, ("to_qq",)).add_to(load_unet(sd15_teacher))


# ---------------------------------------------------------------------------------------- training


def test_lora_training_changes_only_the_adapters(sd15_teacher: Path, sd_data, tmp_path: Path):
    prompts, images = sd_data
    cfg = DistillConfig(teacher=sd15_teacher, out=tmp_path / "run", prompts=prompts, real_images=images, image_size=16,
                        **tiny_run_overrides(lora_rank=4, lora_alpha=8, lora_fake=True, gradient_checkpointing=True,
                                             ema_decay=0.5, ratio=1, warmup_steps=0, lr_generator=1e-2))
    trainer = prepare_run(cfg, make_accelerator(cfg)).trainer
    teacher = load_unet(sd15_teacher).state_dict()
    gen_before = {k: v.clone() for k, v in trainer.gen_module.state_dict().items()}
    fake_before = {k: v.clone() for k, v in trainer.fake_module.state_dict().items()}
    for step in range(2):
        trainer.train_step(step)

    # the real score is the plain teacher: no adapter, weights untouched
    real = trainer.nets.real
    assert not any("lora" in k for k in real.state_dict())
    assert all(torch.equal(v, teacher[k]) for k, v in real.state_dict().items())
    # the optimisers and the EMA hold the adapters (and the GAN head), nothing else
    gen_trained = {n for n, p in trainer.gen_module.named_parameters() if p.requires_grad}
    assert gen_trained and all(".lora_A." in n or ".lora_B." in n for n in gen_trained)
    assert {id(p) for g in trainer.opt_g.param_groups for p in g["params"]} == {id(p) for p in trainer.gen_params}
    assert len(trainer.gen_params) == len(gen_trained) and set(trainer.ema.names) == gen_trained
    fake_trained = {n for n, p in trainer.fake_module.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("head.") for n in fake_trained)
    assert any(n.startswith("head.") for n in fake_trained)
    # frozen weights stayed the teacher's; every adapter moved (B from zero)
    for before, module, trained in ((gen_before, trainer.gen_module, gen_trained),
                                    (fake_before, trainer.fake_module, fake_trained)):
        after = module.state_dict()
        for key, value in after.items():
            assert torch.equal(value, before[key]) != (key in trained), key
    for key, value in gen_before.items():
        if ".base_layer." in key:
            assert torch.equal(value, teacher[key.replace(".base_layer.", ".")])
        if ".lora_B." in key:
            assert not value.any()  # the generator starts as the teacher


def test_lora_run_exports_merged_generator_and_adapter(sd15_teacher: Path, sd_data, tmp_path: Path):
    prompts, images = sd_data
    folder = distill(DistillConfig(
        teacher=sd15_teacher, out=tmp_path / "run", prompts=prompts, real_images=images, image_size=16,
        **tiny_run_overrides(lora_rank=4, timesteps=[999], max_steps=2, ratio=1, warmup_steps=0, lr_generator=1e-2,
                             preview_every=100)))
    meta = json.loads((folder / "dmd2.json").read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 4.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"], "path": "lora"}
    lora_meta = read_card(folder / "lora")
    assert lora_meta.base == str(sd15_teacher.resolve()) and lora_meta.timesteps == [999]
    # the merged generator is the teacher plus the trained adapter
    merged, teacher = load_unet(folder).state_dict(), load_unet(sd15_teacher).state_dict()
    assert merged.keys() == teacher.keys()
    changed = {k for k in merged if not torch.equal(merged[k], teacher[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    # a checkpoint holds the adapters and their optimiser state
    state = ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path / "run")[-1][1])
    assert any(".lora_B." in k for k in state["generator"]) and any(".lora_A." in k for k in state["opt_g"]["state"])
    pipe_lora, pipe_merged = FewStepPipeline.from_folder(folder / "lora"), FewStepPipeline.from_folder(folder)
    latents = latents_for(pipe_merged, 2)
    torch.testing.assert_close(pipe_lora(PROMPTS, latents=latents), pipe_merged(PROMPTS, latents=latents),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- export


def export_random_lora(teacher: Path, out: Path, seed: int = 1) -> tuple[Path, torch.nn.Module]:
    """A LoRA (rank 4, alpha 8: scale 2) with random B (drawn from ``seed``), exported; and the peft UNet it came from."""
    spec = LoraSpec(4, 8.0, ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"))
    torch.manual_seed(seed)
    unet = spec.add_to(load_unet(teacher)).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    weights = {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    backbone = load_backbone(teacher, read_card(teacher))
    return export_generator(weights, unet.config, backbone, teacher, out, [999], lora=spec), unet


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_export_loads_in_stock_diffusers_with_the_same_images(family, request, tmp_path: Path):
    import diffusers
    from diffusers import LCMScheduler

    teacher = request.getfixturevalue(f"{family}_teacher")
    folder, unet = export_random_lora(teacher, tmp_path / "generator")
    trained = FewStepPipeline(unet, load_backbone(teacher, read_card(teacher)), [999])  # the peft module itself
    latents = latents_for(trained, 2)
    expected = trained(PROMPTS, latents=latents)
    plain = FewStepPipeline(load_unet(teacher).eval(), trained.backbone, [999])(PROMPTS, latents=latents)
    assert (expected - plain).abs().max() > 0.02  # the adapter matters: the comparisons below can fail

    stock = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}[family]
    pipe = stock.from_pretrained(teacher)
    pipe.load_lora_weights(folder / "lora")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # the tiny teacher's DDPM clips
    images = pipe(PROMPTS, timesteps=[999], guidance_scale=0.0, height=16, width=16, latents=latents,
                  output_type="pt").images
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    for form in (folder / "lora", folder):  # ours, from the LoRA and from the merged generator
        torch.testing.assert_close(FewStepPipeline.from_folder(form)(PROMPTS, latents=latents), expected,
                                   atol=1e-4, rtol=0)
    merged = diffusers.DiffusionPipeline.from_pretrained(folder)  # stock, the merged generator folder
    images = merged(PROMPTS, timesteps=[999], guidance_scale=0.0, height=16, width=16, latents=latents,
                    output_type="pt").images
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)


def test_lora_folder_with_a_missing_teacher_says_what_to_do(sd15_teacher: Path, tmp_path: Path):
    from dmd2_serve.model.adapters import ModelFolderError

    folder, _ = export_random_lora(sd15_teacher, tmp_path / "generator")
    meta = json.loads((folder / "lora" / "dmd2.json").read_text())
    (folder / "lora" / "dmd2.json").write_text(json.dumps({**meta, "base": str(tmp_path / "moved")}))
    with pytest.raises(ModelFolderError, match="not on this machine.*set 'base'"):
        FewStepPipeline.from_folder(folder / "lora")
    import os  # a relative base is read from the card's folder, wherever the process runs

    (folder / "lora" / "dmd2.json").write_text(json.dumps({**meta, "base": os.path.relpath(sd15_teacher, folder / "lora")}))
    assert FewStepPipeline.from_folder(folder / "lora").unet is not None


def test_a_lora_with_nan_weights_is_refused_when_loaded(sd15_teacher: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from dmd2_serve.model.adapters import ModelFolderError
    from dmd2_serve.model.lora import LORA_WEIGHTS

    folder, _ = export_random_lora(sd15_teacher, tmp_path / "generator")
    tensors = load_file(folder / "lora" / LORA_WEIGHTS)
    key = min(tensors)
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, folder / "lora" / LORA_WEIGHTS)
    with pytest.raises(ModelFolderError, match=f"'{key}' holds NaN or infinite values.*earlier checkpoint"):
        FewStepPipeline.from_folder(folder / "lora")
    from dmd2_serve.server.models import check_servable

    with pytest.raises(ModelFolderError, match=f"'{key}' holds NaN"):  # the server's start: one line, no worker
        check_servable(folder / "lora")


def test_lora_resume_after_interruption_is_bit_exact(digits_teacher: Path, tmp_path: Path):
    common = dict(max_steps=4, ratio=1, checkpoint_every=2, preview_every=100, ema_decay=0.5, lora_rank=2,
                  lora_fake=True, timesteps=[999])

    def interrupt(step: int) -> None:
        if step == 3:  # past the step-2 checkpoint: step 3 is lost and must be redone
            raise KeyboardInterrupt

    def run(out: Path, **kw) -> Path:
        return distill(DistillConfig(teacher=digits_teacher, out=out, **tiny_run_overrides(**common)), **kw)

    run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", on_step=interrupt)
    run(tmp_path / "cut", resume=True)
    a, b = (ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path / r)[-1][1]) for r in ("straight", "cut"))
    assert a["meta"]["step"] == b["meta"]["step"] == 4
    for part in ("generator", "fake", "generator_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    assert all(".lora_" in k for k in a["generator_ema"])

    # Another lora_alpha: a resume refuses it (it rescaled the adapters and replaced the export); init_from
    # carries it over, B scaled so that each network starts as the run left it.
    with pytest.raises(RunError, match=r"^the checkpoint .* other LoRA settings \(lora_alpha 2.0 -> 4.0\); a resume"):
        distill(DistillConfig(teacher=digits_teacher, out=tmp_path / "cut",
                              **tiny_run_overrides(**{**common, "lora_alpha": 4.0})), resume=True)
    start = DistillConfig(teacher=digits_teacher, out=tmp_path / "next", **tiny_run_overrides(**{**common, "lora_alpha": 4.0}))
    init = read_initial_weights(tmp_path / "straight", start)
    for net in ("generator", "fake"):
        weights = a["generator_ema"] if net == "generator" else a["fake"]
        scaled = [k for k in weights if ".lora_B." in k]
        assert scaled and all(torch.equal(init[net][k], weights[k] / 2) for k in scaled)
        assert all(torch.equal(init[net][k], weights[k]) for k in weights if k not in scaled)
    with pytest.raises(RunError, match=r"trained with lora_rank=2 and this run has lora_rank=3"):
        read_initial_weights(tmp_path / "straight", start.model_copy(update={"lora_rank": 3}))
    with pytest.raises(RunError, match=r"trained with lora_fake=True and this run has lora_fake=False"):
        read_initial_weights(tmp_path / "straight", start.model_copy(update={"lora_fake": False}))
    with pytest.raises(RunError, match=r"is a LoRA export .*init_from=.*straight\)"):
        read_initial_weights(tmp_path / "straight" / "generator" / "lora", start)


def test_server_serves_the_lora_folder(sd15_teacher: Path, tmp_path: Path):
    import base64
    import io

    import httpx
    import numpy as np
    from PIL import Image
    from serving import start_server, stop_server

    folder, _ = export_random_lora(sd15_teacher, tmp_path / "generator")
    server = start_server("--model", str(folder / "lora"), "--bucket", "1", "--max-batch-size", "1")
    try:
        r = httpx.post(f"{server.url}/generate", json={"prompt": "a red cube", "seed": 3}, timeout=120)
    finally:
        stop_server(server)
    assert r.status_code == 200, r.text
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))), dtype=np.int16)
    merged = FewStepPipeline.from_folder(folder).generate_padded(["a red cube"], [3], bucket=1)[0]
    expected = (merged.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(served - expected).max() <= 1  # the same weights; PNG rounding only


def test_lora_trains_sharded_as_with_ddp(digits_teacher: Path, tmp_path: Path):
    """FSDP2 shards the frozen weights and the adapters alike; 2 gloo processes make DDP's updates."""
    import os
    import subprocess
    import sys

    def torchrun(port: int, out: Path, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "dmd2_train", "--teacher", str(digits_teacher), "--out", str(out), "--max-steps", "2",
               "batch_size=2", "ratio=1", "warmup_steps=0", "preview_every=100", "lr_generator=1e-3", "ema_decay=0.5",
               "lora_rank=2", "lora_fake=true", "timesteps=[999]", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        return ckpt.read_checkpoint(ckpt.latest(out)[1])

    ddp, fsdp = torchrun(29561, tmp_path / "ddp"), torchrun(29562, tmp_path / "fsdp", "sharding=fsdp2")
    for net in ("generator", "fake", "generator_ema"):  # B starts at zero: |B| is the whole update
        moved = sum(v.abs().sum() for k, v in ddp[net].items() if ".lora_B." in k)
        apart = sum((v - fsdp[net][k]).abs().sum() for k, v in ddp[net].items() if ".lora_B." in k)
        assert moved > 0 and apart < 0.01 * moved, f"{net}: fsdp2 vs ddp differ by {apart / moved:.2%} of the update"
    frozen = [k for k in ddp["generator"] if ".base_layer." in k]
    assert frozen and all(torch.equal(ddp["generator"][k], fsdp["generator"][k]) for k in frozen)
    assert (tmp_path / "fsdp" / "generator" / "lora" / "pytorch_lora_weights.safetensors").is_file()
