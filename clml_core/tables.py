"""The study's tables: summaries over seeds and paired comparisons with intervals, p-values and adjusted decisions.

Every builder takes run frames of :func:`clml_core.experiments.collect` (one row per run: its labels, ``seed``,
``folder``, ``test_map`` in percent, the correction's precision and recall) and returns a numeric frame. A comparison
pairs the runs of two settings by seed (same seed, data order and protocol draw) and keeps only the paired seeds,
in its interval and in its mean ± std columns alike. Its columns:

* ``diff``: mean over the paired seeds of ``treated - control``; ``diff_low``, ``diff_high``: its 95% interval;
* ``p``: two-sided p-value of ``diff = 0``, consistent with the interval (it excludes 0 exactly when p < 0.05);
* ``p_holm``, ``p_bh``: ``p`` adjusted over the table's comparisons (Holm; Benjamini-Hochberg as a second view);
  the family is every row with two or more paired seeds except the reference against itself;
* ``decision``: ``higher`` or ``lower`` where the Holm-adjusted p is below 1 - confidence, else ``not
  separated``; ``1 seed: no decision`` for a single-seed comparison (never an effect), ``reference`` for the
  reference against itself, ``n/a`` without a paired seed;
* ``CI excludes 0`` (unadjusted), ``CI covers`` (``seeds + test images``, ``seeds only``, ``1 seed: test images
  only``), ``CI`` (the method and counts, e.g. ``two-level, 5 seeds x 299 images``);
* ``diff_seeds_low``, ``diff_seeds_high``: the seeds-only t interval, a second view (NaN under two seeds).

By default (``test_images=True``) the interval covers the seeds and the test images
(:func:`clml_core.stats.two_level_interval`): every run's test scores are read from its folder, one set of image
resamples serves every run of the table (:class:`ScoredRuns`), and each run's ``test_map`` must equal the mAP of
its saved scores (over the classes with at least ``min_positives`` test positives: pass
``min_positives=clml_core.evaluate.FREQUENT_MIN_POSITIVES`` for a frame whose ``test_map`` holds
``test_map_frequent``). ``test_images=False`` reads no file and gives the seeds-only t interval (a single seed
then has no interval).

:func:`pooled_table` gives the equal-weight mean effect over a table's cells with the same two-level interval,
applied jointly (:func:`clml_core.stats.pooled_interval`), and whether a claimed effect lies inside it.
:func:`format_summary` turns a numeric table into text (``mean ± std``, ``diff [low, high]``) and
:func:`save_table` writes both (CSV numbers, Markdown text). Plot helpers draw these frames; they compute nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clml_core import runfolder
from clml_core.stats import (
    COVERS_SEEDS,
    ImageResamples,
    Interval,
    benjamini_hochberg,
    holm,
    image_resamples,
    paired_difference,
    pooled_interval,
    resampled_average_precision,
    t_interval,
    two_level_interval,
)

#: Resamples of the bootstrap over test images.
N_RESAMPLES = 1000
#: Largest gap (in mAP or AP points) allowed between a frame's value and the one recomputed from saved scores.
TOLERANCE = 1e-6

_COMPARISON = ["diff", "diff_low", "diff_high", "p", "p_holm", "p_bh", "decision", "CI excludes 0", "CI covers", "CI",
               "diff_seeds_low", "diff_seeds_high"]  # fmt: skip
#: What a single-seed comparison without test images covers.
_NO_INTERVAL = "1 seed: no interval"


def mean_std(frame: pd.DataFrame, by: Sequence[str], value: str = "test_map") -> pd.DataFrame:
    """Mean, standard deviation (ddof=1, NaN for one run) and count of ``value`` per group of ``by``
    (first-appearance order)."""
    grouped = frame.groupby(list(by), sort=False)[value]
    return grouped.agg(
        mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), n="count"
    ).reset_index()


# ------------------------------------------------------------------------------------------ saved test scores


def _test_scores(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A run's test labels (N, C), scores (N, C) and class names (C,) (None if not saved), from its folder."""
    try:
        saved = runfolder.read_test_outputs(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; an interval over test images reads the test scores saved there "
                                "(test_images=False gives the seeds-only interval)") from None  # fmt: skip
    missing = [key for key in ("labels", "scores") if key not in saved]
    if missing:
        raise ValueError(f"{Path(folder) / runfolder.TEST_OUTPUTS}: no {missing} array")
    classes = saved["classes"].astype(str) if "classes" in saved else None
    return saved["labels"], saved["scores"], classes


