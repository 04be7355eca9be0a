"""Run the whole study: every notebook through papermill under one parameter profile.

    python -m clml_core.study --profile default            # the embedded benchmark on a CPU (the README's command)
    python -m clml_core.study --profile smoke              # seconds per notebook (the tests use it)
    python -m clml_core.study --profile paper -p DATA_ROOT=/data/coco   # ResNet101 at 448 px on a GPU, on COCO
    python -m clml_core.study --profile paper -p DATASET=voc -p DATA_ROOT=/data/voc   # VOC (nuswide likewise)
    python -m clml_core.study --only 04_paper_figures      # re-render figures and tables from saved results

Executed notebooks go to ``runs/<profile>/notebooks/``, training runs to ``runs/<profile>/``, figures and tables
to ``figures/`` for the default profile (``runs/<profile>/figures/`` otherwise). Training runs whose results exist
are skipped unless ``--force``, so an interrupted study resumes where it stopped; a finished run trained with another
configuration than the study now asks for (after a change of preset or grid) is an error, never reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from clml_core.config import PRESETS
from clml_core.experiments import SPML_METHODS
from clml_core.paths import FIGURES_DIR, NOTEBOOKS_DIR, RUNS_DIR
from clml_core.runio import atomic_write_json, git_state, machine_info

NOTEBOOKS = ("00_data", "01_train", "02_ablation", "03_embeddings", "04_paper_figures", "05_single_positive")

#: The notebooks a profile runs unless it names its own (``NOTEBOOKS`` in its parameters).
DEFAULT_NOTEBOOKS = NOTEBOOKS[:5]

#: What ``04_paper_figures`` reads under the run root, by the notebook that writes it.
FIGURE_INPUTS: dict[str, str] = {
    "00_data": "data/label_statistics.json",
    "01_train": "showcase/showcase.json",
    "02_ablation": "tables/main_reliability.csv",
    "03_embeddings": "embeddings/coords.csv",
}

_LOSSES = ["bce", "focal", "asl", "hill", "splc"]
_PROTOCOLS = ["75% left", "40% left", "single positive"]

#: Cole et al.'s protocol on the VOC photos (their seed and 20% validation carve, selection on its full labels), with
#: EM's and EM+APL's published VOC values (Zhou et al.): alpha 0.2, APL's warm-up 5, beta 0.02.
_COLE_VOC: dict[str, Any] = {
    "DATASET": "voc",
    "OVERRIDES": {"data": {"protocol": "cole", "protocol_seed": 1200, "val_labels": "full", "val_fraction": 0.2}},
    "KWARGS": {"em": {"alpha": 0.2}, "em-apl": {"alpha": 0.2, "beta": 0.02, "warmup": 5}},
}

#: Notebook parameters of each profile; a notebook receives the ones its parameters cell declares. ``PRESET`` names
#: the profile's configuration preset (a key of ``clml_core.config.PRESETS``; :func:`check_profiles` holds to it).
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "SMOKE": True,
        "PRESET": "smoke",
        "DATASET": "synthetic",
        "SEED": 0,
        "SEEDS": [0],
        "SWEEP_SEEDS": [0],
        "LOSSES": ["bce", "hill"],
        "PROTOCOLS": ["40% left", "single positive"],
        "ABLATION_LOSS": "bce",
        "ABLATION_PROTOCOL": "40% left",
        "LAMS": [0.3],
        "TAUS": [0.8],
        "BOOTSTRAP_RESAMPLES": 200,
        "PROCESSES": 1,
        "OVERRIDES": {"data": {"limit_train": 128}, "optim": {"epochs": 1}},
        "NOTEBOOKS": list(NOTEBOOKS),
        "METHODS": ["AN", "EPR", "LL-Cp"],
        "SETTINGS": {"embedded": {"PRESET": "smoke", "DATASET": "synthetic", "BACKBONE": "SmallCNN, smoke size"}},
    },
    "default": {
        "SMOKE": False,
        "PRESET": "default",
        "DATASET": "synthetic",
        "SEED": 0,
        "SEEDS": [0, 1, 2, 3, 4],
        "LOSSES": _LOSSES,
        "PROTOCOLS": _PROTOCOLS,
        "ABLATION_LOSS": "bce",
        "ABLATION_PROTOCOL": "40% left",
        "LAMS": [0.01, 0.03, 0.1, 0.3, 3.0, 10.0],  # with the preset's 1.0: log-spaced from 0.01 to 10
        "TAUS": [0.5, 0.7, 0.8],
        # The ablation and the sensitivity grid on 3 seeds (the main table on 5): the study fits 20 minutes on the
        # slower 2-core machines.
        "SWEEP_SEEDS": [0, 1, 2],
        "BOOTSTRAP_RESAMPLES": 1000,  # test-image resamples of every interval (clml_core.tables)
        "PROCESSES": 2,
        "OVERRIDES": {},
    },
    # Real photos, ImageNet EfficientNet-Lite0 frozen (features cached once), on a 2-core CPU:
    # python -m clml_core.study --profile real -p DATA_ROOT=/path/to/voc2007 (the folder holding VOCdevkit/)
    "real": {
        "SMOKE": False,
        "PRESET": "real",
        "DATASET": "voc",
        "SEED": 0,
        "SEEDS": [0, 1, 2, 3, 4],
        "SWEEP_SEEDS": [0, 1, 2, 3, 4],
        "LOSSES": _LOSSES,
        # VOC2007 has 1.40 labels per image: keeping 40% of the positives is impossible when every image keeps one.
        "PROTOCOLS": ["full labels", "75% left", "single positive"],
        "PROTOCOL": "single positive",
        "SAMPLE_PROTOCOL": "single positive",
        "ABLATION_LOSS": "bce",
        "ABLATION_PROTOCOL": "single positive",
        "LAMS": [0.01, 0.03, 0.1, 0.3, 3.0, 10.0, 30.0],  # with the preset's 1.0: log-spaced from 0.01 to 30
        "TAUS": [0.5, 0.7, 0.8],
        "PROCESSES": 2,
        "OVERRIDES": {},
    },
    # The fine-tuning showcase beside it (partial fine-tuning, fewer runs): the one run of 01_train, e.g.
    # python -m clml_core.study --profile real_partial --only 01_train -p DATA_ROOT=... -p CLML=false (and =true)
    "real_partial": {
        "SMOKE": False,
        "PRESET": "real_partial",
        "DATASET": "voc",
        "SEED": 0,
        "SEEDS": [0, 1],
        "SWEEP_SEEDS": [0, 1],
        "LOSSES": ["bce"],
        "PROTOCOLS": ["single positive"],
        "PROTOCOL": "single positive",
        "SAMPLE_PROTOCOL": "single positive",
        "LOSS": "bce",
        "ABLATION_LOSS": "bce",
        "ABLATION_PROTOCOL": "single positive",
        "LAMS": [],
        "TAUS": [],
        "PROCESSES": 1,
        "OVERRIDES": {},
    },
    # CLML where it acts: EfficientNet-Lite0's last two stages trained from the stored trunk on the VOC2007 photos,
    # CLML on the backbone's own pooled features (no projection head), as in the paper:
    # python -m clml_core.study --profile real_finetune -p DATA_ROOT=/path/to/voc2007
    "real_finetune": {
        "SMOKE": False,
        "PRESET": "real_finetune",
        "DATASET": "voc",
        "SEED": 0,
        "SEEDS": [0, 1, 2, 3, 4],
        # BCE and Hill (CLML's bases), and WAN, the single-positive method with the best mean without CLML on these
        # photos in the spml profile (frozen backbone; no method separated from AN there).
        "LOSSES": ["bce", "hill", "wan"],
        "PROTOCOLS": ["full labels", "75% left", "single positive"],
        "PROTOCOL": "single positive",
        "SAMPLE_PROTOCOL": "single positive",
        "ABLATION_LOSS": "bce",
        "ABLATION_PROTOCOL": "single positive",
        "LAMS": [0.01, 0.1, 10.0, 30.0],  # with the preset's 1.0: 0.01 to 30
        "TAUS": [0.5, 0.8],
        "SWEEP_SEEDS": [0, 1, 2],  # the ablation and the sweeps: 3 seeds (the main table: 5)
        "ABLATION_CORRECTIONS": ["fixed tau"],
        "ABLATION_AUTHORS": False,
        "PROCESSES": 2,
        "OVERRIDES": {},
    },
    # Cole et al.'s single-positive harness and the methods built on it, each without and with CLML, on the embedded
    # benchmark, on the VOC2007 photos with the frozen backbone (Cole's linear_fixed_features regime, here with the
    # real preset's MLP head, which CLML acts on) and on the same photos with the backbone's top stages trained
    # (real_finetune): python -m clml_core.study --profile spml -p DATA_ROOT=... (about an hour on 2 CPU cores;
    # -p "SETTINGS=..." runs a subset)
    "spml": {
        "SMOKE": False,
        "PRESET": "real",
        "DATASET": "voc",
        "SEED": 0,
        "SEEDS": [0, 1, 2, 3, 4],
        "METHODS": list(SPML_METHODS),
        "SETTINGS": {
            "embedded": {
                "PRESET": "default",
                "DATASET": "synthetic",
                "BACKBONE": "SmallCNN from scratch, 6 epochs",
                "OVERRIDES": {"data": {"protocol": "cole", "protocol_seed": 1200, "val_labels": "full"}},
                "KWARGS": {"em": {"alpha": 0.1}, "em-apl": {"alpha": 0.1, "beta": 0.2, "warmup": 3}},
            },
            "voc frozen": {
                "PRESET": "real",
                "BACKBONE": "EfficientNet-Lite0 ImageNet frozen + MLP head",
                **_COLE_VOC,
                "SKIP": {
                    "LL-R+BoostLU": "its class activation map needs the backbone's feature map, not cached features"
                },
            },
            # CLML where it acts (the real_finetune preset): the last block stage and head convolution trained from
            # the stored trunk, CLML and the classifier on the 1280-d pooled features.
            "voc finetune": {
                "PRESET": "real_finetune",
                "BACKBONE": "EfficientNet-Lite0 ImageNet, last block stage + head conv trained",
                **_COLE_VOC,
            },
        },
        "BOOTSTRAP_RESAMPLES": 1000,
        "PROCESSES": 2,
        "OVERRIDES": {},
        "NOTEBOOKS": ["05_single_positive"],
    },
    "paper": {
        "SMOKE": False,
        "PRESET": "paper",
        "DATASET": "coco",  # -p DATASET=voc or -p DATASET=nuswide for the others; -p DATA_ROOT=... is required
        "SEED": 0,
        "SEEDS": [0, 1, 2],  # a profile meant for conclusions: at least 3 seeds
        "SWEEP_SEEDS": [0, 1, 2],
        "LOSSES": _LOSSES,
        "PROTOCOLS": _PROTOCOLS,
        "ABLATION_LOSS": "hill",
        "ABLATION_PROTOCOL": "40% left",
        "LAMS": [0.1, 0.3, 3.0, 10.0],
        "TAUS": [0.7],
        "BOOTSTRAP_RESAMPLES": 500,  # test-image resamples of every interval (40000 COCO images)
        "PROCESSES": 1,
        "OVERRIDES": {},
    },
}


def check_profiles(profiles: dict[str, dict[str, Any]]) -> None:
    """Raise ValueError unless every profile names an existing configuration preset under ``PRESET``."""
    for name, params in profiles.items():
        preset = params.get("PRESET")
        if preset not in PRESETS:
            raise ValueError(
                f"study profile {name!r}: PRESET={preset!r} is not a configuration preset "
                f"(clml_core.config.PRESETS: {', '.join(PRESETS)})"
            )


check_profiles(PROFILES)


def notebook_parameters(profile: str, run_root: Path, figures_dir: Path, force: bool, extra: dict[str, Any]) -> dict:
    params = dict(PROFILES[profile])
    params.update({"PROFILE": profile, "RUN_ROOT": str(run_root), "FIGURES_DIR": str(figures_dir), "FORCE": force})
    params.update(extra)
    return params


def _check_dataset(profile: str, params: dict[str, Any]) -> None:
    """Fail before the first notebook when the profile's dataset cannot be resolved (no root, a contradiction)."""
    from clml_core.experiments import with_dataset

    dataset, root = params.get("DATASET", "synthetic"), params.get("DATA_ROOT", "")
    if dataset != "synthetic" and not root:
        raise ValueError(
            f"profile {profile!r} trains on DATASET={dataset!r}: give its root folder with -p DATA_ROOT=/path "
            "(and -p DATASET=voc or nuswide for another dataset)"
        )
    overrides = with_dataset(params["PRESET"], params.get("OVERRIDES", {}), dataset, root)
    if dataset != "synthetic":
        from clml_core.config import resolve_config
        from clml_core.data.splits import load_sources

        try:
            load_sources(resolve_config(params["PRESET"], overrides=overrides).data)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error}\n(other splits: -p OVERRIDES='{{data: {{train_split: NAME, test_split: NAME}}}}')"
            ) from None


