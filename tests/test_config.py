"""Configuration: the repo's params.yaml validates; errors name the dotted key and the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from imagen_ops.choices import Choices
from imagen_ops.config import (
    ConfigError,
    Params,
    SampleConfig,
    apply_overrides,
    flatten,
    load_params,
    read_yaml,
)
from imagen_ops.device import PRECISIONS
from imagen_ops.diffusion.guidance import THRESHOLDING
from imagen_ops.diffusion.objectives import LOSS_WEIGHTINGS, OBJECTIVES
from imagen_ops.diffusion.samplers import SAMPLERS
from imagen_ops.diffusion.schedules import SCHEDULES, SPACINGS
from imagen_ops.text.encoders import ENCODER_KINDS

from .conftest import tiny_params, tiny_raw, write_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_validates_and_every_value_is_read() -> None:
    params = load_params(REPO / "params.yaml")
    sizes = [s.resolution for s in params.stages.values()]
    assert sizes == sorted(sizes) and len(sizes) >= 2
    # every leaf the file sets arrives in Params unchanged (none dropped or coerced away)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    validated = flatten(params.model_dump(mode="json"))
    for key, value in flatten(raw).items():
        expected = list(value) if isinstance(value, tuple) else value
        assert validated[key] == expected, key


@pytest.mark.parametrize(
    ("key", "choices"),
    [
        ("sample.sampler", SAMPLERS),
        ("sample.thresholding", THRESHOLDING),
        ("sample.spacing", SPACINGS),
        ("stages.base.diffusion.schedule", SCHEDULES),
        ("stages.base.diffusion.objective", OBJECTIVES),
        ("stages.base.diffusion.loss_weighting", LOSS_WEIGHTINGS),
        ("text.kind", ENCODER_KINDS),
        ("sample.precision", PRECISIONS),
        ("stages.base.train.precision", PRECISIONS),
    ],
)
def test_choices_validate_against_their_registry(key: str, choices: Choices) -> None:
    """A named setting is valid exactly when its implementing registry has the name, and
    the error lists every registered name."""
    for name in choices:
        assert flatten(tiny_params(f"{key}={name}").model_dump())[key] == name
    with pytest.raises(ConfigError) as err:
        tiny_params(f"{key}=nonsense")
    assert key in str(err.value) and all(name in str(err.value) for name in choices)
    with pytest.raises(ValueError, match=f"unknown {choices.family} 'nonsense'"):
        choices["nonsense"]


def test_tiny_params_validate() -> None:
    params = tiny_params()
    assert params.stage_names() == ["base", "sr32"]
    assert params.lowres_of("base") is None and params.lowres_of("sr32") == 16


def test_unknown_nested_key_names_dotted_key_and_file(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", "stages.base.unet.chanels=32")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert "stages.base.unet.chanels" in message
    assert "unknown key" in message
    assert str(path) in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", "trian.steps=3")
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_params(path)


def test_a_key_given_twice_is_an_error_not_the_last_one(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: a second `text:` block would drop the
    first's keys back to the defaults without a word. Here it names the key and lines;
    a merge key's values may still be overridden."""
    path = write_params(tmp_path / "params.yaml")
    text = path.read_text()
    path.write_text(text + "text:\n  batch_size: 8\n")
    first = 1 + text.splitlines().index("text:")
    with pytest.raises(ConfigError, match=rf"key 'text' is given twice .*first on line {first}"):
        load_params(path)
    with pytest.raises(yaml.YAMLError, match="key 'seed' is given twice"):  # a recipe
        read_yaml("sample:\n  seed: 1\n  seed: 2\n")
    merged = read_yaml("base: &b {seed: 1, steps: 5}\nsample:\n  <<: *b\n  seed: 2\n")
    assert merged["sample"] == {"seed": 2, "steps": 5}


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", "stages.sr32.train.steps=many")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert f"{path}: stages.sr32.train.steps:" in str(err.value)
    assert "integer" in str(err.value)


def test_out_of_range_value() -> None:
    with pytest.raises(ConfigError, match=r"data\.prepare\.val_fraction"):
        tiny_params("data.prepare.val_fraction=1.5")


def test_per_level_list_length_mismatch() -> None:
    with pytest.raises(ConfigError, match=r"num_res_blocks needs one entry per level \(2"):
        tiny_params("stages.base.unet.num_res_blocks=[1, 1, 1]")


def test_layout_modes_need_a_layout_head() -> None:
    with pytest.raises(ConfigError, match=r"layout_modes > 1 .* set layout_grid"):
        tiny_params("stages.base.unet.layout_modes=4")
    assert (
        tiny_params("stages.base.unet.layout_grid=2", "stages.base.unet.layout_modes=4")
        .stages["base"]
        .unet.layout_modes
        == 4
    )