class ScoredRuns:
    """Every run's test AP on the full test set and under one shared set of image resamples, read once per folder.

    The first run read fixes the test set: the resamples are drawn on its labels (:func:`clml_core.stats.
    image_resamples`) and every later run must carry the same labels (one test set, scored by every run).

    Args:
        n_resamples: bootstrap resamples of the test images.
        seed: seed of the resampling.
        min_positives: classes with fewer test positives are not scored (1: the study's ``test_map``).
    """

    def __init__(self, n_resamples: int = N_RESAMPLES, *, seed: int = 0, min_positives: int = 1) -> None:
        self.n_resamples, self.seed, self.min_positives = n_resamples, seed, min_positives
        self.resamples: ImageResamples | None = None
        self.classes: np.ndarray | None = None
        self._first: str = ""
        self._ap: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def average_precision(self, folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """AP per class of the run in ``folder`` in percent: full test set (C,) and every resample (B, C); NaN
        for the classes that are not scored."""
        key = str(folder)
        if key not in self._ap:
            labels, scores, classes = _test_scores(key)
            if self.resamples is None:
                self.resamples = image_resamples(
                    labels, self.n_resamples, seed=self.seed, min_positives=self.min_positives
                )
                self.classes, self._first = classes, key
            elif not np.array_equal(labels.astype(bool), self.resamples.labels):
                raise ValueError(f"{key} and {self._first} were scored on different test sets")
            self._ap[key] = resampled_average_precision(self.resamples, scores)
        return self._ap[key]

    def map(self, folder: str | Path) -> tuple[float, np.ndarray]:
        """mAP over the scored classes of the run in ``folder``: full test set and every resample (B,)."""
        full, draws = self.average_precision(folder)
        scored = self.resamples.scored
        return float(full[scored].mean()), draws[:, scored].mean(axis=1)

    @property
    def n_images(self) -> int:
        return 0 if self.resamples is None else self.resamples.n_images


def _check_value(folder: str, column: str, given: float, recomputed: float, min_positives: int) -> None:
    if not abs(given - recomputed) <= TOLERANCE:
        raise ValueError(
            f"{folder}: {column} is {given!r} in the frame but {recomputed!r} from its saved test scores over the "
            f"classes with >= {min_positives} test positives; a frame holding another mAP (test_map_frequent) "
            "needs the matching min_positives"
        )


# ----------------------------------------------------------------------------------------------- comparisons


def _pairs(treated: pd.DataFrame, control: pd.DataFrame, value: str, where: str) -> tuple[pd.DataFrame, int]:
    """Rows paired by seed (``seed``, ``{value}_t``, ``{value}_c`` and the folders when known), sorted by seed, and
    the number of runs left unpaired."""
    for name, frame in (("treated", treated), ("control", control)):
        twice = frame["seed"][frame["seed"].duplicated()].tolist()
        if twice:
            raise ValueError(f"{where}: {name} holds seeds {twice} more than once")
    keep = ["seed", value] + (["folder"] if "folder" in treated and "folder" in control else [])
    pairs = treated[keep].merge(control[keep], on="seed", suffixes=("_t", "_c")).sort_values("seed")
    return pairs.reset_index(drop=True), len(treated) + len(control) - 2 * len(pairs)


def _is_reference(pairs: pd.DataFrame) -> bool:
    """The treated runs are the control runs (a reference row compared with itself)."""
    return len(pairs) > 0 and "folder_t" in pairs and bool((pairs["folder_t"] == pairs["folder_c"]).all())


def _unpaired_note(unpaired: int) -> str:
    return f", {unpaired} unpaired run{'s' if unpaired != 1 else ''} left out" if unpaired else ""


def _result(interval: Interval, seeds_only: Interval | None, label: str, n_pairs: int, reference: bool) -> dict:
    return {
        "diff": interval.estimate,
        "diff_low": interval.low,
        "diff_high": interval.high,
        "p": math.nan if reference else interval.p_value,
        "CI excludes 0": interval.excludes_zero,
        "CI covers": interval.covers,
        "CI": label,
        "diff_seeds_low": seeds_only.low if seeds_only is not None else math.nan,
        "diff_seeds_high": seeds_only.high if seeds_only is not None else math.nan,
        "n pairs": n_pairs,
        "reference": reference,
    }


def _interval(
    pairs: pd.DataFrame,
    unpaired: int,
    value: str,
    *,
    confidence: float,
    test_images: bool,
    scored: ScoredRuns | None,
    statistic: Any,
    where: str,
) -> dict[str, Any]:
    """The comparison of paired runs (see :func:`compare_runs`); ``statistic(folder)`` gives a run's ``value``
    recomputed from its saved scores: the full-test-set number and its (B,) resampled values."""
    reference, n_pairs, note = _is_reference(pairs), len(pairs), _unpaired_note(unpaired)
    treated, control = pairs[f"{value}_t"].to_numpy(np.float64), pairs[f"{value}_c"].to_numpy(np.float64)
    seeds_only = paired_difference(treated, control, confidence) if n_pairs >= 2 else None
    if n_pairs == 0:
        return _result(Interval(math.nan, math.nan, math.nan, 0, "t", confidence), None, "no paired seed" + note, 0,
                       False)  # fmt: skip
    if reference:
        zero = Interval(0.0, 0.0, 0.0, n_pairs, "reference", confidence)
        return _result(zero, seeds_only, f"reference, {n_pairs} seed{'s' if n_pairs > 1 else ''}", n_pairs, True)
    if not test_images:
        if seeds_only is None:
            single = Interval(float(treated[0] - control[0]), math.nan, math.nan, 1, "t", confidence, _NO_INTERVAL)
            return _result(single, None, "1 seed, no interval" + note, 1, False)
        return _result(seeds_only, seeds_only, f"t, {n_pairs} seeds" + note, n_pairs, False)
    if "folder_t" not in pairs:
        raise ValueError(f"{where}: an interval over test images needs a folder column (or test_images=False)")
    draws = []
    for folder_t, folder_c, value_t, value_c in zip(pairs["folder_t"], pairs["folder_c"], treated, control):
        (full_t, draws_t), (full_c, draws_c) = statistic(folder_t), statistic(folder_c)
        _check_value(folder_t, value, value_t, full_t, scored.min_positives)
        _check_value(folder_c, value, value_c, full_c, scored.min_positives)
        draws.append(draws_t - draws_c)
    interval = two_level_interval(
        treated - control, np.stack(draws, axis=1), n_images=scored.n_images, confidence=confidence
    )
    count = f"{n_pairs} seeds x {scored.n_images} images" if n_pairs > 1 else f"1 seed x {scored.n_images} images"
    return _result(interval, seeds_only, f"two-level, {count}" + note, n_pairs, False)


def compare_runs(
    treated: pd.DataFrame,
    control: pd.DataFrame,
    value: str = "test_map",
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = 0.95,
    test_images: bool = True,
    min_positives: int = 1,
    scored: ScoredRuns | None = None,
) -> dict[str, Any]:
    """The paired difference ``treated - control`` of ``value`` over the seeds both frames hold.

    Args:
        treated: runs of the changed configuration (columns ``seed``, ``value`` and, with test images,
            ``folder``).
        control: runs of the reference.
        value: the compared column; with test images it must be the mAP of the saved scores over the classes with
            ``>= min_positives`` positives (``test_map``, or ``test_map_frequent`` with the frequent threshold).
        n_resamples: bootstrap resamples of the test images.
        confidence: coverage of the intervals.
        test_images: interval over seeds and test images (reads each run's scores); False: seeds only.
        min_positives: classes scored by the mAP (see ``value``).
        scored: the table's shared :class:`ScoredRuns` (made here when None; its own ``min_positives`` then
            rules).

    Returns:
        The module's comparison columns without the adjusted ones (``diff`` to ``diff_seeds_high``), ``n pairs``
        and ``reference`` (the treated runs are the control runs: diff 0, no p-value).

    Raises:
        ValueError: when a frame holds a seed twice, or a run's ``value`` does not match its saved scores.
        FileNotFoundError: when a run's scores are missing (test images only).
    """
    pairs, unpaired = _pairs(treated, control, value, "compare_runs")
    if test_images and scored is None:
        scored = ScoredRuns(n_resamples, min_positives=min_positives)
    return _interval(
        pairs, unpaired, value, confidence=confidence, test_images=test_images, scored=scored,
        statistic=scored.map if scored is not None else None, where="compare_runs",
    )  # fmt: skip


def _adjust(rows: list[dict[str, Any]], confidence: float) -> list[dict[str, Any]]:
    """Add ``p_holm``, ``p_bh`` and ``decision`` to the comparisons of one table (see the module docstring)."""
    in_family = [r["n pairs"] >= 2 and not r["reference"] and math.isfinite(r["p"]) for r in rows]
    p = np.array([r["p"] if keep else math.nan for r, keep in zip(rows, in_family)], dtype=np.float64)
    p_holm, p_bh = holm(p), benjamini_hochberg(p)
    alpha = 1.0 - confidence
    for row, keep, h, b in zip(rows, in_family, p_holm, p_bh):
        if row["reference"]:
            decision = "reference"
        elif row["n pairs"] == 0 or not math.isfinite(row["diff"]):
            decision = "n/a"
        elif row["n pairs"] == 1:
            decision = "1 seed: no decision"
        elif keep and h < alpha:
            decision = "higher" if row["diff"] > 0 else "lower"
        else:
            decision = "not separated"
        row.update({"p_holm": h, "p_bh": b, "decision": decision})
    return rows


def _compare_options(compare: Mapping[str, Any], where: str) -> tuple[dict[str, Any], float]:
    """The keywords of :func:`compare_runs` a builder passes on, with one :class:`ScoredRuns` for the whole table
    (the one given as ``scored``, which can serve several tables on the same test set, or a new one)."""
    allowed = {"n_resamples", "confidence", "test_images", "min_positives", "scored"}
    unknown = sorted(set(compare) - allowed)
    if unknown:
        raise TypeError(f"{where}: unknown keyword(s) {unknown}; expected some of {sorted(allowed)}")
    options = dict(compare)
    if options.get("test_images", True) and options.get("scored") is None:
        options["scored"] = ScoredRuns(options.get("n_resamples", N_RESAMPLES),
                                       min_positives=options.get("min_positives", 1))  # fmt: skip
    return options, float(options.get("confidence", 0.95))


def _paired_runs(treated: pd.DataFrame, control: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs of each side whose seed the other side also holds."""
    return treated[treated["seed"].isin(control["seed"])], control[control["seed"].isin(treated["seed"])]


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _seed_counts(paired: int, a: int, b: int) -> str:
    return str(paired) if a == b == paired else f"{paired} paired ({a} / {b} runs)"


def main_table(runs: pd.DataFrame, **compare: Any) -> pd.DataFrame:
    """Per protocol and base loss: test mAP without and with CLML over the paired seeds and the paired difference.

    Args:
        runs: the main grid's runs, columns ``protocol``, ``loss``, ``clml`` (bool), ``seed``, ``folder``,
            ``test_map``.
        compare: keywords of :func:`compare_runs` (``n_resamples``, ``confidence``, ``test_images``,
            ``min_positives``, ``scored``: a :class:`ScoredRuns` shared with other tables of the same test set).

    Returns:
        Columns ``protocol``, ``loss``, ``without CLML_mean``, ``without CLML_std``, ``with CLML_mean``,
        ``with CLML_std`` (over the paired seeds), the module's comparison columns and ``n seeds`` (the paired
        seeds; ``"3 paired (4 / 3 runs)"`` when an arm has a run the other lacks).
    """
    options, confidence = _compare_options(compare, "main_table")
    rows = []
    for (protocol, loss), cell in runs.groupby(["protocol", "loss"], sort=False):
        base, clml = cell[~cell["clml"].astype(bool)], cell[cell["clml"].astype(bool)]
        result = compare_runs(clml, base, **options)
        paired_clml, paired_base = _paired_runs(clml, base)
        rows.append(
            {
                "protocol": protocol,
                "loss": loss,
                "without CLML_mean": paired_base["test_map"].mean(),
                "without CLML_std": _std(paired_base["test_map"]),
                "with CLML_mean": paired_clml["test_map"].mean(),
                "with CLML_std": _std(paired_clml["test_map"]),
                **result,
                "n seeds": _seed_counts(result["n pairs"], len(base), len(clml)),
            }
        )
    rows = _adjust(rows, confidence)
    columns = ["protocol", "loss", "without CLML_mean", "without CLML_std", "with CLML_mean", "with CLML_std",
               *_COMPARISON, "n seeds"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


#: The label-correction columns of the run frames (:func:`clml_core.experiments.collect`) and their table names:
#: precision and recall of the counts summed over the whole run, and in the epoch selected on validation.
CORRECTION_COLUMNS = {
    "corr_precision": "corr precision (run)",
    "corr_recall": "corr recall (run)",
    "corr_precision_selected": "corr precision (selected epoch)",
    "corr_recall_selected": "corr recall (selected epoch)",
}
_CORRECTION_MEANS = [f"{name}_mean" for name in CORRECTION_COLUMNS.values()]


def _correction_means(runs: pd.DataFrame) -> dict[str, float]:
    """The mean of each correction column of ``runs`` under its table name (NaN for a column the runs lack)."""
    return {
        f"{name}_mean": runs[column].mean() if column in runs else math.nan
        for column, name in CORRECTION_COLUMNS.items()
    }


def seed_summary(runs: pd.DataFrame, by: Sequence[str], value: str = "test_map") -> pd.DataFrame:
    """Mean and standard deviation over seeds of ``value`` and the mean correction precision and recall.

    Returns:
        One row per group of ``by`` (first-appearance order): the ``by`` columns, ``mAP_mean``, ``mAP_std``, the
        mean correction precision and recall over the whole run and in the selected epoch (the columns of
        :data:`CORRECTION_COLUMNS`, ``_mean``; NaN where the correction never ran) and ``n seeds``.
    """
    stats = mean_std(runs, by, value).rename(columns={"mean": "mAP_mean", "std": "mAP_std", "n": "n seeds"})
    groups = runs.groupby(list(by), sort=False, dropna=False)
    correction = pd.DataFrame([{**dict(zip(by, key)), **_correction_means(group)} for key, group in groups])
    table = stats.merge(correction, on=list(by), how="left")
    return table[[*by, "mAP_mean", "mAP_std", *_CORRECTION_MEANS, "n seeds"]]


def comparison_table(
    runs: pd.DataFrame, by: Sequence[str], reference: pd.DataFrame, reference_name: str, **compare: Any
) -> pd.DataFrame:
    """Each setting's mAP and correction quality over the seeds it shares with ``reference``, and its paired
    difference against ``reference``.

    Args:
        runs: runs of every compared setting (e.g. the ablation rows, the sensitivity grid).
        by: columns naming a setting.
        reference: runs of the reference setting (one per seed), e.g. the base loss alone.
        reference_name: what the reference is, written into the ``vs`` column.
        compare: keywords of :func:`compare_runs` (``n_resamples``, ``confidence``, ``test_images``,
            ``min_positives``, ``scored``: a :class:`ScoredRuns` shared with other tables of the same test set).

    Returns:
        One row per setting (first-appearance order): the ``by`` columns, ``mAP_mean``, ``mAP_std``,
        the correction means of :func:`seed_summary` (over the paired seeds), the module's comparison columns,
        ``vs`` and ``n seeds`` (paired seeds; the ``CI`` column counts the runs left out for want of a pair).
    """
    options, confidence = _compare_options(compare, "comparison_table")
    rows = []
    for key, group in runs.groupby(list(by), sort=False, dropna=False):
        result = compare_runs(group, reference, **options)
        paired, _ = _paired_runs(group, reference)
        rows.append(
            {
                **dict(zip(by, key)),
                "mAP_mean": paired["test_map"].mean(),
                "mAP_std": _std(paired["test_map"]),
                **_correction_means(paired),
                **result,
                "vs": reference_name,
                "n seeds": result["n pairs"],
            }
        )
    rows = _adjust(rows, confidence)
    columns = [*by, "mAP_mean", "mAP_std", *_CORRECTION_MEANS, *_COMPARISON, "vs", "n seeds"]
    return pd.DataFrame(rows, columns=columns)


def _class_statistic(scored: ScoredRuns | None, name: str) -> Any:
    """A run folder -> (AP of class ``name`` on the whole test set, its resampled APs (B,)) from ``scored``."""

    def statistic(folder: str) -> tuple[float, np.ndarray]:
        full, draws = scored.average_precision(folder)
        if scored.classes is None:
            raise ValueError(f"{folder}: {runfolder.TEST_OUTPUTS} has no class names; a per-class interval needs them")
        index = np.flatnonzero(scored.classes == name)
        if index.size != 1:
            raise ValueError(f"{folder}: class {name!r} is not among the saved classes {scored.classes.tolist()}")
        return float(full[index[0]]), draws[:, index[0]]

    return statistic


def per_class_table(per_class: pd.DataFrame, frequency: Mapping[str, float], **compare: Any) -> pd.DataFrame:
    """Per class: its frequency, AP without and with CLML over the paired seeds, and the paired per-class change.

    With test images the per-class interval is the two-level one on the class's AP (the image resamples keep a
    positive of every class with one); the classes form the family of the adjusted p-values.

    Args:
        per_class: one row per run and class (columns ``class``, ``clml``, ``seed``, ``ap`` and, with test
            images, ``folder``), as :func:`clml_core.experiments.collect_per_class` for one loss and protocol.
        frequency: class -> share of training images carrying it (full labels).
        compare: ``n_resamples``, ``confidence``, ``test_images``, ``scored`` (as :func:`compare_runs`).

    Returns:
        Columns ``class``, ``frequency``, ``AP without CLML_mean``/``_std``, ``AP with CLML_mean``/``_std``, the
        module's comparison columns and ``n seeds``; rows by decreasing frequency. A class without a positive test
        image has no AP (NaN, see :mod:`clml_core.metrics`) and no row.

    Raises:
        ValueError: for a class without a frequency, or (with test images) scores saved without class names, or
            an AP that does not match the saved scores.
    """
    options, confidence = _compare_options(compare, "per_class_table")
    if options.pop("min_positives", 1) != 1:
        raise TypeError("per_class_table: min_positives does not apply (every class with a test positive has a row)")
    scored, test_images = options.pop("scored", None), options.get("test_images", True)
    rows = []
    for name, cell in per_class[per_class["ap"].notna()].groupby("class", sort=False):
        if name not in frequency:
            raise ValueError(f"per_class_table: no frequency for class {name!r}")
        base, clml = cell[~cell["clml"].astype(bool)], cell[cell["clml"].astype(bool)]
        pairs, unpaired = _pairs(clml, base, "ap", f"per_class_table (class {name!r})")

        statistic = _class_statistic(scored, name)
        result = _interval(pairs, unpaired, "ap", confidence=confidence, test_images=test_images, scored=scored,
                           statistic=statistic, where="per_class_table")  # fmt: skip
        paired_clml, paired_base = _paired_runs(clml, base)
        rows.append(
            {
                "class": name,
                "frequency": float(frequency[name]),
                "AP without CLML_mean": paired_base["ap"].mean(),
                "AP without CLML_std": _std(paired_base["ap"]),
                "AP with CLML_mean": paired_clml["ap"].mean(),
                "AP with CLML_std": _std(paired_clml["ap"]),
                **result,
                "n seeds": result["n pairs"],
            }
        )
    rows = _adjust(rows, confidence)
    columns = ["class", "frequency", "AP without CLML_mean", "AP without CLML_std", "AP with CLML_mean",
               "AP with CLML_std", *_COMPARISON, "n seeds"]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("frequency", ascending=False, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ pooled over cells

_POOLED = ["cells", "n cells", "diff", "diff_low", "diff_high", "p", "p_holm", "p_bh", "decision", "CI excludes 0",
           "CI covers", "CI", "diff_seeds_low", "diff_seeds_high", "claim", "claim inside CI", "n seeds"]  # fmt: skip


def _pooled_cells(runs: pd.DataFrame, by: Sequence[str], arm: str, value: str) -> list[pd.DataFrame]:
    """Each cell's paired runs (:func:`_pairs`) on the seeds paired in every cell, in seed order."""
    cells, seeds = [], None
    for key, cell in runs.groupby(list(by), sort=False, dropna=False):
        pairs, _ = _pairs(cell[cell[arm].astype(bool)], cell[~cell[arm].astype(bool)], value, f"pooled_row ({key})")
        cells.append(pairs)
        seeds = set(pairs["seed"]) if seeds is None else seeds & set(pairs["seed"])
    return [pairs[pairs["seed"].isin(sorted(seeds or ()))].sort_values("seed") for pairs in cells]


