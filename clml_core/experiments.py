"""The study's experiment grids, a resumable parallel runner, and the collection of their results.

A run is named by its group, variant and seed and lives in ``root/group/variant/seed{seed}``. A run whose
``results.json`` exists is skipped when its ``config.yaml`` is the one its spec resolves to (otherwise the study
stops, naming the changed fields); an interrupted one is resumed (with its own configuration), so a study continues
where it stopped. Runs go through :func:`clml_core.engine.train` in worker processes, one thread each.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from clml_core import runfolder
from clml_core.build import build_network, input_splits, uses_trunk_cache
from clml_core.config import TrainConfig, apply_updates, authors_overrides, config_diff, resolve_config, to_dict
from clml_core.correction import score_reliability
from clml_core.data.splits import build_splits
from clml_core.features import view_seed
from clml_core.models import preprocessing_for

#: Missing-label protocols of the main table, as config overrides of ``data``.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "75% left": {"protocol": "keep_fraction", "fraction": 0.75},
    "40% left": {"protocol": "keep_fraction", "fraction": 0.4},
    "single positive": {"protocol": "single_positive"},
    "full labels": {"protocol": "full"},
}

#: The low-rank-term ablation: (local_weight, global_weight) of each variant.
ABLATION_TERMS: dict[str, tuple[float, float]] = {
    "base": (0.0, 0.0),
    "+ local": (1.0, 0.0),
    "+ global": (0.0, 1.0),
    "+ both (CLML)": (1.0, 1.0),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a preset plus nested overrides, under a readable name."""

    group: str
    variant: str
    seed: int
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    labels: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # columns for the tables

    def folder(self, root: Path) -> Path:
        return Path(root) / _slug(self.group) / _slug(self.variant) / f"seed{self.seed}"

    def config(self) -> TrainConfig:
        """The resolved configuration. The seed varies the training, the missing-label mask and the validation carve
        (``data.protocol_seed`` is the preset's plus the seed); the test split stays fixed (``data.split_seed``)."""
        config = resolve_config(self.preset, overrides=self.overrides)
        # A name without "/" (config.name is validated): the group "main/40% left" reads "main 40% left".
        name = f"{self.group.replace('/', ' ')}, {self.variant}, seed {self.seed}"
        mask = {"protocol_seed": config.data.protocol_seed + self.seed}
        return apply_updates(config, {"seed": self.seed, "name": name, "data": mask})


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace("%", "pct").replace("+", "plus"))
    return "_".join(part for part in keep.split("_") if part)


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                out[key] = _merge(out.get(key, {}), value)
            else:
                out[key] = value
    return out


def with_dataset(preset: str, overrides: dict[str, Any], dataset: str, data_root: str) -> dict[str, Any]:
    """The notebooks' run overrides: ``overrides`` with the dataset their ``DATASET`` / ``DATA_ROOT`` parameters name.

    ``python -m clml_core.study --profile paper -p DATA_ROOT=/data/coco`` trains on COCO (the paper profile's
    ``DATASET``); ``-p DATASET=voc`` or ``-p DATASET=nuswide`` picks another. The result is resolved against
    ``preset`` at once, so a contradiction (a ``DATA_ROOT`` with ``DATASET="synthetic"``, a real dataset without
    a root, ``OVERRIDES`` naming another dataset) stops the notebook in its first cell, naming both sides.

    Args:
        preset: the runs' config preset (``clml_core.config.PRESETS``).
        overrides: nested config overrides of every run (the notebooks' ``OVERRIDES``).
        dataset: synthetic | coco | voc | nuswide.
        data_root: the dataset's root folder; ``""`` for the embedded benchmark.

    Returns:
        ``overrides`` with ``data.dataset`` (and ``data.root`` when given) set.
    """
    data = dict(overrides.get("data", {}))
    for key, value, param in (("dataset", dataset, "DATASET"), ("root", data_root, "DATA_ROOT")):
        if key in data and data[key] != value:
            raise ValueError(
                f"notebook parameters {param}={value!r} and OVERRIDES data.{key}={data[key]!r} contradict; "
                f"name the dataset through {param} only"
            )
    data["dataset"] = dataset
    if data_root:
        data["root"] = data_root
    merged = {**overrides, "data": data}
    try:
        resolve_config(preset, overrides=merged)
    except ValueError as error:
        raise ValueError(f"notebook parameters DATASET={dataset!r}, DATA_ROOT={data_root!r}: {error}") from None
    return merged


