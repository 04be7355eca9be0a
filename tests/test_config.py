"""Configuration: presets, YAML files, typed overrides and strict booleans."""

import dataclasses

import pytest
import yaml

from clml_core.config import (
    AUTHORS,
    PRESETS,
    CLMLConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_updates,
    authors_overrides,
    choices,
    from_dict,
    parse_overrides,
    resolve_config,
    to_dict,
    validate_config,
)
from clml_core.study import PROFILES, check_profiles

SECTIONS = {"": TrainConfig, "data.": DataConfig, "model.": ModelConfig, "loss.": LossConfig, "clml.": CLMLConfig}
SECTIONS["optim."] = OptimConfig


def _choice_fields() -> dict[str, tuple[str, ...]]:
    """Every choice field's dotted key and values, found from the annotations."""
    found = {}
    for prefix, section in SECTIONS.items():
        for item in dataclasses.fields(section):
            try:
                found[prefix + item.name] = choices(section, item.name)
            except ValueError:
                continue
    return found


def _nested(key: str, value: object) -> dict:
    *sections, name = key.split(".")
    update: dict = {name: value}
    for section in reversed(sections):
        update = {section: update}
    return update


def test_presets_resolve():
    for name in PRESETS:
        real_data = PRESETS[name].get("data", {}).get("dataset", "synthetic") != "synthetic"
        overrides = {"data": {"root": "/nowhere"}} if real_data else None
        config = resolve_config(name, overrides=overrides)
        assert config.name == name
    paper = resolve_config("paper", overrides={"data": {"root": "/x"}})
    assert (paper.model.arch, paper.data.image_size, paper.optim.lr, paper.optim.ema_decay) == (
        "resnet101",
        448,
        1e-4,
        0.9997,
    )
    assert paper.optim.batch_size == 64 and paper.data.augment == "authors"


def test_overrides_are_typed():
    config = resolve_config(
        "smoke", overrides=["optim.lr=3e-4", "optim.epochs=3", "clml.enabled=false", "model.proj_dim=none"]
    )
    assert config.optim.lr == 3e-4 and config.optim.epochs == 3
    assert config.clml.enabled is False and config.model.proj_dim is None
    assert resolve_config("smoke", overrides=["model.proj_dim=128"]).model.proj_dim == 128


