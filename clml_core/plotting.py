"""How the study's results are shown: plot helpers on a given Axes and one style.

Every plot helper draws on the matplotlib ``Axes`` it is given (an array of Axes for the image grid) and returns
it, so notebooks compose figures freely; colours and sizes live in :data:`STYLE` only. The multi-panel figures
that more than one notebook shows (``*_figure``) are built once here from the collected run frames.
:func:`save_figure` writes a figure as PNG and PDF. Helpers draw what they are given: the numbers (summaries over
seeds, intervals, per-class tables, reliability bins) come from :mod:`clml_core.tables`, :mod:`clml_core.stats`,
:mod:`clml_core.correction` and :mod:`clml_core.embedding_metrics`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from clml_core.tables import mean_std

#: Every style constant of the study's figures.
STYLE: dict[str, Any] = {
    "context": "paper",
    "style": "whitegrid",
    "palette": "colorblind",
    "font_scale": 1.2,
    "dpi": 150,  # PNG resolution
    "panel_size": (4.2, 3.2),  # inches per panel of :func:`panels`
    "observed": "#0173B2",  # an observed positive label
    "missing": "#DE8F05",  # a positive label the protocol removed
    "without_clml": "#949494",
    "with_clml": "#029E73",
    "other": "#D0D0D0",  # points outside the highlighted label-set groups
    "heatmap": "rocket_r",
    "band_alpha": 0.2,  # error bands (± one standard deviation over seeds)
    "point_size": 14,
}

#: Colour and legend text of the runs without (``False``) and with (``True``) CLML, the ``clml`` column of the runs.
CLML_COLORS: dict[bool, str] = {False: STYLE["without_clml"], True: STYLE["with_clml"]}
CLML_LABELS: dict[bool, str] = {False: "base loss", True: "+ CLML"}

#: Axis labels of the result columns of :func:`clml_core.experiments.collect`.
VALUE_LABELS: dict[str, str] = {
    "test_map": "test mAP (%)",
    "best_val_map": "best validation mAP (%)",
    "corr_precision": "correction precision",
    "corr_recall": "correction recall",
}

#: Loss-term columns of ``metrics.csv`` and their legend labels (see :class:`clml_core.losses.CLMLLoss`).
LOSS_TERMS: dict[str, str] = {
    "train_loss": "total",
    "train_base": "base loss",
    "train_clml": "CLML: λ/B (local − global)",
    "train_local": "local: Σ_k max(δ, ‖Z_k‖*)",
    "train_global": "global: ‖Z‖* (subtracted)",
}


def apply_style() -> None:
    """Set the seaborn theme and the matplotlib settings of every study figure (editable text in PDFs)."""
    sns.set_theme(
        context=STYLE["context"],
        style=STYLE["style"],
        palette=STYLE["palette"],
        font_scale=STYLE["font_scale"],
        rc={"savefig.bbox": "tight", "pdf.fonttype": 42, "ps.fonttype": 42, "figure.dpi": 100},
    )


def panels(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure of ``nrows x ncols`` panels of ``STYLE["panel_size"]`` (unless ``figsize`` is given); other
    ``plt.subplots`` keywords pass through."""
    width, height = STYLE["panel_size"]
    kwargs.setdefault("figsize", (width * ncols, height * nrows))
    kwargs.setdefault("layout", "constrained")
    return plt.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Write ``fig`` to ``path_stem.png`` (``STYLE["dpi"]``) and ``path_stem.pdf``, creating the folder.

    The PDF carries no creation date, so re-rendering unchanged results gives an identical file.

    Returns:
        The two paths written.
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    fig.savefig(png, dpi=STYLE["dpi"])
    fig.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]


# -------------------------------------------------------------------------------------------- data statistics


