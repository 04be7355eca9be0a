"""The study's tables: summaries over seeds and paired comparisons with confidence intervals.

Every builder takes run frames of :func:`clml_core.experiments.collect` (one row per run: its labels, ``seed``,
``folder``, ``test_map`` in percent, the correction's precision and recall) and returns a numeric frame; the
comparison columns are ``diff`` (mean of the per-seed differences), ``diff_low`` and ``diff_high`` (its 95%
interval), ``CI excludes 0`` and ``CI`` (what the interval rests on):

* two or more seeds on both sides: a Student t interval over the per-seed differences (:func:`clml_core.stats.
  paired_difference`), pairing runs by seed (same seed, data order and protocol draw);
* one seed: a paired bootstrap over the test images of that seed's two runs (:func:`clml_core.stats.
  bootstrap_map_difference`, scores read from each run's ``test_embeddings.npz``), which covers test-set sampling
  only, not training noise.

:func:`format_summary` turns a numeric table into text (``mean ± std``, ``diff [low, high]``) and
:func:`save_table` writes both (CSV numbers, Markdown text). Plot helpers draw these frames; they compute nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clml_core.stats import Interval, bootstrap_map_difference, paired_difference, t_interval

#: Resamples of the bootstrap over test images used for single-seed comparisons.
N_RESAMPLES = 1000

_COMPARISON = ["diff", "diff_low", "diff_high", "CI excludes 0", "CI"]


def mean_std(frame: pd.DataFrame, by: Sequence[str], value: str = "test_map") -> pd.DataFrame:
    """Mean, standard deviation (ddof=1, NaN for one run) and count of ``value`` per group of ``by``
    (first-appearance order)."""
    grouped = frame.groupby(list(by), sort=False)[value]
    return grouped.agg(
        mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), n="count"
    ).reset_index()


def _scores(folder: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(folder) / "test_embeddings.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a single-seed comparison bootstraps the test scores saved there")
    with np.load(path) as saved:
        return saved["labels"], saved["scores"]


def compare_runs(
    treated: pd.DataFrame,
    control: pd.DataFrame,
    value: str = "test_map",
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The paired difference ``treated - control`` of ``value`` over the seeds both frames hold.

    Args:
        treated: runs of the changed configuration (columns ``seed``, ``value`` and, for one seed, ``folder``).
        control: runs of the reference.
        n_resamples: bootstrap resamples when only one seed pairs (``value`` must then be ``test_map``).

    Returns:
        ``diff``, ``diff_low``, ``diff_high``, ``CI excludes 0`` (None when undefined), ``CI`` (e.g. ``"t, 5
        seeds"``) and ``n pairs``.

    Raises:
        ValueError: when a frame holds a seed twice.
    """
    for name, frame in (("treated", treated), ("control", control)):
        twice = frame["seed"][frame["seed"].duplicated()].tolist()
        if twice:
            raise ValueError(f"compare_runs: {name} holds seeds {twice} more than once")
    pairs = treated.merge(control, on="seed", suffixes=("_t", "_c")).sort_values("seed")
    if len(pairs) == 0:
        interval, label = Interval(math.nan, math.nan, math.nan, 0, "t", confidence), "no paired seed"
    elif len(pairs) == 1:
        if value != "test_map":
            raise ValueError(f"compare_runs: a single-seed bootstrap needs test_map, not {value!r}")
        labels, scores_t = _scores(pairs["folder_t"].iloc[0])
        labels_c, scores_c = _scores(pairs["folder_c"].iloc[0])
        if not np.array_equal(labels, labels_c):
            raise ValueError(f"compare_runs: {pairs['folder_t'].iloc[0]} and {pairs['folder_c'].iloc[0]} were "
                             "scored on different test sets")  # fmt: skip
        interval = bootstrap_map_difference(
            labels, scores_t, scores_c, n_resamples=n_resamples, seed=int(pairs["seed"].iloc[0]), confidence=confidence
        )
        label = f"bootstrap, 1 seed x {interval.n} images"
    else:
        interval = paired_difference(pairs[f"{value}_t"], pairs[f"{value}_c"], confidence)
        label = f"t, {interval.n} seeds"
    return {
        "diff": interval.estimate,
        "diff_low": interval.low,
        "diff_high": interval.high,
        "CI excludes 0": interval.excludes_zero,
        "CI": label,
        "n pairs": len(pairs),
    }


def _seed_counts(a: int, b: int) -> str:
    return str(a) if a == b else f"{a} / {b}"


