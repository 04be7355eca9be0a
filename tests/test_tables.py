"""Table builders: paired comparisons by seed (t interval) or, for one seed, a bootstrap over saved test scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from clml_core import tables
from clml_core.metrics import average_precision_per_class, mean_average_precision
from clml_core.stats import (
    benjamini_hochberg,
    bootstrap_map_difference,
    holm,
    image_resamples,
    paired_difference,
    pooled_interval,
    resampled_average_precision,
    resampled_map,
    t_interval,
    two_level_interval,
)


def _runs() -> pd.DataFrame:
    """bce: three seeds a side, CLML better by 1.5, 2, 2.5 in seeds 0, 1, 2; hill: one seed a side."""
    rows = [
        ("bce", False, 0, 50.0),
        ("bce", False, 1, 52.0),
        ("bce", False, 2, 48.0),
        ("bce", True, 0, 51.5),
        ("bce", True, 1, 54.0),
        ("bce", True, 2, 50.5),
        ("hill", False, 0, 60.0),
        ("hill", True, 0, 60.5),
    ]
    frame = pd.DataFrame(rows, columns=["loss", "clml", "seed", "test_map"])
    frame["protocol"] = "40% left"
    frame["folder"] = [f"/nonexistent/{i}" for i in range(len(frame))]
    frame["corr_precision"] = [np.nan] * 3 + [0.8, 0.6, 0.7] + [np.nan, 0.7]
    frame["corr_recall"] = [np.nan] * 3 + [0.2, 0.4, 0.3] + [np.nan, 0.3]
    return frame


def _save_scores(folder, labels, scores):
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "test_embeddings.npz", labels=labels, scores=scores)


def test_main_table_paired_t_interval_and_single_seed_bootstrap(tmp_path):
    runs = _runs()
    rng = np.random.default_rng(0)
    labels = (rng.random((80, 3)) < 0.3).astype(int)
    scores_base, scores_clml = labels + rng.normal(0, 1, labels.shape), labels + rng.normal(0, 0.7, labels.shape)
    hill = runs["loss"] == "hill"
    runs.loc[hill, "folder"] = [str(tmp_path / "base"), str(tmp_path / "clml")]
    _save_scores(tmp_path / "base", labels, scores_base)
    _save_scores(tmp_path / "clml", labels, scores_clml)

    # Seeds only (test_images=False reads no file): the paired t interval over seeds.
    table = tables.main_table(runs, n_resamples=200, test_images=False).set_index("loss")
    bce = table.loc["bce"]
    low, high = scipy_stats.t.interval(0.95, 2, loc=2.0, scale=scipy_stats.sem([1.5, 2.0, 2.5]))
    assert (bce["without CLML_mean"], bce["with CLML_mean"], bce["diff"]) == (50.0, 52.0, 2.0)
    assert np.isclose(bce["without CLML_std"], 2.0) and np.isclose(
        bce["with CLML_std"], np.std([51.5, 54, 50.5], ddof=1)
    )
    assert np.allclose([bce["diff_low"], bce["diff_high"]], [low, high])
    assert bce["CI excludes 0"] and bce["CI"] == "t, 3 seeds" and bce["n seeds"] == "3"
    # An unpaired rule (|diff| > std + std) would call this no effect: pairing removes the seed-to-seed swing.
    assert abs(bce["diff"]) < bce["without CLML_std"] + bce["with CLML_std"]
    p = scipy_stats.ttest_rel([51.5, 54.0, 50.5], [50.0, 52.0, 48.0]).pvalue
    assert np.isclose(bce["p"], p) and np.isclose(bce["p_holm"], p) and np.isclose(bce["p_bh"], p)  # one test
    assert bce["decision"] == "higher" and bce["CI covers"] == "seeds only"
    assert np.allclose([bce["diff_seeds_low"], bce["diff_seeds_high"]], [low, high])
    hill_seeds = table.loc["hill"]  # one seed and no test images: no interval, and no decision
    assert np.isnan(hill_seeds["diff_low"]) and hill_seeds["CI"] == "1 seed, no interval"
    assert hill_seeds["decision"] == "1 seed: no decision" and np.isnan(hill_seeds["p_holm"])

    # One seed with test images: an interval over the test images only, labelled as a single-seed comparison.
    hill_runs = runs[hill].assign(test_map=[mean_average_precision(labels, s) for s in (scores_base, scores_clml)])
    hill_row = tables.main_table(hill_runs, n_resamples=200).iloc[0]
    expected = bootstrap_map_difference(labels, scores_clml, scores_base, n_resamples=200, seed=0)
    half = scipy_stats.t.ppf(0.975, 79) * expected.se  # the same resamples: the standard error of its draws
    assert np.allclose([hill_row["diff"], hill_row["diff_low"], hill_row["diff_high"]],
                       [expected.estimate, expected.estimate - half, expected.estimate + half])  # fmt: skip
    width = expected.high - expected.low  # and about the percentile interval of the same draws
    assert abs(hill_row["diff_low"] - expected.low) < 0.2 * width > abs(hill_row["diff_high"] - expected.high)
    assert hill_row["CI"] == "two-level, 1 seed x 80 images" and hill_row["CI covers"] == "1 seed: test images only"
    assert hill_row["decision"] == "1 seed: no decision" and np.isnan(hill_row["p_holm"])
    assert np.isnan(hill_row["without CLML_std"]) and np.isnan(hill_row["diff_seeds_low"])

    text = tables.format_summary(tables.main_table(runs, n_resamples=200, test_images=False))
    assert text.columns.tolist() == ["protocol", "loss", "without CLML", "with CLML", "diff (95% CI)", "p",
                                     "p (Holm)", "p (BH)", "decision", "CI excludes 0", "CI covers", "CI",
                                     "seeds-only CI", "n seeds"]  # fmt: skip
    assert text.iloc[0].tolist() == ["40% left", "bce", "50.00 ± 2.00", "52.00 ± 1.80",
                                     f"+2.00 [{low:+.2f}, {high:+.2f}]", f"{p:.3f}", f"{p:.3f}", f"{p:.3f}",
                                     "higher", "yes", "seeds only", "t, 3 seeds", f"[{low:+.2f}, {high:+.2f}]",
                                     "3"]  # fmt: skip
    assert text.iloc[1]["without CLML"] == "60.00"


def test_single_seed_without_saved_scores_names_the_file():
    runs = _runs()
    with pytest.raises(FileNotFoundError, match="test_embeddings.npz"):
        tables.main_table(runs[runs["loss"] == "hill"])


def test_compare_runs_pairs_by_seed_and_rejects_duplicates():
    runs = _runs()
    treated = runs[(runs["loss"] == "bce") & runs["clml"]].iloc[::-1]  # order does not matter
    control = runs[(runs["loss"] == "bce") & ~runs["clml"]].iloc[:2]  # seeds 0 and 1 only
    result = tables.compare_runs(treated, control, test_images=False)
    assert result["n pairs"] == 2 and np.isclose(result["diff"], 1.75)
    assert result["CI"] == "t, 2 seeds, 1 unpaired run left out"  # the treated seed 2 has no control run
    with pytest.raises(ValueError, match="more than once"):
        tables.compare_runs(pd.concat([treated, treated]), control, test_images=False)
    none = tables.compare_runs(treated.assign(seed=treated["seed"] + 10), control, test_images=False)
    assert none["n pairs"] == 0 and none["CI excludes 0"] is None
    assert none["CI"] == "no paired seed, 5 unpaired runs left out"


def test_comparison_table_against_a_reference():
    runs = _runs()
    bce = runs[runs["loss"] == "bce"]
    reference = bce[~bce["clml"]]
    table = tables.comparison_table(bce, ["clml"], reference, "bce without CLML", test_images=False)
    summary = ["clml", "mAP_mean", "mAP_std", "corr precision (run)_mean", "corr recall (run)_mean",
               "corr precision (selected epoch)_mean", "corr recall (selected epoch)_mean"]  # fmt: skip
    comparison = ["diff", "diff_low", "diff_high", "p", "p_holm", "p_bh", "decision", "CI excludes 0", "CI covers",
                  "CI", "diff_seeds_low", "diff_seeds_high", "vs", "n seeds"]  # fmt: skip
    assert table.columns.tolist() == summary + comparison
    same, clml = table.iloc[0], table.iloc[1]
    assert (same["diff"], same["diff_low"], same["diff_high"]) == (0.0, 0.0, 0.0)  # the reference against itself
    assert clml["diff"] == 2.0 and np.isclose(clml["corr precision (run)_mean"], 0.7) and clml["n seeds"] == 3
    assert pd.isna(same["corr precision (run)_mean"])
    # The reference against itself is no test: no p-value, not in the adjusted family.
    assert same["decision"] == "reference" and np.isnan(same["p"]) and np.isnan(same["p_holm"])
    p = scipy_stats.ttest_rel([51.5, 54.0, 50.5], [50.0, 52.0, 48.0]).pvalue
    assert np.isclose(clml["p"], p) and np.isclose(clml["p_holm"], p) and clml["decision"] == "higher"
    text = tables.format_summary(table)
    assert text.iloc[0]["corr precision (run)"] == "n/a" and text.iloc[1]["vs"] == "bce without CLML"


def test_seed_summary_includes_correction_quality():
    table = tables.seed_summary(_runs(), ["loss", "clml"])
    row = table[(table["loss"] == "bce") & table["clml"]].iloc[0]
    assert np.isclose(row["corr precision (run)_mean"], 0.7) and np.isclose(row["corr recall (run)_mean"], 0.3)
    assert row["n seeds"] == 3
    text = tables.format_summary(table)
    correction = ["corr precision (run)", "corr recall (run)", "corr precision (selected epoch)",
                  "corr recall (selected epoch)"]  # fmt: skip
    assert text.columns.tolist() == ["loss", "clml", "mAP", *correction, "n seeds"]
    assert text.iloc[0].tolist() == ["bce", "no", "50.00 ± 2.00", "n/a", "n/a", "n/a", "n/a", "3"]


def test_per_class_table_pairs_classes_by_seed():
    rows = []
    for seed in range(3):
        for clml in (False, True):
            rows.append({"seed": seed, "clml": clml, "class": "rare", "ap": 10.0 + seed + (2.0 + seed) * clml})
            rows.append({"seed": seed, "clml": clml, "class": "common", "ap": 70.0 + seed - 1.0 * clml})
    table = tables.per_class_table(pd.DataFrame(rows), {"rare": 0.05, "common": 0.6}, test_images=False)
    assert table["class"].tolist() == ["common", "rare"]  # by decreasing frequency
    common, rare = table.iloc[0], table.iloc[1]
    assert common["diff"] == -1.0 and common["diff_low"] == common["diff_high"] == -1.0
    low, high = scipy_stats.t.interval(0.95, 2, loc=3.0, scale=scipy_stats.sem([2.0, 3.0, 4.0]))
    assert np.allclose([rare["diff"], rare["diff_low"], rare["diff_high"]], [3.0, low, high])
    assert rare["AP without CLML_mean"] == 11.0 and rare["frequency"] == 0.05
    with pytest.raises(ValueError, match="no frequency"):
        tables.per_class_table(pd.DataFrame(rows), {"rare": 0.05}, test_images=False)
    # A class without a test positive (AP NaN in every run, as a rare VOC class in a small test split) has no row.
    absent = [{"seed": seed, "clml": clml, "class": "absent", "ap": np.nan} for seed in range(3) for clml in (0, 1)]
    table = tables.per_class_table(
        pd.DataFrame(rows + absent), {"rare": 0.05, "common": 0.6, "absent": 0.001}, test_images=False
    )
    assert table["class"].tolist() == ["common", "rare"]


def test_epoch_summary_mean_and_band_per_epoch():
    metrics = pd.DataFrame(
        {
            "clml": [False] * 4 + [True] * 4,
            "seed": [0, 0, 1, 1] * 2,
            "epoch": [0, 1] * 4,
            "val_map": [30.0, 40.0, 32.0, 44.0, 31.0, np.nan, 33.0, 45.0],
        }
    )
    summary = tables.epoch_summary(metrics, ["clml"], "val_map")
    base = summary[~summary["clml"]]
    assert base["mean"].tolist() == [31.0, 42.0] and base["n"].tolist() == [2, 2]
    low, high = scipy_stats.t.interval(0.95, 1, loc=31.0, scale=scipy_stats.sem([30.0, 32.0]))
    assert np.allclose(base[["low", "high"]].iloc[0], [low, high])
    clml_last = summary[summary["clml"] & (summary["epoch"] == 1)].iloc[0]
    assert clml_last["mean"] == 45.0 and clml_last["n"] == 1 and np.isnan(clml_last["low"])  # NaN left out


def test_markdown_table_and_save_table(tmp_path):
    table = pd.DataFrame({"name": ["a|b", "c"], "mAP_mean": [1.0, 2.5], "mAP_std": [0.5, np.nan]})
    md = tables.markdown_table(tables.format_summary(table))
    assert md.splitlines() == ["| name | mAP |", "|---|---|", "| a\\|b | 1.00 ± 0.50 |", "| c | 2.50 |"]
    csv, md_path = tables.save_table(table, tmp_path / "t" / "table")
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)
    assert md_path.read_text() == md


def test_format_interval():
    assert tables.format_interval(1.234, -0.5, 2.0) == "+1.23 [-0.50, +2.00]"
    assert tables.format_interval(-1.0, np.nan, np.nan) == "-1.00"
    assert tables.format_interval(np.nan, np.nan, np.nan) == "n/a"


# ------------------------------------------------------------------------ intervals over seeds and test images

CLASSES = np.array(["cat", "dog", "car", "bus"])


def _study(tmp_path, cells=(("40% left", "bce"), ("40% left", "hill")), seeds=(0, 1, 2), n=60, seed=0):
    """Runs with saved test scores on one shared test set: per cell and seed a run without and with CLML."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(CLASSES))) < 0.3).astype(int)
    labels[:2] = 1
    labels[2:6, 3] = 0
    labels[2, 3] = 1  # "bus": 3 positives
    rows = []
    for protocol, loss in cells:
        for s in seeds:
            for clml in (False, True):
                scores = labels + rng.normal(0, 0.8 if clml else 1.0, labels.shape)
                folder = tmp_path / f"{protocol}-{loss}-{s}-{int(clml)}"
                folder.mkdir(parents=True)
                np.savez_compressed(folder / "test_embeddings.npz", labels=labels, scores=scores, classes=CLASSES)
                rows.append({"protocol": protocol, "loss": loss, "clml": clml, "seed": s, "folder": str(folder),
                             "test_map": mean_average_precision(labels, scores), "corr_precision": 0.5 * clml,
                             "corr_recall": 0.1 * clml})  # fmt: skip
    return pd.DataFrame(rows), labels


