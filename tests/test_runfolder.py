"""Run folders: one owner and one configuration, portable checkpoints, a corrupt checkpoint, a full disk, signals,
normal file permissions and one-line command-line errors. The subprocess fault sweep is in test_faults.py."""

import errno
import json
import os
import platform
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from clml_core import checkpoints, runio, train_state
from clml_core import engine as engine_module
from clml_core import train as cli
from clml_core.config import apply_updates, resolve_config, validate_config
from clml_core.engine import NonFiniteLossError, RunInterrupted, train
from clml_core.paths import DATA_DIR, PROJ_ROOT
from clml_core.runio import DiskFullError
from clml_core.runlock import LOCK_NAME, FolderInUseError, RunLock

# The smoke preset cut down: 3 steps per epoch, 2 epochs.
SMALL = {
    "progress": False,
    "threads": 1,
    "data": {"limit_train": 96},
    "model": {"widths": [8, 16]},
    "optim": {"epochs": 2, "batch_size": 32},
    "clml": {"correction_start_epoch": 1},
}


def small(**sections):
    config = apply_updates(resolve_config("smoke", overrides=SMALL), sections)
    validate_config(config)
    return config


def outcome(run):
    """What a finished run reports, without the wall-clock fields."""
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=["seconds"])
    results = json.loads((run / "results.json").read_text())
    results.pop("train_seconds")
    return metrics, results


def assert_same_outcome(run, reference):
    metrics, results = outcome(run)
    ref_metrics, ref_results = outcome(reference)
    pd.testing.assert_frame_equal(metrics, ref_metrics)
    assert results == ref_results


def snapshot(folder):
    """Every file under ``folder`` with its bytes and mode."""
    return {
        path.relative_to(folder): (path.read_bytes(), path.stat().st_mode)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the small configuration."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(small(), run)
    return run


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_plain_and_the_previous_one_is_kept(tmp_path):
    run = tmp_path / "run"
    train(small(checkpoint_every=1), run, max_steps=4)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    previous = torch.load(run / "checkpoints" / "previous.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 1) and (previous["epoch"], previous["step"]) == (1, 0)
    checkpoints.plain(last)
    assert last["format"] == checkpoints.FORMAT and last["config"]["optim"]["epochs"] == 2
    assert isinstance(last["sums"], dict) and isinstance(last["sums"]["correction"]["n_missing"], int)


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, capfd):
    run = tmp_path / "run"
    train(small(checkpoint_every=1), run, max_steps=4)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    train(None, run, resume=True)
    err = capfd.readouterr().err
    assert f"{last} cannot be read" in err and "continuing from" in err and "previous.pt" in err
    assert_same_outcome(run, reference)


def test_a_replay_that_selects_otherwise_keeps_the_weights_its_checkpoint_selected(tmp_path, monkeypatch):
    """Epoch 1 was selected, then last.pt is lost; the replay of epoch 1 scores lower (as a GPU replay may): the run
    must end with epoch 0's weights under best.pt, as results.json says, not the lost trajectory's epoch 1."""
    run, config = tmp_path / "run", small(optim={"epochs": 3})
    original = engine_module.mean_average_precision

    def scripted(scores):
        calls = iter(scores)
        return lambda targets, predicted: next(calls, None) or original(targets, predicted)

    monkeypatch.setattr(engine_module, "mean_average_precision", scripted([10.0, 20.0]))
    train(config, run, max_steps=6)  # epochs 0 and 1 evaluated, epoch 1 selected; stopped at the start of epoch 2
    epoch0_weights = checkpoints.read(run / "checkpoints" / "previous.pt")["model"]  # the model after epoch 0
    (run / "checkpoints" / "last.pt").write_bytes(b"lost")
    monkeypatch.setattr(engine_module, "mean_average_precision", scripted([5.0, 5.0]))
    results = train(None, run, resume=True)
    assert (results["best_epoch"], results["best_val_map"]) == (0, 10.0)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    for name, tensor in epoch0_weights.items():
        torch.testing.assert_close(best[name], tensor, rtol=0, atol=0)
    assert sorted(p.name for p in (run / "checkpoints").glob("best*")) == ["best-epoch0.pt", "best.pt"]
    assert (run / "checkpoints" / "last.pt.unreadable").read_bytes() == b"lost"


def test_no_readable_checkpoint_is_a_clear_error_and_changes_no_file(tmp_path):
    run = tmp_path / "run"
    train(small(checkpoint_every=1), run, max_steps=4)
    for name in ("last.pt", "previous.pt"):
        (run / "checkpoints" / name).write_bytes(b"not a checkpoint")
    before = snapshot(run)
    with pytest.raises(checkpoints.CheckpointError, match="last.pt cannot be read.*previous.pt cannot be read"):
        train(None, run, resume=True)
    assert snapshot(run) == before


def test_an_unsafe_checkpoint_is_not_unpickled(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoints.FORMAT, "payload": train_state.EpochSums()}, path)
    with pytest.raises(checkpoints.CheckpointError, match="cannot be read"):
        checkpoints.read(path)


# ---------------------------------------------------------------------------- one owner, one configuration