def _pooled_draws(cells: list[pd.DataFrame], value: str, scored: ScoredRuns) -> np.ndarray:
    """(B, K, S) resampled differences of the K cells' paired runs (S seeds each, in seed order)."""
    draws = []
    for c in cells:
        cell_draws = []
        for folder_t, folder_c, value_t, value_c in zip(c["folder_t"], c["folder_c"], c[f"{value}_t"], c[f"{value}_c"]):
            (full_t, draws_t), (full_c, draws_c) = scored.map(folder_t), scored.map(folder_c)
            _check_value(folder_t, value, float(value_t), full_t, scored.min_positives)
            _check_value(folder_c, value, float(value_c), full_c, scored.min_positives)
            cell_draws.append(draws_t - draws_c)
        draws.append(np.stack(cell_draws, axis=1))  # (B, S)
    return np.stack(draws, axis=1)


def pooled_row(
    runs: pd.DataFrame,
    by: Sequence[str] = ("protocol", "loss"),
    *,
    arm: str = "clml",
    name: str = "all cells",
    claim: float | None = None,
    value: str = "test_map",
    n_resamples: int = N_RESAMPLES,
    confidence: float = 0.95,
    test_images: bool = True,
    min_positives: int = 1,
    scored: ScoredRuns | None = None,
) -> dict[str, Any]:
    """The equal-weight mean over the cells of ``runs`` of each cell's paired effect, with its interval.

    A cell is a group of ``by`` (e.g. a protocol and a base loss); its effect is ``arm`` True minus False, paired
    by seed, as in :func:`main_table`. Each cell counts once (the question is the effect over the designed grid,
    not over its least noisy cells), and the interval is :func:`clml_core.stats.pooled_interval`: the same seeds and
    the same image resamples for every cell, so the correlation that shared seeds and the shared test set give the
    cells stays in it. Only the seeds paired in every cell enter (the ``CI`` column counts the runs left out).

    Args:
        runs: runs of the pooled cells, columns ``by``, ``arm`` (bool), ``seed``, ``value`` and ``folder``.
        by: columns naming a cell.
        arm: the boolean column of the treatment.
        name: what the cells are, written into the ``cells`` column.
        claim: a claimed effect (e.g. the paper's +1.2); ``claim inside CI`` says whether it lies in the interval.
        value, n_resamples, confidence, test_images, min_positives, scored: as :func:`compare_runs`.

    Returns:
        The columns of :func:`pooled_table` but the adjusted ones, and ``n pairs`` and ``reference`` (False).
    """
    cells = _pooled_cells(runs, by, arm, value)
    k, s = len(cells), len(cells[0]) if cells else 0
    note = _unpaired_note(len(runs) - 2 * k * s)
    row = {"cells": name, "n cells": k, "claim": math.nan if claim is None else float(claim), "n seeds": s}
    differences = np.array([(c[f"{value}_t"] - c[f"{value}_c"]).to_numpy(np.float64) for c in cells]).reshape(k, s)
    seeds_only = replace(t_interval(differences.mean(axis=0), confidence), covers=COVERS_SEEDS) if s >= 2 else None
    if s == 0:
        interval, label = Interval(math.nan, math.nan, math.nan, 0, "t", confidence), "no seed paired in every cell"
    elif not test_images:
        if seeds_only is None:
            interval = Interval(float(differences.mean()), math.nan, math.nan, 1, "t", confidence, _NO_INTERVAL)
            label = f"1 seed, {k} cells, no interval"
        else:
            interval, label = seeds_only, f"pooled t, {k} cells x {s} seeds"
    else:
        scored = scored if scored is not None else ScoredRuns(n_resamples, min_positives=min_positives)
        interval = pooled_interval(differences, _pooled_draws(cells, value, scored), n_images=scored.n_images,
                                   confidence=confidence)  # fmt: skip
        label = f"pooled two-level, {k} cells x {s} seed{'s' if s > 1 else ''} x {scored.n_images} images"
    inside = None if claim is None or not interval.defined else bool(interval.low <= claim <= interval.high)
    return {
        **row,
        **_result(interval, seeds_only, label + note, s, False),
        "claim inside CI": inside,
    }