def _loaded(folder):
    with np.load(Path(folder) / "test_embeddings.npz") as saved:
        return saved["scores"]


def _expected_interval(cell, labels, n_resamples=200):
    """The two-level interval of a cell computed from stats directly (the same resamples as the table's)."""
    resamples = image_resamples(labels, n_resamples, seed=0)
    treated = cell[cell["clml"]].sort_values("seed")
    control = cell[~cell["clml"]].sort_values("seed")
    d = treated["test_map"].to_numpy() - control["test_map"].to_numpy()
    draws = np.column_stack([resampled_map(resamples, _loaded(t))[1] - resampled_map(resamples, _loaded(c))[1]
                             for t, c in zip(treated["folder"], control["folder"])])  # fmt: skip
    return d, draws, two_level_interval(d, draws, n_images=len(labels))


def test_main_table_two_level_interval_from_saved_scores(tmp_path):
    runs, labels = _study(tmp_path)
    table = tables.main_table(runs, n_resamples=200)
    for row, (_, cell) in zip(table.to_dict("records"), runs.groupby("loss", sort=False)):
        d, _, expected = _expected_interval(cell, labels)
        assert np.allclose([row["diff"], row["diff_low"], row["diff_high"], row["p"]],
                           [expected.estimate, expected.low, expected.high, expected.p_value])  # fmt: skip
        assert row["CI covers"] == "seeds + test images" and row["CI"] == "two-level, 3 seeds x 60 images"
        seeds_only = paired_difference(d, np.zeros(3))
        assert np.allclose([row["diff_seeds_low"], row["diff_seeds_high"]], [seeds_only.low, seeds_only.high])
        assert row["CI excludes 0"] == (row["p"] < 0.05)
    assert np.allclose(table["p_holm"], holm(table["p"])) and np.allclose(table["p_bh"], benjamini_hochberg(table["p"]))
    for row in table.itertuples(index=False):
        expected = ("higher" if row.diff > 0 else "lower") if row.p_holm < 0.05 else "not separated"
        assert row.decision == expected