def labels_per_image_bars(ax: Axes, histograms: Mapping[str, Sequence[int]]) -> Axes:
    """Share of images with 0, 1, 2, ... positive labels, one bar colour per label matrix.

    Args:
        histograms: name (e.g. a protocol) -> image counts by number of labels, as ``labels_per_image_hist`` of
            :func:`clml_core.data.synthetic.label_statistics`.
    """
    if not histograms:
        raise ValueError("histograms is empty; give at least one name -> counts")
    width = 0.8 / len(histograms)
    for k, (name, counts) in enumerate(histograms.items()):
        counts = np.asarray(counts, dtype=float)
        if counts.ndim != 1 or counts.sum() <= 0:
            raise ValueError(f"histograms[{name!r}] must be a 1-D sequence of image counts with a positive sum")
        mean = float(np.arange(len(counts)) @ counts / counts.sum())
        x = np.arange(len(counts)) + (k - (len(histograms) - 1) / 2) * width
        ax.bar(x, counts / counts.sum(), width=width, label=f"{name} (mean {mean:.2f})")
    ax.set_xlabel("positive labels per image")
    ax.set_ylabel("share of images")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def class_frequency_bars(ax: Axes, frequencies: Mapping[str, Sequence[float]], classes: Sequence[str]) -> Axes:
    """Per-class share of images labelled positive, grouped bars per label matrix.

    Args:
        frequencies: name -> (C,) frequencies in [0, 1], as ``class_frequency`` of ``label_statistics``.
        classes: C class names, in the column order of the frequencies.
    """
    if not frequencies:
        raise ValueError("frequencies is empty; give at least one name -> (C,) frequencies")
    width = 0.8 / len(frequencies)
    for k, (name, freq) in enumerate(frequencies.items()):
        if len(freq) != len(classes):
            raise ValueError(f"frequencies[{name!r}] has {len(freq)} values for {len(classes)} classes")
        x = np.arange(len(classes)) + (k - (len(frequencies) - 1) / 2) * width
        ax.bar(x, freq, width=width, label=name)
    ax.set_xticks(np.arange(len(classes)), classes, rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("share of images")
    ax.legend(fontsize="small")
    return ax


def cooccurrence_heatmap(ax: Axes, matrix: np.ndarray, classes: Sequence[str], label: str = "") -> Axes:
    """A (C, C) label co-occurrence matrix as a heatmap, rows and columns named by class.

    Args:
        matrix: (C, C) values, e.g. P(column label | row label).
        classes: C class names.
        label: Colour-bar label.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(classes), len(classes)):
        raise ValueError(f"matrix must have shape ({len(classes)}, {len(classes)}), got {matrix.shape}")
    sns.heatmap(
        matrix,
        ax=ax,
        cmap=STYLE["heatmap"],
        square=True,
        xticklabels=classes,
        yticklabels=classes,
        cbar_kws={"label": label, "shrink": 0.8},
    )
    ax.tick_params(labelsize="x-small")
    return ax


def sample_image_grid(
    axes: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    observed: np.ndarray,
    classes: Sequence[str],
    title: str = "",
) -> np.ndarray:
    """Images with their positive labels written below: observed ones in one colour, missing ones in another.

    The colour legend (under ``title``) goes above the grid, on the figure.

    Args:
        axes: Array of Axes, one per image (extra Axes are switched off).
        images: (K, H, W, 3) uint8 images.
        labels: (K, C) full 0/1 labels.
        observed: (K, C) observed 0/1 labels, a subset of ``labels``.
        classes: C class names.
        title: Title above the legend, e.g. the protocol.

    Returns:
        ``axes``.
    """
    labels, observed = np.asarray(labels), np.asarray(observed)
    flat = np.asarray(axes).ravel()
    if len(images) > len(flat):
        raise ValueError(f"{len(images)} images for {len(flat)} axes")
    if labels.shape != observed.shape or labels.shape != (len(images), len(classes)):
        raise ValueError(
            f"labels {labels.shape} and observed {observed.shape} must both be ({len(images)}, {len(classes)})"
        )
    if (observed > labels).any():
        row, col = np.argwhere(observed > labels)[0]
        raise ValueError(f"observed[{row}, {col}] is positive but labels[{row}, {col}] is not")
    for ax in flat[len(images) :]:
        ax.set_axis_off()
    for ax, image, full, seen in zip(flat, images, labels, observed):
        ax.imshow(image)
        ax.set_anchor("N")  # image at the top of its cell, the label lines below
        ax.set_axis_off()
        for line, col in enumerate(np.flatnonzero(full)):
            color = STYLE["observed"] if seen[col] else STYLE["missing"]
            y = -0.04 - 0.14 * line  # one text line per label below the image, in axes coordinates
            ax.text(0.5, y, classes[col], color=color, transform=ax.transAxes, ha="center", va="top", fontsize="small")
    handles = [Patch(color=STYLE["observed"], label="observed"), Patch(color=STYLE["missing"], label="missing")]
    flat[0].figure.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, title=title or None
    )
    return axes


# --------------------------------------------------------------------------------------------- learning curves


def _epoch_axis(ax: Axes, metrics: pd.DataFrame) -> np.ndarray:
    """1-based epoch numbers of a ``metrics.csv`` frame (its ``epoch`` column is 0-based), set as ``ax``'s x axis."""
    if "epoch" not in metrics:
        raise ValueError(f"metrics needs an 'epoch' column, has {list(metrics.columns)}")
    epochs = metrics["epoch"].to_numpy() + 1
    ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    return epochs


def loss_curves(ax: Axes, metrics: pd.DataFrame) -> Axes:
    """Mean training loss terms per epoch (terms that are zero throughout are left out), symlog y axis.

    Args:
        metrics: A run's ``metrics.csv``; columns ``epoch`` and any of :data:`LOSS_TERMS`.
    """
    epochs = _epoch_axis(ax, metrics)
    for column, name in LOSS_TERMS.items():
        if column in metrics and (metrics[column].fillna(0) != 0).any():
            ax.plot(epochs, metrics[column], marker="o", label=name)
    ax.set_yscale("symlog", linthresh=1.0)  # terms differ by orders of magnitude; a weighted term can be 0
    ax.set_ylabel("mean loss per step")
    ax.legend(fontsize="small")
    return ax


def val_map_curve(ax: Axes, metrics: pd.DataFrame) -> Axes:
    """Validation mAP per epoch (and of the EMA weights when logged), the best epoch marked."""
    epochs = _epoch_axis(ax, metrics)
    for column, name in (("val_map", "model"), ("val_map_ema", "EMA")):
        if column in metrics:
            ax.plot(epochs, metrics[column], marker="o", label=name)
            best = int(np.nanargmax(metrics[column].to_numpy()))
            ax.scatter(epochs[best], metrics[column].iloc[best], s=90, facecolors="none", edgecolors="k", zorder=3)
    ax.set_ylabel("validation mAP (%)")
    ax.legend(fontsize="small")
    return ax


def correction_curves(ax: Axes, metrics: pd.DataFrame) -> Axes:
    """Precision and recall of the label correction per epoch, or a note when it was never active."""
    epochs = _epoch_axis(ax, metrics)
    active = metrics[["corr_precision", "corr_recall"]].notna().any().any()
    if active:
        ax.plot(epochs, metrics["corr_precision"], marker="o", label="precision")
        ax.plot(epochs, metrics["corr_recall"], marker="s", label="recall")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "label correction inactive\nin every epoch", transform=ax.transAxes, ha="center")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("correction of missing positives")
    return ax


