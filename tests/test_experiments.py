"""The study's run grids: which runs each holds and the configuration each resolves to."""

from __future__ import annotations

from clml_core.config import resolve_config
from clml_core.experiments import ablation_grid, main_grid, reference_grid, sensitivity_grid


def test_ablation_grid_rows_and_correction_rules():
    specs = ablation_grid("smoke", "bce", "40% left", [0, 1])
    rows = list(dict.fromkeys((s.labels["terms"], s.labels["correction"]) for s in specs))
    assert rows == [
        ("base", "none"),
        ("base", "fixed tau"),
        ("base", "class quantile"),
        ("+ local", "none"),
        ("+ local", "fixed tau"),
        ("+ global", "none"),  # the global term reads no labels: correction would change nothing
        ("+ both (CLML)", "none"),
        ("+ both (CLML)", "fixed tau"),
        ("+ both (CLML)", "class quantile"),
        ("authors' release (as it ran)", "fixed tau"),
    ]
    assert len(specs) == 2 * len(rows) and len({s.folder("r") for s in specs}) == len(specs)
    by_variant = {s.variant: s.config() for s in specs if s.seed == 0}
    base_quantile = by_variant["base + quantile correction"].clml
    assert (base_quantile.enabled, base_quantile.correction, base_quantile.correct_base) == (False, True, True)
    assert base_quantile.quantile == 0.9
    clml = by_variant["+ both (CLML) + correction"].clml
    assert (clml.enabled, clml.correction, clml.quantile, clml.correct_base) == (True, True, 0.0, False)
    assert by_variant["+ local"].clml.global_weight == 0.0 and not by_variant["+ local"].clml.correction
    released = by_variant["authors release as run"]
    assert released.clml.authors_release and released.clml.correction and released.clml.tau == 0.6  # our values
    assert (released.optim.amp, released.optim.loss_scale) == ("off", 65536.0)
    assert released.optim.loss_scale_doublings == 26 * 1283 / 2000  # the release's growing GradScaler
    with_values = ablation_grid("smoke", "bce", "40% left", [0], authors_values=True)[-1]
    assert with_values.variant == "authors release as run with its values" and with_values.config().clml.tau == 0.75


def test_reference_grid_trains_on_full_labels_without_clml():
    specs = reference_grid("smoke", "bce", [0, 1, 2])
    assert [s.seed for s in specs] == [0, 1, 2]
    config = specs[0].config()
    assert config.data.protocol == "full" and not config.clml.enabled and config.loss.base == "bce"
    assert specs[0].labels == {"protocol": "full labels", "loss": "bce", "clml": False}


def test_main_and_sensitivity_grids_pair_seeds():
    main = main_grid("smoke", ["bce", "hill"], ["40% left"], [0, 1])
    assert len(main) == 2 * 2 * 2 and {s.labels["clml"] for s in main} == {False, True}
    sensitivity = sensitivity_grid("smoke", "bce", "40% left", [0, 1], [0.01, 10.0], [0.7])
    assert [s.variant for s in sensitivity[::2]] == ["lam=0.01", "lam=10", "tau=0.7"]
    assert sensitivity[2].config().clml.lam == 10.0


def test_collect_frames_read_each_runs_saved_results(tmp_path):
    import numpy as np
    import pandas as pd

    from clml_core.experiments import collect, collect_metrics, collect_per_class, collect_reliability, run_specs

    overrides = {"data": {"limit_train": 64}, "optim": {"epochs": 2}}
    specs = main_grid("smoke", ["bce"], ["40% left"], [0], overrides)  # without and with CLML
    run_specs(specs, tmp_path, processes=1)
    runs = collect(tmp_path, specs)
    assert runs["clml"].tolist() == [False, True] and runs["test_map"].between(0, 100).all()

    per_class = collect_per_class(runs)
    saved = pd.read_json(runs["folder"][0] + "/results.json", typ="series")["test_ap_per_class"]
    first = per_class[per_class["folder"] == runs["folder"][0]]
    assert first["class"].tolist() == list(saved) and np.allclose(first["ap"], list(saved.values()), equal_nan=True)
    assert len(per_class) == 2 * len(saved)

    metrics = collect_metrics(runs)
    assert metrics.groupby("clml")["epoch"].apply(list).tolist() == [[0, 1], [0, 1]]
    assert "corr_precision" in metrics and "test_map" not in metrics  # the epoch's own columns, not the run's

    bins = collect_reliability(runs, bins=5)
    with np.load(runs["folder"][1] + "/train_scores.npz") as scores:
        unobserved = int((scores["observed"] == 0).sum())
    clml_bins = bins[bins["clml"]]
    assert len(clml_bins) == 5 and int(clml_bins["missing"].sum() + clml_bins["negative"].sum()) == unobserved


def test_a_finished_run_of_another_configuration_is_not_reused(tmp_path):
    import pytest

    from clml_core.experiments import RunSpec, run_specs

    overrides = {"data": {"limit_train": 64}, "optim": {"epochs": 1}, "clml": {"lam": 1.0}}
    spec = RunSpec("g", "v", 0, "smoke", overrides)
    run_specs([spec], tmp_path, processes=1)
    run_specs([spec], tmp_path, processes=1)  # the same configuration: reused, nothing trains
    changed = RunSpec("g", "v", 0, "smoke", {**overrides, "clml": {"lam": 0.5}})  # same folder, another lambda
    with pytest.raises(ValueError, match=r"1 finished run\(s\) .*clml\.lam: 1\.0 -> 0\.5.*--force"):
        run_specs([changed], tmp_path, processes=1)


def test_an_interrupted_study_run_is_resumed(tmp_path):
    from clml_core.engine import train
    from clml_core.experiments import RunSpec, run_specs, train_config

    spec = RunSpec("main/40% left", "bce", 0, "smoke", {"data": {"limit_train": 64}, "optim": {"epochs": 1}})
    folder = spec.folder(tmp_path)
    assert train(train_config(spec), folder, max_steps=1) == {}  # stopped as a crash would leave it
    assert not (folder / "results.json").exists()
    run_specs([spec], tmp_path, processes=1)  # reads the folder's config.yaml back and continues
    assert (folder / "results.json").exists()


def test_the_seed_varies_the_mask_and_the_validation_carve_but_not_the_test_split():
    specs = main_grid("smoke", ["bce"], ["40% left"], [0, 3])
    base = resolve_config("smoke")
    for spec in specs:
        data = spec.config().data
        assert (data.protocol_seed, data.split_seed) == (base.data.protocol_seed + spec.seed, base.data.split_seed)