def test_an_arm_missing_a_seed_uses_the_paired_seeds_only(tmp_path):
    runs, labels = _study(tmp_path, cells=(("40% left", "bce"),))
    lacking = runs.drop(runs.index[(runs["clml"]) & (runs["seed"] == 2)])
    row = tables.main_table(lacking, n_resamples=200).iloc[0]
    paired = lacking[lacking["seed"] < 2]
    assert row["n seeds"] == "2 paired (3 / 2 runs)" and row["CI"].endswith(", 1 unpaired run left out")
    base = paired[~paired["clml"]]["test_map"]
    assert np.isclose(row["without CLML_mean"], base.mean()) and np.isclose(row["without CLML_std"], base.std())
    _, _, expected = _expected_interval(paired, labels)
    assert np.allclose([row["diff"], row["diff_low"], row["diff_high"]], [expected.estimate, expected.low,
                                                                           expected.high])  # fmt: skip
    table = tables.comparison_table(lacking[lacking["clml"]], ["clml"], lacking[~lacking["clml"]], "base",
                                    n_resamples=200)  # fmt: skip
    assert table["n seeds"].iloc[0] == 2 and np.isclose(
        table["mAP_mean"].iloc[0], paired[paired["clml"]]["test_map"].mean()
    )


def test_frame_values_must_be_the_saved_scores_map(tmp_path):
    runs, labels = _study(tmp_path, cells=(("40% left", "bce"),))
    with pytest.raises(ValueError, match="min_positives"):
        tables.main_table(runs.assign(test_map=runs["test_map"] + 0.1), n_resamples=200)
    # A frame holding the mAP of the well-populated classes: pass their threshold ("bus" has 3 positives).
    frequent = []
    for folder in runs["folder"]:
        ap = average_precision_per_class(labels, _loaded(folder))
        frequent.append(float(ap[labels.sum(axis=0) >= 5].mean()))
    table = tables.main_table(runs.assign(test_map=frequent), n_resamples=200, min_positives=5)
    treated, control = np.array(frequent)[runs["clml"].to_numpy()], np.array(frequent)[~runs["clml"].to_numpy()]
    assert np.isclose(table["diff"].iloc[0], (treated - control).mean()) and table["p"].notna().all()
    with pytest.raises(TypeError, match="unknown keyword"):
        tables.main_table(runs, resamples=10)