def test_layout_width_sizes_the_layout_head_alone() -> None:
    """The head's width is its own (default embedding_dim); the U-Net's text path keeps
    embedding_dim. A width with no head, or one the attention heads do not divide, is
    refused by name."""
    from imagen_ops.models.unet import UNet

    head = ("stages.base.unet.layout_grid=2", "stages.base.unet.layout_modes=2")
    for extra, want in (((), None), (("stages.base.unet.layout_width=64",), 64)):
        cfg = tiny_params(*head, *extra).stages["base"]
        net = UNet(cfg.unet, text_dim=8, super_resolution=False, objective="v")
        assert net.layout.text.proj[1].out_features == (want or cfg.unet.embedding_dim)
        assert net.text.proj[1].out_features == cfg.unet.embedding_dim
    with pytest.raises(ConfigError, match=r"layout_width sizes the layout head: set layout_grid"):
        tiny_params("stages.base.unet.layout_width=64")
    with pytest.raises(ConfigError, match=r"layout_width must be a multiple of attention_head_"):
        tiny_params(*head, "stages.base.unet.layout_width=65")


def test_per_stage_sample_list_length_mismatch() -> None:
    with pytest.raises(ConfigError, match=r"sample\.guidance has 3 values for a 2-stage cascade"):
        tiny_params("sample.guidance=[3.0, 1.0, 1.0]")
    # a sweep entry names the sweep, not sample.guidance (which may be fine)
    with pytest.raises(
        ConfigError, match=r"eval\.guidance_sweep entry \[3\.0, 1\.0, 1\.0\] has 3 values"
    ):
        tiny_params("eval.guidance_sweep=[1.0, [3.0, 1.0, 1.0]]")
    with pytest.raises(ConfigError, match=r"eval\.guidance_sweep entry \[\] has 0 values"):
        tiny_params("eval.guidance_sweep=[[]]")
    # a scalar broadcasts, a list of the right length is accepted
    assert tiny_params("sample.guidance=2.5").sample.guidance == 2.5
    assert tiny_params("sample.steps=[3, 2]").sample.steps == (3, 2)


def test_cascade_resolutions_must_increase() -> None:
    with pytest.raises(ConfigError, match="must increase along the cascade"):
        tiny_params("stages.sr32.resolution=16")
    raw = tiny_raw()
    raw["stages"] = {"sr32": raw["stages"]["sr32"], "base": raw["stages"]["base"]}
    with pytest.raises(ConfigError, match=r"\[32, 16\]"):
        load_params_from(raw)


def load_params_from(raw: dict) -> Params:
    from imagen_ops.config import parse_params

    return parse_params(raw, "<raw>")


def test_stage_resolution_divisibility_and_names() -> None:
    with pytest.raises(ConfigError, match="not divisible by 4"):
        tiny_params("stages.sr32.resolution=34")  # efficient: 2 levels + 1 -> factor 4
    raw = tiny_raw()
    raw["stages"]["sr-32"] = raw["stages"].pop("sr32")
    with pytest.raises(ConfigError, match="stage name 'sr-32'"):
        load_params_from(raw)


def test_a_super_resolution_stage_is_a_whole_multiple_of_the_one_before() -> None:
    """16 -> 24 px passed before and failed mid-training on crops of unequal size."""
    with pytest.raises(ConfigError, match="24 is not a whole multiple of stage base's 16"):
        tiny_params("stages.sr32.resolution=24", "stages.sr32.unet.efficient=false")
    with pytest.raises(ConfigError, match=r"stages\.sr32\.train\.crop 34: .* multiple of 4"):
        tiny_params(  # 16 -> 64 px: a crop of 34 would take 8.5 low-res pixels
            "stages.sr32.resolution=64",
            "stages.sr32.unet.efficient=false",
            "stages.sr32.train.crop=34",
        )
    assert tiny_params("stages.sr32.train.crop=16").stages["sr32"].train.crop == 16