def main_table(runs: pd.DataFrame, **compare: Any) -> pd.DataFrame:
    """Per protocol and base loss: test mAP without and with CLML over seeds and the paired difference.

    Args:
        runs: the main grid's runs, columns ``protocol``, ``loss``, ``clml`` (bool), ``seed``, ``folder``,
            ``test_map``.
        compare: keywords of :func:`compare_runs` (``n_resamples``, ``confidence``).

    Returns:
        Columns ``protocol``, ``loss``, ``without CLML_mean``, ``without CLML_std``, ``with CLML_mean``,
        ``with CLML_std``, ``diff``, ``diff_low``, ``diff_high``, ``CI excludes 0``, ``CI``, ``n seeds``.
    """
    rows = []
    for (protocol, loss), cell in runs.groupby(["protocol", "loss"], sort=False):
        base, clml = cell[~cell["clml"].astype(bool)], cell[cell["clml"].astype(bool)]
        result = compare_runs(clml, base, **compare)
        rows.append(
            {
                "protocol": protocol,
                "loss": loss,
                "without CLML_mean": base["test_map"].mean(),
                "without CLML_std": base["test_map"].std(ddof=1),
                "with CLML_mean": clml["test_map"].mean(),
                "with CLML_std": clml["test_map"].std(ddof=1),
                **{key: result[key] for key in _COMPARISON},
                "n seeds": _seed_counts(len(base), len(clml)),
            }
        )
    return pd.DataFrame(rows)


def seed_summary(runs: pd.DataFrame, by: Sequence[str], value: str = "test_map") -> pd.DataFrame:
    """Mean and standard deviation over seeds of ``value`` and the mean correction precision and recall.

    Returns:
        One row per group of ``by`` (first-appearance order): the ``by`` columns, ``mAP_mean``, ``mAP_std``,
        ``corr_precision_mean``, ``corr_recall_mean`` (NaN where the correction never ran) and ``n seeds``.
    """
    stats = mean_std(runs, by, value).rename(columns={"mean": "mAP_mean", "std": "mAP_std", "n": "n seeds"})
    correction = runs.groupby(list(by), sort=False)[["corr_precision", "corr_recall"]].mean().reset_index()
    correction = correction.rename(columns=lambda c: c if c in by else f"{c}_mean")
    table = stats.merge(correction, on=list(by), how="left")
    return table[[*by, "mAP_mean", "mAP_std", "corr_precision_mean", "corr_recall_mean", "n seeds"]]


def comparison_table(
    runs: pd.DataFrame, by: Sequence[str], reference: pd.DataFrame, reference_name: str, **compare: Any
) -> pd.DataFrame:
    """:func:`seed_summary` of ``runs`` with each group's paired difference against ``reference``.

    Args:
        runs: runs of every compared setting (e.g. the ablation rows, the sensitivity grid).
        by: columns naming a setting.
        reference: runs of the reference setting (one per seed), e.g. the base loss alone.
        reference_name: what the reference is, written into the ``vs`` column.
        compare: keywords of :func:`compare_runs`.
    """
    table = seed_summary(runs, by)
    results = [
        compare_runs(group, reference, **compare) for _, group in runs.groupby(list(by), sort=False, dropna=False)
    ]
    counts = table.pop("n seeds")
    for key in _COMPARISON:
        table[key] = [result[key] for result in results]
    table["vs"] = reference_name
    table["n seeds"] = counts
    return table


def per_class_table(per_class: pd.DataFrame, frequency: Mapping[str, float], **compare: Any) -> pd.DataFrame:
    """Per class: its frequency, AP without and with CLML over seeds, and the paired per-class change.

    Args:
        per_class: one row per run and class (columns ``class``, ``clml``, ``seed``, ``ap``), as
            :func:`clml_core.experiments.collect_per_class` for one loss and protocol.
        frequency: class -> share of training images carrying it (full labels).
        compare: ``confidence`` of the t interval.

    Returns:
        Columns ``class``, ``frequency``, ``AP without CLML_mean``/``_std``, ``AP with CLML_mean``/``_std``,
        ``diff``, ``diff_low``, ``diff_high``, ``CI excludes 0``, ``CI``, ``n seeds``; rows by decreasing frequency.
        A class without a positive test image has no AP (NaN, see :mod:`clml_core.metrics`) and no row.
    """
    rows = []
    for name, cell in per_class[per_class["ap"].notna()].groupby("class", sort=False):
        if name not in frequency:
            raise ValueError(f"per_class_table: no frequency for class {name!r}")
        base = cell[~cell["clml"].astype(bool)][["seed", "ap"]].rename(columns={"ap": "value"})
        clml = cell[cell["clml"].astype(bool)][["seed", "ap"]].rename(columns={"ap": "value"})
        pairs = clml.merge(base, on="seed", suffixes=("_t", "_c"))
        if len(pairs) >= 2:
            interval = paired_difference(pairs["value_t"], pairs["value_c"], **compare)
        else:  # no per-class bootstrap: one seed gives the change without an interval
            interval = t_interval((pairs["value_t"] - pairs["value_c"]).to_numpy() if len(pairs) else [math.nan])
        rows.append(
            {
                "class": name,
                "frequency": float(frequency[name]),
                "AP without CLML_mean": base["value"].mean(),
                "AP without CLML_std": base["value"].std(ddof=1),
                "AP with CLML_mean": clml["value"].mean(),
                "AP with CLML_std": clml["value"].std(ddof=1),
                "diff": interval.estimate,
                "diff_low": interval.low,
                "diff_high": interval.high,
                "CI excludes 0": interval.excludes_zero,
                "CI": f"t, {len(pairs)} seeds" if len(pairs) >= 2 else f"{len(pairs)} seed, no interval",
                "n seeds": len(pairs),
            }
        )
    return pd.DataFrame(rows).sort_values("frequency", ascending=False, kind="stable").reset_index(drop=True)