def test_runs_scored_on_different_test_sets_are_rejected(tmp_path):
    runs, labels = _study(tmp_path, cells=(("40% left", "bce"),))
    other = runs["folder"].iloc[-1]
    np.savez_compressed(Path(other) / "test_embeddings.npz", labels=1 - labels, scores=_loaded(other), classes=CLASSES)
    with pytest.raises(ValueError, match="different test sets"):
        tables.main_table(runs, n_resamples=200)


def test_comparison_table_with_test_images_leaves_the_reference_out_of_the_family(tmp_path):
    runs, labels = _study(tmp_path, cells=(("40% left", "bce"), ("40% left", "hill"), ("40% left", "asl")))
    base = runs[(runs["loss"] == "bce") & ~runs["clml"]]
    setting = runs[runs["clml"] | (runs["loss"] == "bce")].assign(
        name=lambda f: np.where(f["clml"], f["loss"] + " + CLML", "base")
    )
    table = tables.comparison_table(setting, ["name"], base, "base", n_resamples=200).set_index("name")
    assert table.loc["base", "decision"] == "reference" and np.isnan(table.loc["base", "p_holm"])
    assert (table.loc["base", "diff"], table.loc["base", "diff_low"], table.loc["base", "diff_high"]) == (0, 0, 0)
    others = table.drop(index="base")
    assert np.allclose(others["p_holm"], holm(others["p"])) and np.allclose(
        others["p_bh"], benjamini_hochberg(others["p"])
    )
    cell = pd.concat([runs[(runs["loss"] == "hill") & runs["clml"]], base])
    _, _, expected = _expected_interval(cell, labels)
    assert np.allclose(table.loc["hill + CLML", ["diff", "diff_low", "diff_high", "p"]].astype(float),
                       [expected.estimate, expected.low, expected.high, expected.p_value])  # fmt: skip
    assert np.isclose(table.loc["hill + CLML", "corr precision (run)_mean"], 0.5)


