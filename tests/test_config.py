"""Configuration: presets, YAML files, typed overrides and strict booleans."""

import pytest

from clml_core.config import AUTHORS, PRESETS, authors_overrides, from_dict, parse_overrides, resolve_config, to_dict


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