def epoch_summary(metrics: pd.DataFrame, by: Sequence[str], column: str, confidence: float = 0.95) -> pd.DataFrame:
    """Mean over seeds of a ``metrics.csv`` column per epoch, with its t interval (the band of a learning curve).

    Args:
        metrics: rows of many runs' ``metrics.csv`` (columns ``epoch``, ``column`` and ``by``), as
            :func:`clml_core.experiments.collect_metrics`.
        by: columns naming a curve (e.g. ``["clml"]``).
        column: the plotted value, e.g. ``val_map``.

    Returns:
        Columns ``by``, ``epoch``, ``mean``, ``low``, ``high``, ``n``; NaN values (e.g. an epoch before the
        correction started) are left out, NaN bounds where fewer than two seeds remain.
    """
    rows = []
    valid = metrics.dropna(subset=[column])
    for key, group in valid.groupby([*by, "epoch"], sort=False):
        interval = t_interval(group[column].to_numpy(), confidence)
        rows.append({**dict(zip([*by, "epoch"], key)), "mean": interval.estimate, "low": interval.low,
                     "high": interval.high, "n": len(group)})  # fmt: skip
    return pd.DataFrame(rows, columns=[*by, "epoch", "mean", "low", "high", "n"])


# --------------------------------------------------------------------------------------------------- as text


def format_pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f}"


def format_interval(estimate: float, low: float, high: float) -> str:
    """``+1.23 [-0.40, +2.86]``; the bare signed estimate when the interval is undefined."""
    if not np.isfinite(estimate):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{estimate:+.2f}"
    return f"{estimate:+.2f} [{low:+.2f}, {high:+.2f}]"


def format_summary(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Text version of a table: each ``X_mean``/``X_std`` pair becomes ``X`` as ``mean ± std``; ``diff``,
    ``diff_low`` and ``diff_high`` become ``diff (95% CI)``; booleans yes/no; missing values ``n/a``."""
    out = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith("_std") or column in ("diff_low", "diff_high"):
            continue
        values = table[column]
        if column.endswith("_mean"):
            name = column[: -len("_mean")]
            stds = table.get(f"{name}_std", pd.Series(np.nan, index=table.index))
            out[name] = [format_pm(m, s) if pd.notna(m) else "n/a" for m, s in zip(values, stds)]
        elif column == "diff":
            if "diff_low" in table:
                out[f"diff ({100 * confidence:g}% CI)"] = [
                    format_interval(*row) for row in zip(values, table["diff_low"], table["diff_high"])
                ]
            else:
                out[column] = [f"{v:+.2f}" if pd.notna(v) else "n/a" for v in values]
        elif values.dtype == bool or str(values.dtype) == "boolean" or column == "CI excludes 0":
            out[column] = ["n/a" if v is None or pd.isna(v) else "yes" if v else "no" for v in values]
        elif pd.api.types.is_float_dtype(values):
            out[column] = [f"{v:.4g}" if pd.notna(v) else "n/a" for v in values]
        else:
            out[column] = ["n/a" if pd.isna(v) else str(v) for v in values]
    return out


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``table``'s cells as text (``|`` escaped)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def save_table(table: pd.DataFrame, path_stem: str | Path) -> list[Path]:
    """Write a table to ``path_stem.csv`` (numbers) and ``path_stem.md`` (:func:`format_summary` text).

    Returns:
        The two paths written.
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.parent / f"{stem.name}.csv", stem.parent / f"{stem.name}.md"
    table.to_csv(csv, index=False)
    md.write_text(markdown_table(format_summary(table)))
    return [csv, md]