def test_per_class_table_two_level_interval_per_class(tmp_path):
    runs, labels = _study(tmp_path, cells=(("40% left", "bce"),))
    per_class = pd.DataFrame(
        [
            {**run, "class": name, "ap": ap}
            for run in runs.to_dict("records")
            for name, ap in zip(CLASSES, average_precision_per_class(labels, _loaded(run["folder"])))
        ]
    )
    frequency = dict(zip(CLASSES, [0.4, 0.3, 0.2, 0.05]))
    table = tables.per_class_table(per_class, frequency, n_resamples=200).set_index("class")
    resamples = image_resamples(labels, 200, seed=0)
    treated, control = runs[runs["clml"]].sort_values("seed"), runs[~runs["clml"]].sort_values("seed")
    for c, name in enumerate(CLASSES):
        full = [resampled_average_precision(resamples, _loaded(f)) for f in (*treated["folder"], *control["folder"])]
        d = np.array([full[i][0][c] - full[i + 3][0][c] for i in range(3)])
        draws = np.column_stack([full[i][1][:, c] - full[i + 3][1][:, c] for i in range(3)])
        expected = two_level_interval(d, draws, n_images=len(labels))
        assert np.allclose(table.loc[name, ["diff", "diff_low", "diff_high", "p"]].astype(float),
                           [expected.estimate, expected.low, expected.high, expected.p_value])  # fmt: skip
    assert np.allclose(table["p_holm"], holm(table["p"]))
    assert table.index.tolist() == ["cat", "dog", "car", "bus"] and (table["CI covers"] == "seeds + test images").all()
    with pytest.raises(ValueError, match="does not match|saved test scores"):
        tables.per_class_table(per_class.assign(ap=per_class["ap"] + 1), frequency, n_resamples=200)