def main_grid(
    preset: str,
    losses: Sequence[str],
    protocols: Sequence[str],
    seeds: Sequence[int],
    overrides: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """Every base loss x protocol, without and with CLML, for every seed."""
    specs = []
    for protocol in protocols:
        for loss in losses:
            for clml in (False, True):
                variant = f"{loss} {'+ CLML' if clml else ''}".strip()
                run_overrides = _merge(
                    overrides or {},
                    {"data": PROTOCOLS[protocol], "loss": {"base": loss}, "clml": {"enabled": clml}},
                )
                labels = {"protocol": protocol, "loss": loss, "clml": clml}
                specs += [RunSpec(f"main/{protocol}", variant, seed, preset, run_overrides, labels) for seed in seeds]
    return specs


#: The single-positive methods of the ``spml`` profile (Cole et al.'s harness and its descendants, and CLML's own
#: bases), by table name: config overrides of each. AN is BCE with every unknown label taken as negative (our
#: ``bce``); LL's rates are its per-epoch rejection rate in percent / 100 (LL-R and LL-Ct 0.2, LL-Cp 0.1).
SPML_METHODS: dict[str, dict[str, Any]] = {
    "AN": {"loss": {"base": "an"}},
    "AN-LS": {"loss": {"base": "an-ls"}},
    "WAN": {"loss": {"base": "wan"}},
    "EPR": {"loss": {"base": "epr"}},
    "ROLE": {"loss": {"base": "role"}},
    "EM": {"loss": {"base": "em"}},
    "EM+APL": {"loss": {"base": "em-apl"}},
    "LL-R": {"loss": {"base": "ll-r", "llr_rate_per_epoch": 0.002}},
    "LL-Ct": {"loss": {"base": "ll-ct", "llr_rate_per_epoch": 0.002}},
    "LL-Cp": {"loss": {"base": "ll-cp", "llr_rate_per_epoch": 0.001}},
    "LL-R+BoostLU": {"loss": {"base": "ll-r", "llr_rate_per_epoch": 0.002}, "model": {"head": "boostlu"}},
    "GR": {"loss": {"base": "gr"}},
    "Focal": {"loss": {"base": "focal"}},
    "ASL": {"loss": {"base": "asl"}},
    "Hill": {"loss": {"base": "hill"}},
    "SPLC": {"loss": {"base": "splc"}},
}

#: Published test mAP (%) of the single-positive methods under Cole et al.'s protocol, ResNet-50 at 448 px trained
#: end to end, on VOC2012 and COCO-2014, as their papers print them (text, to keep their precision): not ours, never
#: mixed with ours.
PUBLISHED_SPML: dict[str, tuple[str, str]] = {
    "AN": ("85.1", "64.1"),
    "LL-R": ("89.2", "71.0"),
    "EM": ("89.09", "70.70"),
    "EM+APL": ("89.19", "70.87"),
    "LL-R+BoostLU": ("89.29", "72.89"),
    "GR": ("89.83", "73.17"),
}


def spml_grid(
    preset: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    setting: str,
    overrides: dict[str, Any] | None = None,
    loss_kwargs: dict[str, dict[str, Any]] | None = None,
) -> list[RunSpec]:
    """Every single-positive method of :data:`SPML_METHODS` named in ``methods``, without and with CLML, every seed.

    Args:
        preset: the runs' config preset.
        methods: keys of :data:`SPML_METHODS`.
        seeds: run seeds.
        setting: what the runs share (e.g. "Cole protocol, backbone = SmallCNN"): their group and ``setting`` label.
        overrides: nested config overrides of every run (e.g. ``data.protocol=cole``).
        loss_kwargs: per base loss (``loss.base``), its ``loss.kwargs`` (e.g. EPR's expected label count).
    """
    unknown = [name for name in methods if name not in SPML_METHODS]
    if unknown:
        raise ValueError(f"unknown single-positive method(s) {unknown}; valid: {', '.join(SPML_METHODS)}")
    specs = []
    for method in methods:
        base = SPML_METHODS[method]["loss"]["base"]
        kwargs = {"loss": {"kwargs": dict((loss_kwargs or {}).get(base, {}))}}
        for clml in (False, True):
            run = _merge(overrides or {}, SPML_METHODS[method], kwargs, {"clml": {"enabled": clml}})
            labels = {"setting": setting, "method": method, "clml": clml}
            variant = f"{method}{' + CLML' if clml else ''}"
            specs += [RunSpec(f"spml/{setting}", variant, seed, preset, run, labels) for seed in seeds]
    return specs


def spml_loss_kwargs(preset: str, overrides: dict[str, Any], given: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``given`` per-loss kwargs, with EPR's and ROLE's ``expected_positives`` set, where not given, to the mean
    number of labels per training image of the full labels: privileged information, as in the methods' papers
    (VOC 1.5, COCO 2.9), which every table that uses it says."""
    config = resolve_config(preset, overrides=overrides)
    labels = build_splits(config.data, preprocessing_for(config.model.arch), progress=False).train.labels
    mean_labels = round(float(labels.sum(axis=1).mean()), 3)
    kwargs = {name: dict(values) for name, values in given.items()}
    for name in ("epr", "role"):
        kwargs.setdefault(name, {}).setdefault("expected_positives", mean_labels)
    return kwargs


#: Label-correction settings of the ablation: config overrides of ``clml`` and the variant-name suffix.
CORRECTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "none": ({"correction": False}, ""),
    "fixed tau": ({"correction": True}, " + correction"),
    "class quantile": ({"correction": True, "quantile": 0.9}, " + quantile correction"),
}


def ablation_grid(
    preset: str,
    loss: str,
    protocol: str,
    seeds: Sequence[int],
    overrides: dict[str, Any] | None = None,
    authors_values: bool = False,
    corrections: Sequence[str] = tuple(CORRECTIONS),
    authors: bool = True,
) -> list[RunSpec]:
    """Base loss alone, + local, + global, + both, without and with label correction, and the authors' release.

    Correction is the fixed-tau rule, and for the base loss and CLML also the per-class quantile rule
    (:data:`CORRECTIONS`); ``corrections`` keeps some of them (every term keeps its run without correction, the
    reference of the table and of the embedding panels). The global term does not read labels, so it runs without
    correction only. ``authors=False`` leaves the release's row out.

    The release's row trains as the release ran (:data:`clml_core.config.AUTHORS`: its CLML implementation in fp32
    behind a loss scale growing from 65536 to 2^32 over the run), with our hyperparameters and the fixed-tau
    correction, so that it differs from "both + correction" only in the implementation and its scaling;
    ``authors_values`` gives it the release's hyperparameters too (correction threshold 0.75, SPLC tau 0.7, Focal's
    detached weight).
    """
    unknown = [name for name in corrections if name not in CORRECTIONS]
    if unknown:
        raise ValueError(f"ablation_grid: unknown correction(s) {unknown}; valid: {', '.join(CORRECTIONS)}")
    specs = []
    common = _merge(overrides or {}, {"data": PROTOCOLS[protocol], "loss": {"base": loss}})
    per_term = {
        "base": list(CORRECTIONS),
        "+ local": ["none", "fixed tau"],
        "+ global": ["none"],
        "+ both (CLML)": list(CORRECTIONS),
    }
    for name, (local, global_) in ABLATION_TERMS.items():
        for correction in [c for c in per_term[name] if c == "none" or c in corrections]:
            settings, suffix = CORRECTIONS[correction]
            clml = {"enabled": True, "local_weight": local, "global_weight": global_, **settings}
            if name == "base":
                # Correction without a CLML term feeds the base loss: the correction's own effect.
                clml = {"enabled": False, **settings, "correct_base": settings["correction"]}
            labels = {"terms": name, "correction": correction}
            run = _merge(common, {"clml": clml})
            specs += [RunSpec("ablation", f"{name}{suffix}", seed, preset, run, labels) for seed in seeds]
    if not authors:
        return specs
    released = _merge(common, {"clml": {"enabled": True}}, authors_overrides(loss, authors_values))
    labels = {"terms": "authors' release (as it ran)", "correction": "fixed tau"}
    variant = "authors release as run" + (" with its values" if authors_values else "")
    specs += [RunSpec("ablation", variant, seed, preset, released, labels) for seed in seeds]
    return specs


def reference_grid(
    preset: str, loss: str, seeds: Sequence[int], overrides: dict[str, Any] | None = None
) -> list[RunSpec]:
    """The base loss trained on the full labels: the ceiling the missing-label protocols are measured against."""
    run = _merge(
        overrides or {}, {"data": PROTOCOLS["full labels"], "loss": {"base": loss}, "clml": {"enabled": False}}
    )
    labels = {"protocol": "full labels", "loss": loss, "clml": False}
    return [RunSpec("reference", f"{loss} full labels", seed, preset, run, labels) for seed in seeds]


def sensitivity_grid(
    preset: str,
    loss: str,
    protocol: str,
    seeds: Sequence[int],
    lams: Sequence[float],
    taus: Sequence[float],
    overrides: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """CLML with one of lambda or tau changed from the preset's value."""
    common = _merge(overrides or {}, {"data": PROTOCOLS[protocol], "loss": {"base": loss}, "clml": {"enabled": True}})
    specs = []
    for lam in lams:
        run = _merge(common, {"clml": {"lam": lam}})
        specs += [RunSpec("sensitivity", f"lam={lam:g}", s, preset, run, {"param": "lam", "value": lam}) for s in seeds]
    for tau in taus:
        run = _merge(common, {"clml": {"tau": tau}})
        specs += [RunSpec("sensitivity", f"tau={tau:g}", s, preset, run, {"param": "tau", "value": tau}) for s in seeds]
    return specs