# ---------------------------------------------------------------------------------------- results over seeds


def grouped_points(
    ax: Axes,
    runs: pd.DataFrame,
    x: str,
    hue: str,
    value: str = "test_map",
    *,
    hue_labels: Mapping[Any, str] | None = None,
    colors: Mapping[Any, str] | None = None,
) -> Axes:
    """Mean over seeds ± one standard deviation as a marker with an error bar, side by side per hue; the seeds
    as small dots beside it. Points rather than bars: differences of a few mAP points stay visible.

    Args:
        runs: One row per run with columns ``x``, ``hue`` and ``value``.
        x: Column whose values are the groups along the x axis, in order of first appearance.
        hue: Column whose values are the points within a group, in order of first appearance.
        value: Column averaged over the runs of a point.
        hue_labels: Legend text per hue value (default: the value).
        colors: Colour per hue value (default: the palette).
    """
    stats = mean_std(runs, [x, hue], value)
    groups, hues = list(pd.unique(runs[x])), list(pd.unique(runs[hue]))
    step = 0.6 / len(hues)  # x offset between the hues of a group
    palette = sns.color_palette(STYLE["palette"], len(hues))
    rng = np.random.default_rng(0)  # jitter of the seed dots
    for k, level in enumerate(hues):
        offset = (k - (len(hues) - 1) / 2) * step
        color = (colors or {}).get(level, palette[k])
        part = stats[stats[hue] == level]
        pos = np.array([groups.index(g) for g in part[x]]) + offset
        label = (hue_labels or {}).get(level, str(level))
        ax.errorbar(
            pos,
            part["mean"].to_numpy(float),
            yerr=part["std"].fillna(0).to_numpy(float),
            fmt="o",
            markersize=7,
            capsize=4,
            color=color,
            label=label,
        )
        seeds = runs[runs[hue] == level]
        seed_pos = np.array([groups.index(g) for g in seeds[x]]) + offset + step / 3
        jitter = rng.uniform(-step / 12, step / 12, len(seeds))
        ax.scatter(seed_pos + jitter, seeds[value], s=STYLE["point_size"], color=color, alpha=0.6, linewidths=0)
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups], rotation=20, ha="right")
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel(VALUE_LABELS.get(value, value))
    ax.legend(fontsize="small")
    return ax