def test_a_refused_resume_changes_no_file(tmp_path):
    run = tmp_path / "run"
    train(small(checkpoint_every=1), run, max_steps=4)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"clml.lam: 1.0 -> 0.5"):
        train(small(checkpoint_every=1, clml={"lam": 0.5}), run, resume=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(small(checkpoint_every=1), run)
    assert snapshot(run) == before


def test_resume_trains_with_the_folders_own_configuration(tmp_path):
    """The README's sequence: start with hill / single positive, stop before the first checkpoint, resume."""
    hill = small(loss={"base": "hill"}, data={"protocol": "single_positive"})
    run, reference = tmp_path / "x", tmp_path / "reference"
    train(hill, run, max_steps=0)  # killed before its first checkpoint: config.yaml and run_info.json only
    assert not (run / "checkpoints").exists() and (run / "config.yaml").exists()
    before = snapshot(run)
    with pytest.raises(ValueError, match="loss.base: 'hill' -> 'bce'"):
        train(small(), run, resume=True)
    assert snapshot(run) == before
    train(None, run, resume=True)
    train(hill, reference)
    assert_same_outcome(run, reference)
    assert "hill" in (run / "config.yaml").read_text() and "single_positive" in (run / "config.yaml").read_text()
    assert len(json.loads((run / "run_info.json").read_text())["resumes"]) == 1


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        with pytest.raises(FolderInUseError, match=f"pid {os.getpid()} on host {platform.node()}"):
            train(small(optim={"epochs": 1}), run)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    assert list(run.iterdir()) == []
    # A lock file left by a process that died (SIGKILL drops its flock, the file stays).
    stale = {"pid": 4_000_000, "host": platform.node(), "started_utc": "2026-01-01T00:00:00+00:00"}
    (run / LOCK_NAME).write_text(json.dumps(stale))
    train(small(optim={"epochs": 1}), run)
    err = capfd.readouterr().err
    assert "took over the stale lock" in err and "pid 4000000" in err
    assert (run / "results.json").is_file() and not (run / LOCK_NAME).exists()


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    run = tmp_path / "new"
    with pytest.raises(ValueError, match="no run to resume"):
        train(None, run, resume=True)
    assert not run.exists()


# -------------------------------------------------------------------------------------------- NaN, disk full


def test_nan_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    original = engine_module.Trainer._train_step

    def poisoned(self, images, observed, index):
        return original(self, images * float("nan"), observed, index)

    monkeypatch.setattr(engine_module.Trainer, "_train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written yet"):
        train(small(), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def _disk_full_at(monkeypatch, name, count):
    """Writes of ``name`` fail with ENOSPC from the ``count``-th on, half-way through the temporary file."""
    original, seen = runio._write_new_file, []

    def write(path, data):
        if path.name.startswith(f".{name}."):
            seen.append(path)
            if len(seen) >= count:
                path.write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        original(path, data)

    monkeypatch.setattr(runio, "_write_new_file", write)


@pytest.mark.parametrize("name,count", [("last.pt", 3), ("metrics.csv", 2), ("results.json", 1)])
def test_a_full_disk_loses_nothing_already_saved(tmp_path, reference, monkeypatch, name, count):
    run = tmp_path / "run"
    config = small(checkpoint_every=1)
    with monkeypatch.context() as patch:
        _disk_full_at(patch, name, count)
        with pytest.raises(DiskFullError, match=f"no space left on the device while writing {run}.*{name}"):
            train(config, run)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    state = checkpoints.read(run / "checkpoints" / "last.pt")  # the newest checkpoint is intact
    assert state["epoch"] * 3 + state["step"] >= {"last.pt": 2, "metrics.csv": 4, "results.json": 6}[name] - 1
    train(None, run, resume=True)
    assert_same_outcome(run, reference)


# ----------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_after_the_step_and_resume_continues(tmp_path, reference, monkeypatch, signum):
    original = engine_module.Trainer._train_step

    def signalled(self, images, observed, index):
        if (self.epoch, self.step) == (0, 1):
            os.kill(os.getpid(), signum)  # arrives mid-step
        return original(self, images, observed, index)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(engine_module.Trainer, "_train_step", signalled)
        with pytest.raises(RunInterrupted, match=f"stopped by {signum.name} at epoch 0 step 2"):
            train(small(), run)
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored
    state = checkpoints.read(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 2)
    train(None, run, resume=True)
    assert_same_outcome(run, reference)


@pytest.mark.parametrize("signum,stops_at_once", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_second_sigint_stops_at_once_a_second_sigterm_changes_nothing(tmp_path, monkeypatch, signum, stops_at_once):
    original = engine_module.Trainer._train_step

    def signalled(self, images, observed, index):
        if (self.epoch, self.step) == (0, 1):
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
        return original(self, images, observed, index)

    monkeypatch.setattr(engine_module.Trainer, "_train_step", signalled)
    message = f"{signum.name} during training" if stops_at_once else f"{signum.name} at epoch 0 step 2"
    with pytest.raises(RunInterrupted, match=message):
        train(small(checkpoint_every=1), tmp_path / "run")
    state = checkpoints.read(tmp_path / "run" / "checkpoints" / "last.pt")
    # At once: the step under way is not checkpointed. Otherwise it finishes and is.
    assert (state["epoch"], state["step"]) == ((0, 1) if stops_at_once else (0, 2))


# ------------------------------------------------------------------------------- files and the command line


def test_run_files_get_the_users_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        train(small(optim={"epochs": 1}), tmp_path / "run")
    finally:
        os.umask(old)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "run").rglob("*") if path.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_tests_keep_generated_data_out_of_the_repository():
    assert PROJ_ROOT not in DATA_DIR.resolve().parents


def _cli(capsys, *argv):
    status = cli.run([str(arg) for arg in argv])
    err = capsys.readouterr().err
    return status, err


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.synthetic_size=huge", "config field 'data.synthetic_size': 'huge' is not one of tiny, default"),
        ("optim.lr=nan", "config field 'optim.lr': expected a finite number, got nan"),
        ("clml.lam=abc", "config field 'clml.lam': expected a number, got 'abc'"),
        ("loss.kwargs={gamma: 2}", "config field 'loss.kwargs'"),
        ("optim.pct_start=0", "config field 'optim.pct_start'"),
    ],
)
def test_cli_errors_are_one_line_before_any_file_is_written(tmp_path, capsys, override, message):
    status, err = _cli(capsys, "--preset", "smoke", "--out", tmp_path / "run", override)
    assert status == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_resume_takes_the_folders_configuration(tmp_path, capsys):
    run = tmp_path / "run"
    train(small(checkpoint_every=1), run, max_steps=1)
    status, err = _cli(capsys, "--out", run, "--resume", "clml.lam=0.5")
    assert status == 2 and "clml.lam: 1.0 -> 0.5" in err and len(err.strip().splitlines()) == 1
    status, err = _cli(capsys, "--preset", "default", "--out", run, "--resume")
    assert status == 2 and "data.synthetic_size: 'tiny' -> 'default'" in err
    status, err = _cli(capsys, "--out", tmp_path / "nothing", "--resume")
    assert status == 2 and "holds no run to resume" in err
    status, _ = _cli(capsys, "--out", run, "--resume", "optim.epochs=2")  # matches: continues
    assert status == 0 and (run / "results.json").is_file()


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="optim.lr"):
        cli.run(["--preset", "smoke", "--out", str(tmp_path / "run"), "--debug", "optim.lr=nan"])


