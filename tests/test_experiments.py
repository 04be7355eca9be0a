"""The study's run grids: which runs each holds and the configuration each resolves to."""

from __future__ import annotations

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