def pooled_table(
    runs: pd.DataFrame,
    by: Sequence[str] = ("protocol", "loss"),
    *,
    split_by: str | None = None,
    name: str = "all cells",
    claim: float | None = None,
    arm: str = "clml",
    **compare: Any,
) -> pd.DataFrame:
    """Pooled effects over the cells of a table: all cells of ``runs``, and the cells of each value of
    ``split_by`` (e.g. each protocol), one :func:`pooled_row` each, with adjusted p-values over the rows.

    Args:
        runs: runs of the pooled cells (e.g. the main grid's missing-label protocols).
        by: columns naming a cell.
        split_by: a column of ``by`` whose values get a row each (first-appearance order); None: one row.
        name: the ``cells`` entry of the first row; a split row's is ``"{split_by} = {value}"``.
        claim: a claimed effect, checked against every row's interval.
        arm: the boolean column of the treatment.
        compare: keywords of :func:`compare_runs` (``n_resamples``, ``confidence``, ``test_images``,
            ``min_positives``, ``scored``), plus ``value`` (default ``test_map``).

    Returns:
        Columns ``cells``, ``n cells``, ``diff``, ``diff_low``, ``diff_high``, ``p``, ``p_holm``, ``p_bh``,
        ``decision``, ``CI excludes 0``, ``CI covers``, ``CI``, ``diff_seeds_low``, ``diff_seeds_high``, ``claim``,
        ``claim inside CI`` (None without a claim or an interval) and ``n seeds``.
    """
    value = compare.pop("value", "test_map")
    options, confidence = _compare_options(compare, "pooled_table")
    common = {"arm": arm, "claim": claim, "value": value, **options}
    rows = [pooled_row(runs, by, name=name, **common)]
    if split_by is not None:
        for part, group in runs.groupby(split_by, sort=False):
            rows.append(pooled_row(group, by, name=f"{split_by} = {part}", **common))
    return pd.DataFrame(_adjust(rows, confidence), columns=_POOLED)


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