# ---------------------------------------------------------------------------------------------- pooled table


def test_pooled_table_joint_interval_over_cells_and_the_claim(tmp_path):
    cells = (("40% left", "bce"), ("40% left", "hill"), ("single positive", "bce"))
    runs, labels = _study(tmp_path, cells=cells)
    table = tables.pooled_table(runs, split_by="protocol", name="missing-label cells", claim=1.2, n_resamples=200)
    assert table["cells"].tolist() == ["missing-label cells", "protocol = 40% left", "protocol = single positive"]
    assert table["n cells"].tolist() == [3, 2, 1] and (table["n seeds"] == 3).all()
    parts = [_expected_interval(cell, labels) for _, cell in runs.groupby(["protocol", "loss"], sort=False)]
    d, draws = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts], axis=1)  # (K, S), (B, K, S)
    expected = pooled_interval(d, draws, n_images=len(labels))
    first = table.iloc[0]
    assert np.allclose(first[["diff", "diff_low", "diff_high", "p"]].astype(float),
                       [expected.estimate, expected.low, expected.high, expected.p_value])  # fmt: skip
    assert np.isclose(first["diff"], d.mean())  # the equal-weight mean of the cells' effects
    assert first["claim inside CI"] == (expected.low <= 1.2 <= expected.high) and first["claim"] == 1.2
    assert first["CI"] == "pooled two-level, 3 cells x 3 seeds x 60 images"
    # A pooled row over one cell is that cell's interval (as in the main table).
    single = tables.main_table(runs[runs["protocol"] == "single positive"], n_resamples=200).iloc[0]
    assert np.allclose(table.iloc[2][["diff", "diff_low", "diff_high"]].astype(float),
                       [single["diff"], single["diff_low"], single["diff_high"]])  # fmt: skip
    assert np.allclose(table["p_holm"], holm(table["p"]))
    # Seeds only: the t interval of the per-seed means over the cells.
    seeds_only = tables.pooled_table(runs, test_images=False).iloc[0]
    t = t_interval(d.mean(axis=0))
    assert np.allclose([seeds_only["diff_low"], seeds_only["diff_high"]], [t.low, t.high])
    assert seeds_only["CI covers"] == "seeds only" and np.isnan(seeds_only["claim"])
    assert seeds_only["claim inside CI"] is None
    text = tables.format_summary(table)
    assert text["claim"].iloc[0] == "+1.20" and text["claim inside CI"].iloc[0] in ("yes", "no")


def test_pooled_row_keeps_the_seeds_paired_in_every_cell(tmp_path):
    runs, labels = _study(tmp_path, cells=(("40% left", "bce"), ("40% left", "hill")))
    lacking = runs.drop(runs.index[(runs["loss"] == "hill") & (runs["seed"] == 0) & runs["clml"]])
    row = tables.pooled_row(lacking, n_resamples=200)
    assert row["n seeds"] == 2 and row["CI"].endswith(", 3 unpaired runs left out")  # hill's seed-0 base, bce's 0
    kept = lacking[lacking["seed"] > 0]
    parts = [_expected_interval(cell, labels) for _, cell in kept.groupby("loss", sort=False)]
    expected = pooled_interval(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts], axis=1),
                               n_images=len(labels))  # fmt: skip
    assert np.allclose([row["diff"], row["diff_low"], row["diff_high"]], [expected.estimate, expected.low,
                                                                           expected.high])  # fmt: skip
    one = tables.pooled_row(runs[runs["seed"] == 1], n_resamples=200)
    assert one["CI covers"] == "1 seed: test images only" and one["n seeds"] == 1
    assert tables.pooled_table(runs[runs["seed"] == 1], n_resamples=200)["decision"].iloc[0] == "1 seed: no decision"