def _run_one(args: tuple[RunSpec, str, bool]) -> str:
    spec, root, force = args
    from clml_core.engine import train  # imported in the worker

    folder = spec.folder(Path(root))
    if force and folder.exists():
        import shutil

        shutil.rmtree(folder)
    if not runfolder.is_finished(folder):
        train(train_config(spec), folder, resume=True)  # starts the run, or continues it with the same configuration
    runfolder.write_spec(folder, {"group": spec.group, "variant": spec.variant, "seed": spec.seed, **spec.labels})
    return spec.variant


def train_config(spec: RunSpec) -> TrainConfig:
    """The configuration a worker trains ``spec`` with (one thread, no progress bar)."""
    return apply_updates(spec.config(), {"progress": False, "threads": 1})


def _check_finished(specs: Sequence[RunSpec], root: Path) -> None:
    """A finished run is reused only when its folder's configuration is the one its spec resolves to now: a study
    rerun after a change of preset or grid must not mix old runs into its tables."""
    stale = []
    for spec in specs:
        folder = spec.folder(root)
        if runfolder.is_finished(folder):
            saved = runfolder.read_config(folder)
            changed = config_diff(to_dict(saved), to_dict(train_config(spec))) if saved else ["no config.yaml"]
            if changed:
                stale.append(f"{folder} ({'; '.join(changed[:3])})")
    if stale:
        raise ValueError(
            f"{len(stale)} finished run(s) under {root} were trained with another configuration than the study asks "
            f"for now, e.g. {stale[0]}; train into an empty run root (--run-root) or retrain them (--force)"
        )


