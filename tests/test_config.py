"""Typed config: presets, YAML, key=value overrides, and errors that name the key."""

from pathlib import Path

import pytest

from dmd2_train.config import (
    DISTILL_PRESETS,
    ConfigError,
    DistillConfig,
    build_config,
    given,
    parse_overrides,
    read_yaml,
)


def test_preset_then_file_then_overrides(tmp_path: Path):
    f = tmp_path / "run.yaml"
    f.write_text("ratio: 7\nbatch_size: 3\n")
    cfg = build_config(DistillConfig, DISTILL_PRESETS, "digits", [read_yaml(f), parse_overrides(["batch_size=5"])])
    assert (cfg.ratio, cfg.batch_size, cfg.guidance_scale) == (7, 5, DISTILL_PRESETS["digits"]["guidance_scale"])


def test_overrides_parse_yaml_values():
    pairs = ["timesteps=[999, 499]", "gan=false", "lr_fake=1e-6"]
    assert parse_overrides(pairs)["timesteps"] == [999, 499] and parse_overrides(pairs)["gan"] is False
    cfg = build_config(DistillConfig, DISTILL_PRESETS, "digits", [parse_overrides(pairs)])
    assert cfg.lr_fake == 1e-6 and isinstance(cfg.lr_fake, float)


def test_null_is_a_value_and_a_left_out_flag_is_not(tmp_path: Path):
    """key=null (or null in the YAML) clears what a layer below set; a flag argparse left as None does not."""
    f = tmp_path / "run.yaml"
    f.write_text("init_from: runs/s1\nlora_alpha: 8\n")
    cfg = build_config(DistillConfig, DISTILL_PRESETS, "sd15", [read_yaml(f), given({"init_from": None}),
                                                               parse_overrides(["lora_alpha=null"])])
    assert cfg.init_from == Path("runs/s1") and cfg.lora_alpha is None
    assert build_config(DistillConfig, DISTILL_PRESETS, "sd15", [read_yaml(f), parse_overrides(["init_from=null"])
                                                               ]).init_from is None
    with pytest.raises(ConfigError, match="config key 'ratio'.*got None"):
        build_config(DistillConfig, DISTILL_PRESETS, "digits", [parse_overrides(["ratio=null"])])


@pytest.mark.parametrize("pairs, needle", [
    (["no_such_key=1"], "unknown config key 'no_such_key'"),
    (["ratio=zero"], "config key 'ratio'"),
    (["ratio=0"], "config key 'ratio'"),
    (["timesteps=[249, 999]"], "strictly decreasing"),
    (["ratio"], "is not key=value"),
    (["guidance_scale=inf"], "config key 'guidance_scale'.*finite number"),  # trained with no DM term at all
    (["lr_generator=nan"], "config key 'lr_generator'"),
    # a check across keys says only its message (it was "config key 'config'" and the whole config)
    (["lora_fake=true"], "^lora_fake=true needs lora_rank > 0 .*e.g. lora_rank=64$"),
])
def test_bad_keys_are_named(pairs, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        build_config(DistillConfig, DISTILL_PRESETS, None, [parse_overrides(pairs)])


def test_unknown_preset_and_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown preset 'sd3'"):
        build_config(DistillConfig, DISTILL_PRESETS, "sd3", [])
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    bad.write_text("ratio: 5\nlr_fake: [1e-6\ngan: false\n")  # PyYAML's own text: 7 lines, echoing the file
    with pytest.raises(ConfigError) as said:
        read_yaml(bad)
    assert str(said.value) == (f"config file '{bad}' is not valid YAML: line 3, column 4: expected ',' or ']', but"
                               " got ':' (while parsing a flow sequence that started at line 2, column 10)")
    bad.write_text("ratio: 5\x00\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: character 9: unacceptable character #x0000 \(special"):
        read_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml(bad)


def test_paper_defaults():
    sd15, sdxl = (build_config(DistillConfig, DISTILL_PRESETS, p, []) for p in ("sd15-4step", "sdxl"))
    assert (sd15.ratio, sd15.guidance_scale, sd15.gan_weight_generator) == (10, 1.75, 1e-3)
    assert (sdxl.ratio, sdxl.guidance_scale, sdxl.gan_weight_generator) == (5, 8.0, 5e-3)
    assert sd15.timesteps == [999, 749, 499, 249] and (sd15.dm_t_min, sd15.dm_t_max) == (0.02, 0.98)
    assert sdxl.timesteps == [999, 749, 499, 249] and sdxl.image_size is None  # the teacher's own size


def test_memory_keys_and_their_conflicts():
    cfg = build_config(DistillConfig, DISTILL_PRESETS, "sdxl", [])
    assert cfg.gradient_checkpointing and cfg.offload_optimizer and cfg.sharding == "ddp"
    with pytest.raises(ConfigError, match="offload_optimizer=false"):
        build_config(DistillConfig, DISTILL_PRESETS, "sdxl", [parse_overrides(["sharding=fsdp2"])])
    cfg = build_config(DistillConfig, DISTILL_PRESETS, "sdxl", [parse_overrides(["sharding=fsdp2", "offload_optimizer=false"])])
    assert cfg.sharding == "fsdp2"
    with pytest.raises(ConfigError, match="optimizer"):
        build_config(DistillConfig, DISTILL_PRESETS, None, [parse_overrides(["optimizer=sgd"])])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_config(DistillConfig, DISTILL_PRESETS, None, [parse_overrides(["gradient_accumulation_steps=0"])])
