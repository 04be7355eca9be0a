"""Plot helpers draw what they are given (checked on the artists), files are written, tables summarise correctly."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from clml_core import plotting  # noqa: E402
from clml_core.plotting import STYLE  # noqa: E402

CLASSES = ["cat", "dog", "car", "tree"]


@pytest.fixture(autouse=True)
def _close_figures():
    plotting.apply_style()
    yield
    plt.close("all")


def _bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def _same_color(a, b) -> bool:
    return np.allclose(mcolors.to_rgba(a), mcolors.to_rgba(b))


def _runs() -> pd.DataFrame:
    """Six runs: two losses x without/with CLML, with uneven seed counts and hand-checkable values."""
    rows = [
        ("bce", False, 0, 50.0),
        ("bce", False, 1, 52.0),
        ("bce", True, 0, 55.0),
        ("bce", True, 1, 57.0),
        ("hill", False, 0, 60.0),
        ("hill", True, 0, 60.5),
    ]
    frame = pd.DataFrame(rows, columns=["loss", "clml", "seed", "test_map"])
    frame["protocol"] = "40% left"
    frame["corr_precision"] = [np.nan, np.nan, 0.8, 0.6, np.nan, 0.7]
    frame["corr_recall"] = [np.nan, np.nan, 0.2, 0.4, np.nan, 0.3]
    return frame


# ----------------------------------------------------------------------------------------------------- files


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig, ax = plotting.panels()
    ax.plot([0, 1], [0, 1])
    paths = plotting.save_figure(fig, tmp_path / "sub" / "figure.v1")
    assert [p.name for p in paths] == ["figure.v1.png", "figure.v1.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    first = paths[1].read_bytes()
    plotting.save_figure(fig, tmp_path / "sub" / "figure.v1")
    assert paths[1].read_bytes() == first  # no creation date: re-rendering gives the same file


def test_panels_size_follows_style():
    fig, axes = plotting.panels(2, 3)
    assert axes.shape == (2, 3)
    width, height = STYLE["panel_size"]
    assert np.allclose(fig.get_size_inches(), (3 * width, 2 * height))


# ------------------------------------------------------------------------------------------- data statistics


def test_labels_per_image_bars_draws_shares():
    fig, ax = plt.subplots()
    plotting.labels_per_image_bars(ax, {"full": [0, 2, 6, 2], "single positive": [0, 10]})
    assert np.allclose(_bar_heights(ax), [0, 0.2, 0.6, 0.2, 0, 1.0])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["full (mean 2.00)", "single positive (mean 1.00)"]
    with pytest.raises(ValueError, match="positive sum"):
        plotting.labels_per_image_bars(ax, {"empty": [0, 0]})
    with pytest.raises(ValueError, match="empty"):
        plotting.labels_per_image_bars(ax, {})


def test_class_frequency_bars():
    fig, ax = plt.subplots()
    plotting.class_frequency_bars(ax, {"full": [0.5, 0.3, 0.2, 0.1], "40% left": [0.2, 0.1, 0.1, 0.05]}, CLASSES)
    assert np.allclose(_bar_heights(ax), [0.5, 0.3, 0.2, 0.1, 0.2, 0.1, 0.1, 0.05])
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        plotting.class_frequency_bars(ax, {"full": [0.5, 0.3, 0.2]}, CLASSES)


def test_cooccurrence_heatmap_shows_the_matrix():
    matrix = np.random.default_rng(0).random((4, 4))
    fig, ax = plt.subplots()
    plotting.cooccurrence_heatmap(ax, matrix, CLASSES, label="P(col | row)")
    mesh = ax.collections[0]
    assert np.allclose(np.asarray(mesh.get_array()).reshape(4, 4), matrix)
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    with pytest.raises(ValueError, match="shape"):
        plotting.cooccurrence_heatmap(ax, matrix[:3], CLASSES)


def test_sample_image_grid_colours_observed_and_missing():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    labels = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]])
    observed = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    fig, axes = plt.subplots(2, 2)
    plotting.sample_image_grid(axes, images, labels, observed, CLASSES, title="40% left")
    flat = axes.ravel()
    assert [len(ax.images) for ax in flat] == [1, 1, 1, 0]
    assert not flat[3].axison
    np.testing.assert_array_equal(flat[1].images[0].get_array(), images[1])
    for ax, full, seen in zip(flat, labels, observed):
        texts = {t.get_text(): t.get_color() for t in ax.texts}
        assert set(texts) == {CLASSES[c] for c in np.flatnonzero(full)}
        for col in np.flatnonzero(full):
            expected = STYLE["observed"] if seen[col] else STYLE["missing"]
            assert _same_color(texts[CLASSES[col]], expected)
    assert len(fig.legends) == 1 and fig.legends[0].get_title().get_text() == "40% left"
    with pytest.raises(ValueError, match=r"observed\[0, 2\]"):
        plotting.sample_image_grid(axes, images, labels, labels | np.array([0, 0, 1, 0]), CLASSES)
    with pytest.raises(ValueError, match="3 images for 2 axes"):
        plotting.sample_image_grid(axes[0], images, labels, observed, CLASSES)


# ------------------------------------------------------------------------------------------- learning curves


def _metrics(correction: bool) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "train_loss": [900.0, 500.0, 300.0],
            "train_base": [800.0, 450.0, 280.0],
            "train_clml": [100.0, 50.0, 20.0],
            "train_local": [110.0, 60.0, 30.0],
            "train_global": [90.0, 80.0, 70.0],
            "corr_precision": [np.nan, 0.7, 0.8] if correction else [np.nan] * 3,
            "corr_recall": [np.nan, 0.1, 0.3] if correction else [np.nan] * 3,
            "val_map": [30.0, 45.0, 44.0],
        }
    )


def test_loss_curves_plots_nonzero_terms_per_epoch():
    metrics = _metrics(True)
    fig, ax = plt.subplots()
    plotting.loss_curves(ax, metrics)
    assert len(ax.lines) == 5
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3])
    assert ax.get_xlim() == (0.5, 3.5)
    np.testing.assert_array_equal(ax.lines[4].get_ydata(), [90.0, 80.0, 70.0])
    assert ax.get_yscale() == "symlog"
    base_only = metrics.assign(train_clml=0.0, train_local=0.0, train_global=0.0)
    fig, ax = plt.subplots()
    plotting.loss_curves(ax, base_only)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["total", "base loss"]
    with pytest.raises(ValueError, match="'epoch'"):
        plotting.loss_curves(ax, metrics.drop(columns="epoch"))


def test_val_map_curve_marks_best_epoch():
    fig, ax = plt.subplots()
    plotting.val_map_curve(ax, _metrics(True).assign(val_map_ema=[20.0, 30.0, 46.0]))
    assert len(ax.lines) == 2
    marks = [c.get_offsets()[0].tolist() for c in ax.collections]
    assert marks == [[2.0, 45.0], [3.0, 46.0]]


def test_correction_curves_active_and_inactive():
    fig, ax = plt.subplots()
    plotting.correction_curves(ax, _metrics(True))
    assert len(ax.lines) == 2
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [np.nan, 0.1, 0.3])
    fig, ax = plt.subplots()
    plotting.correction_curves(ax, _metrics(False))
    assert not ax.lines
    assert "inactive" in ax.texts[0].get_text()


# ---------------------------------------------------------------------------------------- results over seeds


def test_grouped_points_mean_std_and_seed_dots():
    runs = _runs()
    fig, ax = plt.subplots()
    colors = {False: STYLE["without_clml"], True: STYLE["with_clml"]}
    plotting.grouped_points(ax, runs, "loss", "clml", hue_labels={False: "base", True: "+ CLML"}, colors=colors)
    without, with_ = ax.containers  # one error-bar container per hue, groups bce then hill
    np.testing.assert_allclose(without.lines[0].get_ydata(), [51.0, 60.0])
    np.testing.assert_allclose(with_.lines[0].get_ydata(), [56.0, 60.5])
    np.testing.assert_allclose(without.lines[0].get_xdata(), [-0.15, 0.85])  # dodged by 0.6 / 2 hues
    np.testing.assert_allclose(with_.lines[0].get_xdata(), [0.15, 1.15])
    assert _same_color(without.lines[0].get_color(), STYLE["without_clml"])
    segments = without.lines[2][0].get_segments()
    assert np.allclose([s[1, 1] - s[0, 1] for s in segments], [2 * np.std([50, 52], ddof=1), 0.0])  # ± std; 1 seed: 0
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sorted(np.concatenate([c.get_offsets()[:, 1] for c in dots])) == sorted(runs["test_map"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bce", "hill"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base", "+ CLML"]
    assert ax.get_ylabel() == "test mAP (%)"


def test_sensitivity_plot_band_and_baseline():
    runs = pd.DataFrame({"value": [3.0, 3.0, 0.1, 0.1, 1.0], "test_map": [40.0, 42.0, 50.0, 54.0, 47.0]})
    fig, ax = plt.subplots()
    plotting.sensitivity_plot(ax, runs, baseline=[45.0, 47.0], log_x=True, label="lam")
    line = ax.lines[0]
    np.testing.assert_array_equal(line.get_xdata(), [0.1, 1.0, 3.0])
    np.testing.assert_array_equal(line.get_ydata(), [52.0, 47.0, 41.0])
    band = ax.collections[0].get_paths()[0].vertices
    assert np.isclose(band[:, 1].max(), 52.0 + np.std([50, 54], ddof=1))
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "1", "3"]
    assert np.allclose(ax.lines[1].get_ydata(), 46.0)  # the baseline's mean
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lam", "without CLML"]


# ------------------------------------------------------------------------------------------------ embeddings


def test_embedding_scatter_colours_groups_and_greys_the_rest():
    coords = np.random.default_rng(0).normal(size=(10, 2))
    groups = ["a"] * 2 + ["other"] * 5 + ["b"] * 3
    fig, ax = plt.subplots()
    plotting.embedding_scatter(ax, coords, groups)
    assert [len(c.get_offsets()) for c in ax.collections] == [5, 3, 2]  # other, then by decreasing size
    assert _same_color(ax.collections[0].get_facecolor()[0], STYLE["other"])
    np.testing.assert_allclose(ax.collections[2].get_offsets(), coords[:2])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["other", "b", "a"]
    with pytest.raises(ValueError, match="coords must be"):
        plotting.embedding_scatter(ax, coords[:, :1], groups)


# ------------------------------------------------------------------------------------- curves and intervals


def test_band_curves_draw_mean_and_band_per_hue():
    summary = pd.DataFrame(
        {
            "clml": [False, False, True, True],
            "epoch": [0, 1, 0, 1],
            "mean": [30.0, 40.0, 31.0, 41.0],
            "low": [28.0, 38.0, np.nan, np.nan],
            "high": [32.0, 42.0, np.nan, np.nan],
        }
    )
    fig, ax = plt.subplots()
    plotting.band_curves(ax, summary, "clml", hue_labels={False: "base", True: "+ CLML"}, ylabel="mAP")
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2])  # 1-based epochs
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [31.0, 41.0])
    band = ax.collections[0].get_paths()[0].vertices
    assert np.isclose(band[:, 1].min(), 28.0) and np.isclose(band[:, 1].max(), 42.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base", "+ CLML"]
    empty = plotting.band_curves(plt.subplots()[1], summary.iloc[:0], "clml")
    assert empty.texts[0].get_text() == "nothing logged"


def _per_class_table():
    return pd.DataFrame(
        {
            "class": ["a", "b"],
            "frequency": [0.5, 0.05],
            "AP without CLML_mean": [60.0, 10.0],
            "AP with CLML_mean": [61.0, 8.0],
            "diff": [1.0, -2.0],
            "diff_low": [0.5, np.nan],
            "diff_high": [1.5, np.nan],
        }
    )


def test_per_class_ap_and_change_draw_the_table():
    fig, (left, right) = plt.subplots(1, 2)
    plotting.per_class_ap(left, _per_class_table())
    base, clml = left.collections[1], left.collections[2]
    np.testing.assert_allclose(base.get_offsets(), [[0.5, 60.0], [0.05, 10.0]])
    np.testing.assert_allclose(clml.get_offsets(), [[0.5, 61.0], [0.05, 8.0]])
    assert left.get_xscale() == "log"
    plotting.per_class_change(right, _per_class_table())
    container = right.containers[0]
    np.testing.assert_allclose(container.lines[0].get_ydata(), [1.0, -2.0])
    segments = container.lines[2][0].get_segments()
    assert np.allclose([s[:, 1] for s in segments], [[0.5, 1.5], [-2.0, -2.0]])  # no interval: no bar
    assert [t.get_text() for t in right.texts] == ["a", "b"]


def test_reliability_share_and_counts():
    bins = pd.DataFrame(
        {"low": [0.0, 0.5], "high": [0.5, 1.0], "missing": [1, 3], "negative": [9, 1], "share": [0.1, 0.75]}
    )
    fig, (top, bottom) = plt.subplots(2, 1)
    plotting.reliability_share(top, bins, tau=0.6)
    np.testing.assert_allclose(top.lines[1].get_xdata(), [0.25, 0.75])
    np.testing.assert_allclose(top.lines[1].get_ydata(), [0.1, 0.75])
    assert np.allclose(top.lines[2].get_xdata(), 0.6)  # tau
    plotting.reliability_counts(bottom, bins, tau=0.6)
    assert _bar_heights(bottom) == [9, 1, 1, 3]  # negatives, then missing positives
    assert bottom.get_yscale() == "log"


# ------------------------------------------------------------------------------- the notebooks' shared figures


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    return buffer.getvalue()


def test_main_results_figure_is_one_grouped_points_panel_per_protocol():
    runs = pd.concat([_runs(), _runs().assign(protocol="single positive", test_map=lambda f: f["test_map"] - 10)])
    fig = plotting.main_results_figure(runs, ["single positive", "40% left"])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["single positive", "40% left"]
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    np.testing.assert_allclose(axes[0].containers[0].lines[0].get_ydata(), [41.0, 50.0])  # without CLML, bce / hill
    np.testing.assert_allclose(axes[1].containers[1].lines[0].get_ydata(), [56.0, 60.5])  # with CLML
    assert _same_color(axes[1].containers[1].lines[0].get_color(), STYLE["with_clml"])
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["base loss", "+ CLML"]
    default = plotting.main_results_figure(runs)  # protocols in order of first appearance
    assert [ax.get_title() for ax in default.axes] == ["40% left", "single positive"]
    # The same drawing as the notebooks composed by hand before.
    by_hand, hand_axes = plotting.panels(1, 2, sharey=True, squeeze=False)
    for ax, protocol in zip(hand_axes[0], ["40% left", "single positive"]):
        part = runs[runs["protocol"] == protocol]
        colors = {False: STYLE["without_clml"], True: STYLE["with_clml"]}
        plotting.grouped_points(
            ax, part, "loss", "clml", hue_labels={False: "base loss", True: "+ CLML"}, colors=colors
        )
        ax.set_title(protocol)
    assert _png(default) == _png(by_hand)


def _ablation() -> pd.DataFrame:
    rows = [
        ("base", "none", 0, 50.0),
        ("base", "fixed tau", 0, 51.0),
        ("+ both (CLML)", "none", 0, 53.0),
        ("+ both (CLML)", "fixed tau", 0, 55.0),
        ("+ both (CLML)", "fixed tau", 1, 57.0),
    ]
    return pd.DataFrame(rows, columns=["terms", "correction", "seed", "test_map"])


def test_ablation_figure_points_per_term_set_and_correction():
    ablation = _ablation()
    fig = plotting.ablation_figure(ablation, "bce, 40% left")
    (ax,) = fig.axes
    assert ax.get_title() == "bce, 40% left"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "+ both (CLML)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "fixed tau"]
    np.testing.assert_allclose(ax.containers[1].lines[0].get_ydata(), [51.0, 56.0])
    assert np.allclose(fig.get_size_inches(), (8, 3.5))
    by_hand, hand_ax = plotting.panels(figsize=(8, 3.5))
    plotting.grouped_points(hand_ax, ablation, "terms", "correction")
    hand_ax.set_title("bce, 40% left")
    assert _png(fig) == _png(by_hand)


def test_sensitivity_figure_lambda_and_tau_panels():
    sensitivity = pd.DataFrame(
        {
            "param": ["lam", "lam", "lam", "tau", "tau"],
            "value": [0.1, 1.0, 1.0, 0.5, 0.8],
            "test_map": [48.0, 50.0, 52.0, 47.0, 49.0],
        }
    )
    baseline = pd.Series([45.0, 47.0])
    fig = plotting.sensitivity_figure(sensitivity, baseline, "bce + CLML", "40% left")
    lam, tau = fig.axes
    assert (lam.get_xlabel(), tau.get_xlabel()) == ("λ", "τ")
    assert (lam.get_xscale(), tau.get_xscale()) == ("log", "linear")
    assert lam.get_shared_y_axes().joined(lam, tau)
    np.testing.assert_array_equal(lam.lines[0].get_ydata(), [48.0, 51.0])
    np.testing.assert_array_equal(tau.lines[0].get_xdata(), [0.5, 0.8])
    assert np.allclose(tau.lines[1].get_ydata(), 46.0)  # the baseline in both panels
    assert [t.get_text() for t in tau.get_legend().get_texts()] == ["bce + CLML", "without CLML"]
    assert fig.get_suptitle() == "40% left"
    by_hand, hand_axes = plotting.panels(1, 2, sharey=True)
    for ax, param in zip(hand_axes, ["lam", "tau"]):
        part = sensitivity[sensitivity["param"] == param]
        plotting.sensitivity_plot(ax, part, baseline=baseline, log_x=param == "lam", label="bce + CLML")
        ax.set_xlabel({"lam": "λ", "tau": "τ"}[param])
    by_hand.suptitle("40% left")
    assert _png(fig) == _png(by_hand)


def test_embeddings_figure_one_titled_panel_per_model_one_legend():
    rng = np.random.default_rng(0)
    groups = ["a"] * 4 + ["other"] * 6
    coords = pd.concat(
        [pd.DataFrame({"model": m, "x": rng.normal(size=10), "y": rng.normal(size=10), "group": groups}) for m in "PQ"]
    )
    numbers = pd.DataFrame({"model": ["P", "Q"], "knn_label_precision": [0.5, 0.75], "silhouette": [0.1, -0.2]})
    fig = plotting.embeddings_figure(coords, numbers)
    left, right = fig.axes
    assert right.get_title() == "Q\nkNN label precision 0.750\nsilhouette -0.200"
    assert left.get_legend() is None and right.get_legend() is not None
    np.testing.assert_allclose(right.collections[1].get_offsets(), coords[coords["model"] == "Q"][["x", "y"]][:4])
    single = plotting.embeddings_figure(coords, numbers.iloc[:1])  # one panel: a single Axes, still legended
    assert len(single.axes) == 1 and single.axes[0].get_legend() is not None