def sensitivity_plot(
    ax: Axes,
    runs: pd.DataFrame,
    x: str = "value",
    value: str = "test_map",
    *,
    baseline: pd.Series | Sequence[float] | None = None,
    baseline_label: str = "without CLML",
    log_x: bool = False,
    label: str | None = None,
) -> Axes:
    """Mean over seeds against a hyperparameter with a ± one standard deviation band, the seeds as dots.

    Args:
        runs: One row per run with columns ``x`` and ``value``.
        baseline: Values of a reference (e.g. the base loss without CLML, one per seed), drawn as a dashed line
            at their mean with a band of ± their standard deviation.
        baseline_label: Legend text of the baseline.
        log_x: Logarithmic x axis.
        label: Legend text of the curve.
    """
    stats = mean_std(runs, [x], value).sort_values(x)
    xs, mean, std = stats[x].to_numpy(float), stats["mean"].to_numpy(), stats["std"].fillna(0).to_numpy()
    (line,) = ax.plot(xs, mean, marker="o", label=label)
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=STYLE["band_alpha"], linewidth=0)
    ax.scatter(runs[x], runs[value], s=STYLE["point_size"], color="k", zorder=3, linewidths=0)
    if baseline is not None and len(baseline):
        base = np.asarray(baseline, dtype=float)
        center, spread = base.mean(), base.std(ddof=1) if len(base) > 1 else 0.0
        ax.axhline(center, color=STYLE["without_clml"], linestyle="--", label=baseline_label)
        ax.axhspan(center - spread, center + spread, color=STYLE["without_clml"], alpha=STYLE["band_alpha"])
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel(VALUE_LABELS.get(value, value))
    if label is not None or baseline is not None:
        ax.legend(fontsize="small")
    return ax


