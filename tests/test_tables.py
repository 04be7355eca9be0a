"""Table builders: paired comparisons by seed (t interval) or, for one seed, a bootstrap over saved test scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from clml_core import tables
from clml_core.stats import bootstrap_map_difference


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

    table = tables.main_table(runs, n_resamples=200).set_index("loss")
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

    expected = bootstrap_map_difference(labels, scores_clml, scores_base, n_resamples=200, seed=0)
    hill_row = table.loc["hill"]
    assert np.allclose([hill_row["diff"], hill_row["diff_low"], hill_row["diff_high"]],
                       [expected.estimate, expected.low, expected.high])  # fmt: skip
    assert hill_row["CI"] == "bootstrap, 1 seed x 80 images"
    assert np.isnan(hill_row["without CLML_std"])

    text = tables.format_summary(tables.main_table(runs, n_resamples=200))
    assert text.columns.tolist() == ["protocol", "loss", "without CLML", "with CLML", "diff (95% CI)",
                                     "CI excludes 0", "CI", "n seeds"]  # fmt: skip
    assert text.iloc[0].tolist() == ["40% left", "bce", "50.00 ± 2.00", "52.00 ± 1.80",
                                     f"+2.00 [{low:+.2f}, {high:+.2f}]", "yes", "t, 3 seeds", "3"]  # fmt: skip
    assert text.iloc[1]["without CLML"] == "60.00"


def test_single_seed_without_saved_scores_names_the_file():
    runs = _runs()
    with pytest.raises(FileNotFoundError, match="test_embeddings.npz"):
        tables.main_table(runs[runs["loss"] == "hill"])


def test_compare_runs_pairs_by_seed_and_rejects_duplicates():
    runs = _runs()
    treated = runs[(runs["loss"] == "bce") & runs["clml"]].iloc[::-1]  # order does not matter
    control = runs[(runs["loss"] == "bce") & ~runs["clml"]].iloc[:2]  # seeds 0 and 1 only
    result = tables.compare_runs(treated, control)
    assert result["n pairs"] == 2 and np.isclose(result["diff"], 1.75)
    assert result["CI"] == "t, 2 seeds"
    with pytest.raises(ValueError, match="more than once"):
        tables.compare_runs(pd.concat([treated, treated]), control)
    none = tables.compare_runs(treated.assign(seed=treated["seed"] + 10), control)
    assert none["n pairs"] == 0 and none["CI excludes 0"] is None and none["CI"] == "no paired seed"


def test_comparison_table_against_a_reference():
    runs = _runs()
    bce = runs[runs["loss"] == "bce"]
    reference = bce[~bce["clml"]]
    table = tables.comparison_table(bce, ["clml"], reference, "bce without CLML")
    summary = ["clml", "mAP_mean", "mAP_std", "corr_precision_mean", "corr_recall_mean"]
    comparison = ["diff", "diff_low", "diff_high", "CI excludes 0", "CI", "vs", "n seeds"]
    assert table.columns.tolist() == summary + comparison
    same, clml = table.iloc[0], table.iloc[1]
    assert (same["diff"], same["diff_low"], same["diff_high"]) == (0.0, 0.0, 0.0)  # the reference against itself
    assert clml["diff"] == 2.0 and np.isclose(clml["corr_precision_mean"], 0.7) and clml["n seeds"] == 3
    assert pd.isna(same["corr_precision_mean"])
    text = tables.format_summary(table)
    assert text.iloc[0]["corr_precision"] == "n/a" and text.iloc[1]["vs"] == "bce without CLML"


def test_seed_summary_includes_correction_quality():
    table = tables.seed_summary(_runs(), ["loss", "clml"])
    row = table[(table["loss"] == "bce") & table["clml"]].iloc[0]
    assert np.isclose(row["corr_precision_mean"], 0.7) and np.isclose(row["corr_recall_mean"], 0.3)
    assert row["n seeds"] == 3
    text = tables.format_summary(table)
    assert text.columns.tolist() == ["loss", "clml", "mAP", "corr_precision", "corr_recall", "n seeds"]
    assert text.iloc[0].tolist() == ["bce", "no", "50.00 ± 2.00", "n/a", "n/a", "3"]


def test_per_class_table_pairs_classes_by_seed():
    rows = []
    for seed in range(3):
        for clml in (False, True):
            rows.append({"seed": seed, "clml": clml, "class": "rare", "ap": 10.0 + seed + (2.0 + seed) * clml})
            rows.append({"seed": seed, "clml": clml, "class": "common", "ap": 70.0 + seed - 1.0 * clml})
    table = tables.per_class_table(pd.DataFrame(rows), {"rare": 0.05, "common": 0.6})
    assert table["class"].tolist() == ["common", "rare"]  # by decreasing frequency
    common, rare = table.iloc[0], table.iloc[1]
    assert common["diff"] == -1.0 and common["diff_low"] == common["diff_high"] == -1.0
    low, high = scipy_stats.t.interval(0.95, 2, loc=3.0, scale=scipy_stats.sem([2.0, 3.0, 4.0]))
    assert np.allclose([rare["diff"], rare["diff_low"], rare["diff_high"]], [3.0, low, high])
    assert rare["AP without CLML_mean"] == 11.0 and rare["frequency"] == 0.05
    with pytest.raises(ValueError, match="no frequency"):
        tables.per_class_table(pd.DataFrame(rows), {"rare": 0.05})
    # A class without a test positive (AP NaN in every run, as a rare VOC class in a small test split) has no row.
    absent = [{"seed": seed, "clml": clml, "class": "absent", "ap": np.nan} for seed in range(3) for clml in (0, 1)]
    table = tables.per_class_table(pd.DataFrame(rows + absent), {"rare": 0.05, "common": 0.6, "absent": 0.001})
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