def _coco_with_a_truncated_image(root, write_image):
    """A COCO-layout folder under ``root`` whose 4th training image is cut short; returns that image's path."""
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    for split, count in (("train2014", 16), ("val2014", 8)):
        images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in range(count)]
        annotations = [{"image_id": i, "category_id": 1 + 2 * (i % 2)} for i in range(count)]
        (root / "annotations").mkdir(exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        for image in images:
            write_image(root / split / image["file_name"], seed=image["id"])
    bad = root / "train2014" / "COCO_train2014_000000000003.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    return bad


COCO_ARGS = ["--preset", "smoke", "data.dataset=coco", "data.image_size=16", "data.protocol=full", "progress=false"]


def test_cli_a_corrupt_image_is_one_line_and_leaves_no_folder(tmp_path, capsys, write_image):
    bad = _coco_with_a_truncated_image(tmp_path, write_image)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    packed = [*COCO_ARGS, f"data.root={tmp_path}", "data.packed_cache=true", cache, "--out", tmp_path / "run"]
    status, err = _cli(capsys, *packed)
    assert status == 2 and bad.name in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_cli_a_corrupt_image_read_by_a_loader_worker_is_one_line(tmp_path, capsys, write_image):
    bad = _coco_with_a_truncated_image(tmp_path, write_image)
    loose = [*COCO_ARGS, f"data.root={tmp_path}", "data.workers=1", "optim.batch_size=4", "--out", tmp_path / "run"]
    status, err = _cli(capsys, *loose)
    assert status == 2 and f"cannot decode image {bad}" in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("corrupt", [False, True], ids=["finished", "corrupt-image"])
def test_the_command_line_exits_with_loader_workers(tmp_path, write_image, corrupt):
    """Loader workers ignore SIGTERM (the main process owns the stop), so the engine must shut them down itself:
    otherwise the interpreter's exit waits for them forever (multiprocessing joins its children at exit)."""
    if corrupt:
        _coco_with_a_truncated_image(tmp_path, write_image)
        args = [*COCO_ARGS, f"data.root={tmp_path}"]
    else:
        args = ["--preset", "smoke", "data.synthetic_size=tiny", "optim.epochs=1", "progress=false"]
    argv = [sys.executable, "-m", "clml_core.train", *args, "data.workers=1", "optim.batch_size=4"]
    try:
        done = subprocess.run([*argv, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as error:
        raise AssertionError("the command line did not exit: a loader worker outlived the run") from error
    assert done.returncode == (2 if corrupt else 0), done.stderr[-2000:]


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.run(["--preset", "nope", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'nope'" in err and len(err.strip().splitlines()) == 1, err