def _prepare_data(specs: Sequence[RunSpec]) -> None:
    """Generate or load each distinct dataset, feature store and trunk store once, before worker processes would
    race to create them."""
    seen = set()
    for spec in specs:
        config = spec.config()
        data, model = config.data, config.model
        side = data.synthetic_image_size or data.image_size
        key = (data.dataset, data.root, data.synthetic_size, data.synthetic_seed, side)
        stored = model.train_mode == "frozen" or uses_trunk_cache(config)
        if stored:  # one store per backbone, split point, augmentation and views (a random backbone: per seed)
            views = (data.augment, data.feature_views, view_seed(config.seed, data.views_per_seed))
            key += (
                model.arch,
                model.weights,
                model.train_mode,
                model.trainable_stages,
                *views,
                model.weights or config.seed,
            )
        if key not in seen:
            seen.add(key)
            splits = build_splits(data, preprocessing_for(model.arch), progress=config.progress)
            if stored:
                torch.manual_seed(config.seed)
                network = build_network(model, splits.train.num_classes, torch.device("cpu"))
                input_splits(config, splits, network, torch.device("cpu"))


def run_specs(specs: Iterable[RunSpec], root: str | Path, processes: int = 2, force: bool = False) -> Path:
    """Train every run that has no results yet (resuming interrupted ones), ``processes`` at a time."""
    specs = list(specs)
    root = Path(root)
    if not force:
        _check_finished(specs, root)
    todo = [s for s in specs if force or not runfolder.is_finished(s.folder(root))]
    tqdm.write(f"{len(specs)} runs, {len(specs) - len(todo)} already done, {len(todo)} to train in {root}")
    jobs = [(spec, str(root), force) for spec in specs]
    _prepare_data(todo)
    if processes <= 1:
        for job in tqdm(jobs, desc="runs"):
            _run_one(job)
        return root
    context = multiprocessing.get_context("spawn")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with context.Pool(processes) as pool:
            for _ in tqdm(pool.imap_unordered(_run_one, jobs), total=len(jobs), desc="runs"):
                pass
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return root