@pytest.mark.parametrize("text", ["maybe", "2", "yes please"])
def test_booleans_are_strict(text):
    with pytest.raises(ValueError, match="clml.enabled.*boolean"):
        resolve_config("smoke", overrides=[f"clml.enabled={text}"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "unknown config field 'optim.lrr'"),
        ("optim.epochs=2.5", "optim.epochs.*integer"),
        ("clml.tau=1.5", "clml.tau"),
        ("data.protocol=half", "data.protocol"),
        ("data.dataset=coco", "data.root"),
        ("noequals", "section.field=value"),
        ("data.synthetic_size=huge", "'data.synthetic_size': 'huge' is not one of tiny, default"),
        ("optim.lr=nan", "'optim.lr': expected a finite number, got nan"),
        ("clml.delta=inf", "'clml.delta': expected a finite number"),
        ("optim.ema_decay=1", "'optim.ema_decay': must be in"),
        ("model.arch=vgg", "'model.arch': 'vgg' is not one of"),
        ("loss.kwargs={gamma: 2}", "'loss.kwargs': make_base_loss"),
        ("data.workers=-1", "'data.workers': must be >= 0"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("smoke", overrides=[override])


def test_yaml_file_between_preset_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  epochs: 5\nclml:\n  lam: 0.5\n")
    config = resolve_config("smoke", path, ["optim.epochs=7"])
    assert (config.optim.lr, config.optim.epochs, config.clml.lam) == (0.01, 7, 0.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ValueError, match=f"{bad}.*optim.momentum"):
        resolve_config("smoke", bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        resolve_config("smoke", tmp_path / "missing.yaml")


def test_round_trip():
    config = resolve_config("default", overrides=["loss.base=focal", "loss.kwargs={gamma: 3.0}"])
    assert from_dict(to_dict(config)) == config
    assert config.loss.kwargs == {"gamma": 3.0}


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "d=2"]) == {"a": {"b": "1", "c": "x"}, "d": "2"}


def test_fp16_with_a_loss_scale_is_refused_naming_both_fields():
    with pytest.raises(ValueError, match="config fields 'optim.amp' and 'optim.loss_scale' contradict"):
        resolve_config("smoke", overrides=["optim.amp=fp16", "optim.loss_scale=65536"])
    assert resolve_config("smoke", overrides=["optim.amp=bf16", "optim.loss_scale=65536"]).optim.loss_scale == 65536


def test_loss_scale_doublings_need_a_starting_scale():
    with pytest.raises(ValueError, match="'optim.loss_scale_doublings' and 'optim.loss_scale' contradict"):
        resolve_config("smoke", overrides=["optim.loss_scale_doublings=16"])
    with pytest.raises(ValueError, match="'optim.loss_scale_doublings': must be >= 0"):
        resolve_config("smoke", overrides=["optim.loss_scale=65536", "optim.loss_scale_doublings=-1"])


def test_authors_setting_trains_as_the_release_ran():
    def released(base):
        overrides = authors_overrides(base, values=True)
        overrides.setdefault("loss", {})["base"] = base
        return resolve_config("default", overrides=overrides)

    config = released("splc")
    assert config.clml.authors_release and config.optim.amp == "off"
    assert config.optim.loss_scale == 65536.0 and config.optim.loss_scale_doublings == pytest.approx(16.68, abs=0.01)
    assert 65536 * 2 ** int(26 * 1283 / 2000) == 2**32  # the release's scale after 26 epochs of 1283 steps
    assert config.clml.tau == 0.75 and config.loss.kwargs == {"tau": 0.7}
    assert released("focal").loss.kwargs == {"detach_focal_weight": True}
    ours = resolve_config("default", overrides=authors_overrides("bce", values=False))
    assert ours.clml.tau == 0.6 and ours.loss.kwargs == {} and ours.clml.authors_release
    assert AUTHORS["values"] == {"clml": {"tau": 0.75}}  # authors_overrides copies, never mutates


def test_choice_fields_are_the_literal_annotated_ones():
    assert sorted(_choice_fields()) == [
        "data.augment",
        "data.cache_format",
        "data.dataset",
        "data.decode",
        "data.protocol",
        "data.val_labels",
        "device",
        "loss.reduction",
        "model.head",
        "model.train_mode",
        "optim.amp",
        "optim.early_stop",
        "optim.schedule",
    ]
    assert choices(DataConfig, "dataset") == ("synthetic", "coco", "voc", "nuswide")
    assert choices(OptimConfig, "amp") == ("off", "bf16", "fp16")
    for field in ("arch", "nope"):  # a registry-checked field, a missing one
        with pytest.raises(ValueError, match=f"ModelConfig.*{field}"):
            choices(ModelConfig, field)


@pytest.mark.parametrize("key", sorted(_choice_fields()))
def test_a_choice_field_takes_its_values_and_refuses_others_naming_them(key):
    valid = _choice_fields()[key]
    for value in valid:
        apply_updates(TrainConfig(), _nested(key, value))
    message = f"override: config field '{key}': 'bogus' is not one of {', '.join(valid)}"
    with pytest.raises(ValueError, match=message):
        resolve_config("smoke", overrides=[f"{key}=bogus"])


def test_a_yaml_boolean_for_a_choice_names_the_file_and_says_to_quote(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  amp: off\n")  # YAML 1.1 reads an unquoted off as False
    with pytest.raises(ValueError, match=r"c.yaml: config field 'optim.amp': False is not one of .*quote the value"):
        resolve_config("smoke", path)
    path.write_text("optim:\n  amp: 'off'\n")
    assert resolve_config("smoke", path).optim.amp == "off"


def test_validate_config_checks_choices_of_a_config_built_in_code():
    config = dataclasses.replace(TrainConfig(), optim=OptimConfig(amp="fp32"))
    with pytest.raises(ValueError, match="^run/config.yaml: config field 'optim.amp': 'fp32' is not one of off, bf16"):
        validate_config(config, "run/config.yaml")
    with pytest.raises(ValueError, match="^config field 'device': 'gpu' is not one of auto, cpu, cuda$"):
        validate_config(dataclasses.replace(TrainConfig(), device="gpu"))


@pytest.mark.parametrize(
    "section,message",
    [
        (DataConfig(fraction=0.0), "'data.fraction': must be in"),
        (DataConfig(workers=-1), "'data.workers': must be >= 0"),
        (DataConfig(dataset="voc"), "'data.root': required"),
        (DataConfig(root="/x"), "'data.dataset' and 'data.root' contradict"),
        (ModelConfig(arch="vgg"), "'model.arch': 'vgg' is not one of"),
        (ModelConfig(train_mode="partial"), "'model.trainable_stages'"),
        (LossConfig(base="nope"), "'loss.base': unknown base loss"),
        (CLMLConfig(tau=1.0), "'clml.tau': must be in"),
        (CLMLConfig(lam=float("nan")), "'clml.lam': expected a finite number"),
        (OptimConfig(amp="fp16", loss_scale=2.0), "'optim.amp' and 'optim.loss_scale' contradict"),
        (TrainConfig(name="a/b"), "'name': must be a non-empty name"),
    ],
)
def test_each_section_validates_itself(section, message):
    type(section)().validate()  # the defaults are valid
    with pytest.raises(ValueError, match=message):
        section.validate()


def test_checks_between_sections_run_after_the_sections():
    config = dataclasses.replace(TrainConfig(), data=DataConfig(feature_views=2))
    with pytest.raises(ValueError, match="'data.feature_views': only used with model.train_mode=frozen"):
        validate_config(config)
    config.data.validate()  # valid as a section alone


def test_every_preset_survives_a_run_folders_yaml():
    for name in PRESETS:
        real_data = PRESETS[name].get("data", {}).get("dataset", "synthetic") != "synthetic"
        config = resolve_config(name, overrides={"data": {"root": "/nowhere"}} if real_data else None)
        text = yaml.safe_dump(to_dict(config), sort_keys=False)
        assert from_dict(yaml.safe_load(text), source=name) == config


def test_every_study_profile_names_an_existing_preset():
    assert all(profile["PRESET"] in PRESETS for profile in PROFILES.values())
    check_profiles(PROFILES)
    with pytest.raises(ValueError, match="study profile 'x': PRESET='nope' is not a configuration preset"):
        check_profiles({"x": {**PROFILES["smoke"], "PRESET": "nope"}})
    with pytest.raises(ValueError, match="study profile 'y': PRESET=None"):
        check_profiles({"y": {"SMOKE": True}})