@pytest.mark.parametrize(
    "override",
    [
        "data.synth.seed=-1",
        "stages.base.train.seed=-2",
        "scorer.seed=-1",
        "stages.base.train.seed=9223372036854775808",
        "stages.base.train.betas=[0.9, 1.5]",
    ],
)
def test_seeds_and_betas_are_checked_where_they_are_set(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        tiny_params(override)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(listing)


def test_overrides_parse_yaml_values_and_create_nested_keys() -> None:
    raw = {"a": {"b": 1}, "keep": "x"}
    out = apply_overrides(
        raw, ["a.b=2", "a.c.d=[1, 2]", "flag=true", "ratio=0.5", "name=sr64", "none=null"]
    )
    assert out == {
        "a": {"b": 2, "c": {"d": [1, 2]}},
        "keep": "x",
        "flag": True,
        "ratio": 0.5,
        "name": "sr64",
        "none": None,
    }
    assert raw == {"a": {"b": 1}, "keep": "x"}, "the input is not modified"
    # a value containing '=' keeps everything after the first '='
    assert apply_overrides({}, ["x=a=b"]) == {"x": "a=b"}


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["stages.base.train.steps"])
    with pytest.raises(ConfigError, match="'resolution' is not a section"):
        apply_overrides(tiny_raw(), ["stages.base.resolution.x=1"])


def test_overrides_through_load_params(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml")
    params = load_params(path, ["stages.base.train.steps=11", "eval.clip_model=/some/dir"])
    assert params.stages["base"].train.steps == 11
    assert params.eval.clip_model == "/some/dir"
    assert params.stages["sr32"].train.steps == tiny_params().stages["sr32"].train.steps


def test_config_is_frozen() -> None:
    params = tiny_params()
    with pytest.raises(ValueError):
        params.sample.steps = 3  # type: ignore[misc]


def test_sample_for_stages_broadcasts_and_selects() -> None:
    cfg = SampleConfig(steps=(30, 20, 10), guidance=4.0, aug_level=(0.0, 0.1, 0.3))
    sub = cfg.for_stages([1, 2], 3)
    assert sub.steps == (20, 10)
    assert sub.guidance == (4.0, 4.0)
    assert sub.aug_level == (0.1, 0.3)
    assert sub.sampler == cfg.sampler and sub.seed == cfg.seed
    assert cfg.steps == (30, 20, 10), "the original is unchanged"
    assert SampleConfig(steps=7).for_stages([0], 2).steps == (7,)


def test_sample_resolve_broadcasts_and_repeats_the_last_value() -> None:
    cfg = SampleConfig(steps=(30, 20), guidance=2.0, aug_level=(0.1, 0.2, 0.3))
    plan = cfg.resolve(3)
    assert [p.steps for p in plan] == [30, 20, 20]
    assert [p.guidance for p in plan] == [2.0, 2.0, 2.0]
    assert [p.aug_level for p in plan] == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="aug_level has 3 values for a 2-stage cascade"):
        cfg.resolve(2)


def test_sample_defaults_are_the_studied_recipe() -> None:
    """The code defaults and params.yaml's `sample` section say the same thing."""
    studied = yaml.safe_load((REPO / "params.yaml").read_text())["sample"]
    defaults = SampleConfig().model_dump(mode="json")
    for key, value in studied.items():
        expected = tuple(value) if isinstance(value, list) else value
        got = tuple(defaults[key]) if isinstance(defaults[key], list) else defaults[key]
        assert got == expected, key


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"steps": 2.5}, "steps: Input should be a valid integer"),
        ({"guidance": -3}, "guidance: Input should be greater than or equal to 0"),
        ({"guidance": [1.5, 31]}, r"guidance\.1: Input should be less than or equal to 30"),
        ({"aug_level": 7}, "aug_level: Input should be less than or equal to 1"),
        ({"seed": 2**63}, "seed: Input should be less than 9223372036854775808"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"strength": 0}, "strength: Input should be greater than 0"),
        ({"steps": []}, "steps: Value error, give a number or a non-empty list"),
        ({"guidance_interval": [0.8, 0.2]}, r"guidance_interval: Value error, give \[lo, hi\]"),
        ({"guidance_interval": [0.5, 1.5]}, r"guidance_interval\.1: Input should be less"),
        ({"guidance_interval": [0.5]}, r"guidance_interval\.1: Field required"),
        ({"sampler": "euler"}, "sampler"),
        ({"steps_typo": 3}, "steps_typo: unknown key"),
    ],
)
def test_sample_settings_are_range_checked(change, match) -> None:
    with pytest.raises(ConfigError, match=match):
        SampleConfig().updated(**change)
    key, value = next(iter(change.items()))
    with pytest.raises(ConfigError, match=f"sample.{match}"):
        tiny_params(f"sample.{key}={value}")


def test_sample_updated_keeps_the_rest_and_skips_none() -> None:
    cfg = SampleConfig(seed=4, steps=7)
    new = cfg.updated(seed=None, steps=[5, 3], negative_prompt="  ")
    assert (new.seed, new.steps, new.negative_prompt) == (4, (5, 3), None)
    assert cfg.steps == 7, "the original is unchanged"