def collect(root: str | Path, specs: Iterable[RunSpec] | None = None) -> pd.DataFrame:
    """One row per finished run under ``root`` (or per given spec): its labels, key config fields and results."""
    root = Path(root)
    folders = [s.folder(root) for s in specs] if specs is not None else runfolder.spec_folders(root)
    rows = []
    for folder in folders:
        if not runfolder.is_finished(folder):
            continue
        results, config = runfolder.read_results(folder), runfolder.read_config_dict(folder)
        rows.append(
            {
                **runfolder.read_spec(folder),
                "folder": str(folder),
                "lam": config["clml"]["lam"],
                "tau": config["clml"]["tau"],
                "test_map": results["test_map"],
                "test_map_cole": results["test_map_cole"],  # AP 0 for a class without a test positive
                # mAP over the classes with >= clml_core.evaluate.FREQUENT_MIN_POSITIVES test positives (None before)
                "test_map_frequent": results.get("test_map_frequent"),
                "best_val_map": results["best_val_map"],
                "best_epoch": results["best_epoch"],
                # label correction over the whole run (counts summed over its epochs), and in the selected epoch
                "corr_precision": results["run_corr_precision"],
                "corr_recall": results["run_corr_recall"],
                "corr_precision_selected": results["selected_corr_precision"],
                "corr_recall_selected": results["selected_corr_recall"],
                "train_seconds": results.get("train_seconds"),
            }
        )
    return pd.DataFrame(rows)


def collect_per_class(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of ``runs`` (a :func:`collect` frame) and class: the run's columns, ``class`` and ``ap``
    (test AP in percent, from ``results.json``; NaN for a class without a test positive)."""
    rows = []
    for run in runs.to_dict("records"):
        results = runfolder.read_results(run["folder"])
        rows += [{**run, "class": name, "ap": ap} for name, ap in results["test_ap_per_class"].items()]
    return pd.DataFrame(rows)


def collect_reliability(runs: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Per run of ``runs`` (a :func:`collect` frame) and score bin: :func:`clml_core.correction.score_reliability`
    of the unobserved training entries, from the run's ``train_scores.npz`` (the last epoch's model), with the
    run's columns."""
    frames = []
    for run in runs.to_dict("records"):
        saved = runfolder.read_train_scores(run["folder"])
        counts = score_reliability(saved["scores"], saved["observed"], saved["labels"], bins)
        frames.append(pd.DataFrame(counts).assign(**run))
    return pd.concat(frames, ignore_index=True)


def collect_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """Every epoch row of the ``metrics.csv`` of each run of ``runs`` (a :func:`collect` frame), with the run's
    label columns (``epoch`` 0-based, as logged)."""
    results = ("test_map", "test_map_cole", "best_val_map", "best_epoch", "train_seconds")
    keep = [c for c in runs.columns if c not in results and not c.startswith("corr_")]
    frames = [runfolder.read_metrics(run["folder"]).assign(**run) for run in runs[keep].to_dict("records")]
    return pd.concat(frames, ignore_index=True)
