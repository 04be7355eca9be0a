"""The study notebooks: one literal ``parameters`` cell each, committed without outputs, and the whole smoke study
runs top to bottom through papermill and writes every figure and table."""

from __future__ import annotations

import ast
import json
import typing

import nbformat
import pytest

from clml_core.paths import NOTEBOOKS_DIR
from clml_core.study import NOTEBOOKS, PROFILES, run_study

#: Defaults every notebook that declares these must have (``""`` paths: the profile's default location).
COMMON_DEFAULTS = {
    "PROFILE": "default",
    "RUN_ROOT": "",
    "FIGURES_DIR": "",
    "FORCE": False,
    "DATASET": "synthetic",
    "DATA_ROOT": "",
    "OVERRIDES": {},
}
FIGURES = [
    "data_labels_per_image",
    "data_class_frequency",
    "data_cooccurrence",
    "data_samples",
    "showcase_learning_curves",
    "main_results",
    "ablation",
    "sensitivity",
    "embeddings",
    "learning_curves",
    "per_class",
    "correction_curves",
    "clml_share",
    "reliability",
]
TABLES = [
    "main_table",
    "main_pooled_table",
    "reference_table",
    "ablation_table",
    "sensitivity_table",
    "per_class_table",
    "embedding_table",
    "spml_embedded_table",
    "spml_embedded_vs_an_table",
    "spml_embedded_pooled_table",
    "spml_embedded_cole_map_table",
    "spml_published_table",
]


def _notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)


def _parameters(name: str) -> dict[str, tuple[typing.Any, typing.Any]]:
    """name -> (annotation, value) of the notebook's single parameters cell, which must be plain literals."""
    cells = [c for c in _notebook(name).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: {len(cells)} cells tagged 'parameters', expected exactly one"
    assert cells[0].cell_type == "code"
    declared = {}
    for statement in ast.parse(cells[0].source).body:
        assert isinstance(statement, ast.AnnAssign), f"{name}: line {statement.lineno} is not a typed assignment"
        assert isinstance(statement.target, ast.Name) and statement.value is not None
        annotation = eval(compile(ast.Expression(statement.annotation), name, "eval"), {})  # e.g. list[str]
        declared[statement.target.id] = (annotation, ast.literal_eval(statement.value))
    return declared


def _has_type(value: typing.Any, annotation: typing.Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None:
        if annotation is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, annotation)
    return isinstance(value, origin) and all(_has_type(item, args[0]) for item in value)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_is_typed_literals_with_default_profile_values(name):
    declared = _parameters(name)
    assert {"SMOKE", "SEED"} <= set(declared), f"{name}: the parameters cell must set SMOKE and SEED"
    for param, (annotation, value) in declared.items():
        assert _has_type(value, annotation), f"{name}: {param} = {value!r} is not a {annotation}"
        if param in PROFILES["default"]:
            assert value == PROFILES["default"][param], f"{name}: {param} default differs from the default profile"
        elif param in COMMON_DEFAULTS:
            assert value == COMMON_DEFAULTS[param], f"{name}: {param} default must be {COMMON_DEFAULTS[param]!r}"
        for profile, values in PROFILES.items():  # what papermill injects must fit the declared type
            if param in values:
                assert _has_type(values[param], annotation), f"{name}: {profile} profile's {param} is no {annotation}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    notebook = _notebook(name)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.kernelspec.display_name == "Python 3"
    for cell in notebook.cells:
        assert "injected-parameters" not in cell.metadata.get("tags", []), f"{name}: an executed copy was committed"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"


@pytest.mark.slow
def test_smoke_study_writes_every_figure_and_table(tmp_path):
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    seconds = run_study("smoke", run_root=runs, figures_dir=figures, progress=False)  # a cell error raises
    assert list(seconds) == list(NOTEBOOKS)
    for stem in FIGURES:
        for suffix in (".png", ".pdf"):
            path = figures / f"{stem}{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, f"missing or empty figure {path.name}"
    for stem in TABLES:
        for suffix in (".md", ".csv"):
            assert (figures / f"{stem}{suffix}").is_file(), f"missing table {stem}{suffix}"
    main = (figures / "main_table.md").read_text().splitlines()
    smoke = PROFILES["smoke"]
    assert len(main) == 2 + len(smoke["LOSSES"]) * len(smoke["PROTOCOLS"])
    assert main[0] == (
        "| protocol | loss | without CLML | with CLML | diff (95% CI) | p | p (Holm) | p (BH) | decision | "
        "CI excludes 0 | CI covers | CI | seeds-only CI | n seeds |"
    )
    # One seed: the interval covers the test images only, and no effect is decided.
    assert all("| 1 seed: test images only |" in line and "| 1 seed: no decision |" in line for line in main[2:])
    embeddings = (figures / "embedding_table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in embeddings[2:]] == [
        "| base loss",
        "| + low-rank terms only",
        "| + label correction only",
        "| + CLML",
    ]
    for saved in [
        "data/label_statistics.json",
        "data/samples.npz",
        "tables/main_runs.csv",
        "tables/main_reliability.csv",
        "embeddings/coords.csv",
    ]:
        assert (runs / saved).is_file(), f"missing {saved}"
    study = json.loads((runs / "study.json").read_text())
    assert {"cpu_model", "torch", "torch_config", "mkldnn_available"} <= set(study["machine"])
    for name in NOTEBOOKS:  # executed copies, with their outputs, go to the run folder
        assert (runs / "notebooks" / f"{name}.ipynb").is_file()


def test_figures_without_saved_runs_stop_before_any_notebook_naming_make_study(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match=r"data/label_statistics.json \(written by 00_data\).*make study"):
        run_study("smoke", only=["04_paper_figures"], run_root=runs, figures_dir=tmp_path / "f", progress=False)
    assert not (runs / "notebooks" / "04_paper_figures.ipynb").exists()


def test_a_relative_run_root_is_resolved_before_the_notebooks_change_directory(tmp_path, monkeypatch):
    """The notebooks run in the notebooks folder: a relative --run-root must reach them as the caller meant it."""
    import papermill

    seen = {}
    monkeypatch.setattr(papermill, "inspect_notebook", lambda path: {"RUN_ROOT": None, "FIGURES_DIR": None})
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, dst, parameters, **kwargs: seen.update(parameters))
    monkeypatch.chdir(tmp_path)
    run_study("smoke", only=["00_data"], run_root="rel/runs", figures_dir="rel/figures", progress=False)
    assert seen == {"RUN_ROOT": str(tmp_path / "rel" / "runs"), "FIGURES_DIR": str(tmp_path / "rel" / "figures")}