def format_p(p: float) -> str:
    """``0.012``, ``<0.001``; ``n/a`` when undefined."""
    if not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_bounds(low: float, high: float) -> str:
    """``[-0.40, +2.86]``; ``n/a`` when undefined."""
    return f"[{low:+.2f}, {high:+.2f}]" if np.isfinite(low) and np.isfinite(high) else "n/a"


_P_COLUMNS = {"p": "p", "p_holm": "p (Holm)", "p_bh": "p (BH)"}
_YES_NO = ("CI excludes 0", "claim inside CI")


def format_summary(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Text version of a table: each ``X_mean``/``X_std`` pair becomes ``X`` as ``mean ± std``; ``diff``,
    ``diff_low`` and ``diff_high`` become ``diff (95% CI)``; ``diff_seeds_low`` and ``diff_seeds_high`` become
    ``seeds-only CI``; p-values three decimals (``p (Holm)``, ``p (BH)``); booleans yes/no; missing values
    ``n/a``."""
    out = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith("_std") or column in ("diff_low", "diff_high", "diff_seeds_high"):
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
        elif column == "diff_seeds_low":
            out["seeds-only CI"] = [format_bounds(*row) for row in zip(values, table["diff_seeds_high"])]
        elif column in _P_COLUMNS:
            out[_P_COLUMNS[column]] = [format_p(float(v)) for v in values]
        elif column == "claim":
            out[column] = [f"{v:+.2f}" if pd.notna(v) else "n/a" for v in values]
        elif values.dtype == bool or str(values.dtype) == "boolean" or column in _YES_NO:
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