def main_results_figure(main: pd.DataFrame, protocols: Sequence[str] | None = None) -> Figure:
    """The main grid's test mAP per base loss without and with CLML (:func:`grouped_points`), one panel per protocol.

    Args:
        main: One row per run of the main grid (:func:`clml_core.experiments.collect`): columns ``protocol``,
            ``loss``, ``clml`` and ``test_map``.
        protocols: The panels, in order (default: the protocols of ``main`` in order of first appearance).
    """
    protocols = list(pd.unique(main["protocol"])) if protocols is None else list(protocols)
    fig, axes = panels(1, len(protocols), sharey=True, squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        part = main[main["protocol"] == protocol]
        grouped_points(ax, part, "loss", "clml", hue_labels=CLML_LABELS, colors=CLML_COLORS)
        ax.set_title(protocol)
    return fig


def ablation_figure(ablation: pd.DataFrame, title: str = "") -> Figure:
    """The ablation grid's test mAP per term set, one point per label correction (:func:`grouped_points`).

    Args:
        ablation: One row per run of :func:`clml_core.experiments.ablation_grid`: columns ``terms``,
            ``correction`` and ``test_map``.
        title: Axes title, e.g. the loss and protocol.
    """
    fig, ax = panels(figsize=(8, 3.5))
    grouped_points(ax, ablation, "terms", "correction")
    ax.set_title(title)
    return fig


def sensitivity_figure(
    sensitivity: pd.DataFrame,
    baseline: pd.Series | Sequence[float],
    label: str | None = None,
    title: str = "",
) -> Figure:
    """Test mAP against λ (log axis) and against τ (:func:`sensitivity_plot`), side by side on one y axis.

    Args:
        sensitivity: One row per run: columns ``param`` (``"lam"`` or ``"tau"``), ``value`` and ``test_map``.
        baseline: Test mAP of the reference without CLML, one per seed, drawn in both panels.
        label: Legend text of the curves, e.g. ``"bce + CLML"``.
        title: Figure title, e.g. the protocol.
    """
    fig, axes = panels(1, 2, sharey=True)
    for ax, param in zip(axes, ["lam", "tau"]):
        sensitivity_plot(
            ax, sensitivity[sensitivity["param"] == param], baseline=baseline, log_x=param == "lam", label=label
        )
        ax.set_xlabel({"lam": "λ", "tau": "τ"}[param])
    fig.suptitle(title)
    return fig


# -------------------------------------------------------------------------------------------------- embeddings


def embedding_scatter(
    ax: Axes, coords: np.ndarray, groups: Sequence[str], other: str = "other", legend: bool = True
) -> Axes:
    """A 2-D embedding with the points of each group in their own colour and the ``other`` points in grey.

    Args:
        coords: (N, 2) coordinates.
        groups: (N,) group names; groups are coloured in order of decreasing size.
    """
    coords, groups = np.asarray(coords, dtype=float), np.asarray(groups, dtype=object)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(groups) != len(coords):
        raise ValueError(f"coords must be (N, 2) and groups (N,); got {coords.shape} and {groups.shape}")
    rest = groups == other
    ax.scatter(*coords[rest].T, s=STYLE["point_size"] / 2, color=STYLE["other"], linewidths=0, label=other)
    named = [name for name, _ in Counter(groups[~rest]).most_common()]
    palette = sns.color_palette(STYLE["palette"], max(len(named), 1))
    for name, color in zip(named, palette):
        ax.scatter(*coords[groups == name].T, s=STYLE["point_size"] * 1.5, color=color, linewidths=0, label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:  # panels of the same groups share colours: one legend serves them all
        ax.legend(fontsize="x-small", markerscale=1.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def embeddings_figure(coords: pd.DataFrame, numbers: pd.DataFrame) -> Figure:
    """One :func:`embedding_scatter` panel per model, titled with its kNN label precision and silhouette; the last
    panel carries the legend the panels share.

    Args:
        coords: One row per model and image: columns ``model``, ``x``, ``y`` and ``group``, as the coordinates of
            :func:`clml_core.embedding_metrics.embedding_panels`.
        numbers: One row per model, in panel order: columns ``model``, ``knn_label_precision`` and ``silhouette``.
    """
    fig, axes = panels(1, len(numbers), figsize=(4.5 * len(numbers), 4.5))
    axes = np.atleast_1d(axes)
    for ax, row in zip(axes, numbers.itertuples()):
        part = coords[coords["model"] == row.model]
        embedding_scatter(ax, part[["x", "y"]].to_numpy(), part["group"].to_numpy(), legend=ax is axes[-1])
        ax.set_title(f"{row.model}\nkNN label precision {row.knn_label_precision:.3f}\nsilhouette {row.silhouette:.3f}")
    return fig


# ------------------------------------------------------------------------------------- curves and intervals


def band_curves(
    ax: Axes,
    summary: pd.DataFrame,
    hue: str,
    *,
    hue_labels: Mapping[Any, str] | None = None,
    colors: Mapping[Any, str] | None = None,
    ylabel: str = "",
) -> Axes:
    """One line per ``hue`` value over epochs (1-based) with its interval as a band.

    Args:
        summary: :func:`clml_core.tables.epoch_summary` frame (columns ``hue``, ``epoch`` 0-based, ``mean``,
            ``low``, ``high``); NaN bounds draw no band.
        hue_labels: legend text per hue value (default: the value).
        colors: colour per hue value (default: the palette).
    """
    levels = list(pd.unique(summary[hue]))
    palette = sns.color_palette(STYLE["palette"], max(len(levels), 1))
    for k, level in enumerate(levels):
        part = summary[summary[hue] == level].sort_values("epoch")
        color = (colors or {}).get(level, palette[k])
        epochs = part["epoch"].to_numpy() + 1
        label = (hue_labels or {}).get(level, str(level))
        ax.plot(epochs, part["mean"], marker="o", color=color, label=label)
        ax.fill_between(epochs, part["low"], part["high"], color=color, alpha=STYLE["band_alpha"], linewidth=0)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if levels:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center")
    return ax


def _frequency_axis(ax: Axes) -> None:
    """A logarithmic class-frequency x axis with plain tick labels (0.05, 0.1, 0.2, ...)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("class frequency (training images, full labels)")


def per_class_ap(ax: Axes, table: pd.DataFrame) -> Axes:
    """Per-class test AP without and with CLML (means over seeds) against class frequency, each pair joined.

    Args:
        table: :func:`clml_core.tables.per_class_table` frame.
    """
    x = table["frequency"].to_numpy(float)
    base, clml = table["AP without CLML_mean"].to_numpy(float), table["AP with CLML_mean"].to_numpy(float)
    ax.vlines(x, base, clml, color=STYLE["other"], linewidth=1)
    ax.scatter(x, base, s=STYLE["point_size"] * 2, color=STYLE["without_clml"], label="base loss", zorder=3)
    ax.scatter(x, clml, s=STYLE["point_size"] * 2, color=STYLE["with_clml"], label="+ CLML", zorder=3)
    _frequency_axis(ax)
    ax.set_ylabel("test AP (%)")
    ax.legend(fontsize="small")
    return ax


def per_class_change(ax: Axes, table: pd.DataFrame) -> Axes:
    """Per-class AP change from CLML (mean of the per-seed differences) with its interval, against class frequency,
    each point named by its class.

    Args:
        table: :func:`clml_core.tables.per_class_table` frame; NaN bounds draw no error bar.
    """
    x, diff = table["frequency"].to_numpy(float), table["diff"].to_numpy(float)
    below = np.nan_to_num(diff - table["diff_low"].to_numpy(float))
    above = np.nan_to_num(table["diff_high"].to_numpy(float) - diff)
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.errorbar(x, diff, yerr=[below, above], fmt="o", capsize=3, color=STYLE["with_clml"])
    for xi, yi, name in zip(x, diff, table["class"]):
        ax.annotate(str(name), (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize="x-small")
    _frequency_axis(ax)
    ax.set_ylabel("AP change from CLML (points)")
    return ax


def reliability_share(ax: Axes, bins: pd.DataFrame, tau: float | None = None) -> Axes:
    """Share of true missing positives among the unobserved entries of each score bin (a reliability diagram):
    a calibrated score lies on the diagonal.

    Args:
        bins: :func:`clml_core.correction.score_reliability` as a frame (``low``, ``high``, ``share``, ...).
        tau: the correction threshold, drawn as a vertical line.
    """
    centre = (bins["low"].to_numpy(float) + bins["high"].to_numpy(float)) / 2
    ax.plot([0, 1], [0, 1], color=STYLE["other"], linestyle="--", label="calibrated")
    ax.plot(centre, bins["share"], marker="o", color=STYLE["missing"], label="missing positives")
    if tau is not None:
        ax.axvline(tau, color="k", linewidth=0.8, linestyle=":", label=f"τ = {tau:g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("score of an unobserved entry")
    ax.set_ylabel("share that are missing positives")
    ax.legend(fontsize="x-small")
    return ax


def reliability_counts(ax: Axes, bins: pd.DataFrame, tau: float | None = None) -> Axes:
    """Counts of unobserved entries per score bin: missing positives against true negatives (log scale).

    Args:
        bins: as :func:`reliability_share`.
        tau: the correction threshold, drawn as a vertical line.
    """
    low, high = bins["low"].to_numpy(float), bins["high"].to_numpy(float)
    width = (high - low) * 0.45
    ax.bar(low + width * 0.55, bins["negative"], width=width, color=STYLE["without_clml"], label="true negatives")
    ax.bar(low + width * 1.55, bins["missing"], width=width, color=STYLE["missing"], label="missing positives")
    if tau is not None:
        ax.axvline(tau, color="k", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("score of an unobserved entry")
    ax.set_ylabel("entries")
    ax.legend(fontsize="x-small")
    return ax