def _check_figure_inputs(profile: str, run_root: Path, names: Sequence[str]) -> None:
    """Before rendering figures from saved results alone (``--only 04_paper_figures``, ``make figures``), check that
    the notebooks not run now have left what the figures read."""
    missing = [
        f"{run_root / path} (written by {notebook})"
        for notebook, path in FIGURE_INPUTS.items()
        if notebook not in names and not (run_root / path).exists()
    ]
    if missing:
        raise FileNotFoundError(
            "the figures are rendered from the study's saved runs, and these are missing: "
            + "; ".join(missing)
            + f". Run the study first: make study PROFILE={profile} (python -m clml_core.study --profile {profile})"
        )


def run_study(
    profile: str = "default",
    *,
    only: Sequence[str] | None = None,
    force: bool = False,
    run_root: str | Path | None = None,
    figures_dir: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Execute the notebooks in order; return the seconds each took (also written to ``run_root/study.json``)."""
    import papermill

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    names = list(only) if only else list(PROFILES[profile].get("NOTEBOOKS", DEFAULT_NOTEBOOKS))
    unknown = [name for name in names if name not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; valid: {', '.join(NOTEBOOKS)}")
    # Absolute: the notebooks run with the notebooks folder as their working directory.
    run_root = (Path(run_root) if run_root else RUNS_DIR / profile).resolve()
    if figures_dir is None:
        figures_dir = FIGURES_DIR if profile == "default" else run_root / "figures"
    figures_dir = Path(figures_dir).resolve()
    executed = run_root / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    params = notebook_parameters(profile, run_root, figures_dir, force, extra or {})
    _check_dataset(profile, params)
    if "04_paper_figures" in names:
        _check_figure_inputs(profile, run_root, names)
    seconds: dict[str, float] = {}
    for name in names:
        started = time.perf_counter()
        source = NOTEBOOKS_DIR / f"{name}.ipynb"
        print(f"[study:{profile}] {name} -> {executed / f'{name}.ipynb'}", flush=True)
        declared = papermill.inspect_notebook(str(source))
        papermill.execute_notebook(
            str(source),
            str(executed / f"{name}.ipynb"),
            parameters={key: value for key, value in params.items() if key in declared},
            kernel_name="python3",
            cwd=str(NOTEBOOKS_DIR),
            progress_bar=progress,
            log_output=progress,  # stream the notebook's own progress (runs trained, ...) to the console
        )
        seconds[name] = round(time.perf_counter() - started, 1)
    record = {
        "profile": profile,
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "parameters": params,
        **git_state(),
        "machine": machine_info(),
    }
    atomic_write_json(run_root / ("study.json" if only is None else f"study_{'_'.join(names)}.json"), record)
    print(f"[study:{profile}] done in {record['total_seconds']:.0f} s: {json.dumps(seconds)}", flush=True)
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clml_core.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--only", nargs="+", choices=NOTEBOOKS, help="run only these notebooks")
    parser.add_argument("--force", action="store_true", help="retrain runs whose results exist")
    parser.add_argument("--run-root", default=None, help="default: runs/<profile>")
    parser.add_argument("--figures-dir", default=None, help="default: figures/ (default profile)")
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra notebook parameter, the value read as YAML (e.g. -p DATA_ROOT=/data/coco)",
    )
    args = parser.parse_args(argv)
    extra = {}
    for item in args.param:
        if "=" not in item:
            parser.error(f"--param {item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        extra[name] = yaml.safe_load(value)
    try:
        run_study(
            args.profile,
            only=args.only,
            force=args.force,
            run_root=args.run_root,
            figures_dir=args.figures_dir,
            extra=extra,
        )
    except (ValueError, FileNotFoundError) as error:  # bad parameters or data, found before any notebook ran
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
