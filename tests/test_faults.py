"""Fault injection: training runs killed (SIGKILL) at many points, including inside checkpoint writes, stopped by
SIGTERM, given a corrupt checkpoint, a full disk and a second process on their folder. Every run, resumed with a bare
``--resume`` until it finishes, must end with ``metrics.csv`` and ``results.json`` identical to an uninterrupted run
(wall-clock fields aside), with no temporary file or lock left behind.

The fast part runs by default (about a dozen short subprocesses); the full sweep (every write at every phase, every
step, random-time kills) is behind the ``sweep`` marker: ``pytest -m sweep tests/test_faults.py``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest

from clml_core import checkpoints, runio
from clml_core.config import resolve_config
from clml_core.engine import EXIT_INTERRUPTED, train
from clml_core.runlock import LOCK_NAME

RUNNER = Path(__file__).with_name("fault_runner.py")
# The smoke preset cut down: 3 steps per epoch, 2 epochs, a checkpoint after every step (many checkpoint writes).
OVERRIDES = [
    "progress=false",
    "threads=1",
    "checkpoint_every=1",
    "data.limit_train=96",
    "model.widths=[8,16]",
    "optim.epochs=2",
    "optim.batch_size=32",
    "clml.correction_start_epoch=1",
]
STEPS = 6
PHASES = ("before", "partial", "complete", "rotated", "replaced")
KILLED = -9


def outcome(run: Path) -> tuple[pd.DataFrame, dict]:
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=["seconds"])
    results = json.loads((run / "results.json").read_text())
    results.pop("train_seconds")
    return metrics, results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (in this process) and the sequence of its file writes: (file name, kept previous)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    writes: list[list] = []
    write, keep = runio._write_new_file, runio._keep

    def record_write(path, data):
        writes.append([path.name[1:].rsplit(".", 3)[0], False])  # .NAME.PID.HEX.tmp
        write(path, data)

    def record_keep(path, previous):
        writes[-1][1] = True
        keep(path, previous)

    with mock.patch.object(runio, "_write_new_file", record_write), mock.patch.object(runio, "_keep", record_keep):
        train(resolve_config("smoke", overrides=OVERRIDES), run)
    return run, [tuple(w) for w in writes]


def cli(run: Path, fault: str = "none", *, mode: str = "requeue", wait: bool = True):
    """The training command line with ``fault`` injected.

    ``mode``: "fresh" (the full command), "requeue" (the full command with --resume, as a scheduler's requeued job
    runs it: it starts the run or continues it) or "bare" (``--out RUN --resume``: the folder's configuration).
    """
    full = ["--preset", "smoke", "--out", str(run), *OVERRIDES]
    arguments = {"fresh": full, "requeue": [*full, "--resume"], "bare": ["--out", str(run), "--resume"]}[mode]
    command = [sys.executable, str(RUNNER), fault, *arguments]
    if not wait:
        return subprocess.Popen(command, cwd=run.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=run.parent, capture_output=True, text=True, timeout=300)


def finish_and_compare(run: Path, reference_run: Path, mode: str = "requeue") -> None:
    """Resume until the run finishes, then compare it with the uninterrupted run; nothing may be left over."""
    for _ in range(3):
        done = cli(run, mode=mode)
        assert done.returncode in (0, EXIT_INTERRUPTED), done.stderr[-2000:]
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr[-2000:]
    metrics, results = outcome(run)
    ref_metrics, ref_results = outcome(reference_run)
    pd.testing.assert_frame_equal(metrics, ref_metrics)
    assert results == ref_results
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == LOCK_NAME]
    assert not leftovers, leftovers
    checkpoints.read(run / "checkpoints" / "last.pt")


def kill_at_random(run: Path, rng: random.Random, within: float) -> bool:
    """Start the run (requeue form), SIGKILL it a random time within ``within`` seconds of its taking the folder;
    whether it was still running then."""
    process = cli(run, wait=False)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads((run / LOCK_NAME).read_text()).get("pid") == process.pid:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, within))
    process.kill()
    return process.wait() == KILLED


def kill_points(writes: list[tuple[str, bool]]) -> list[str]:
    """Every fault that kills the first process: each write at each phase that write has, and each step."""
    points = [f"kill-step:{k}" for k in range(1, STEPS + 1)]
    for k, (_, kept) in enumerate(writes, start=1):
        points += [f"kill-write:{k}:{phase}" for phase in PHASES if phase != "rotated" or kept]
    return points


def kill_and_resume(run: Path, fault: str, reference_run: Path) -> None:
    first = cli(run, fault, mode="fresh")
    assert first.returncode == KILLED, f"{fault}: rc {first.returncode}, {first.stderr[-1500:]}"
    finish_and_compare(run, reference_run)


# ------------------------------------------------------------------------------------------------ fast part


def test_the_reference_writes_checkpoints_often(reference):
    _, writes = reference
    names = [name for name, _ in writes]
    assert names[:2] == ["config.yaml", "run_info.json"] and names[-1] == "results.json"
    assert names.count("last.pt") == STEPS and sum(kept for _, kept in writes) == STEPS - 1


def test_sigkill_at_sampled_points_loses_nothing(tmp_path, reference):
    """Three kills inside checkpoint writes, one in another file's write and one mid-step (a seeded sample)."""
    reference_run, writes = reference
    rng = random.Random(13)
    checkpoint_writes = [k for k, (name, kept) in enumerate(writes, start=1) if name == "last.pt" and kept]
    other_writes = [k for k, (name, _) in enumerate(writes, start=1) if name != "last.pt"]
    faults = [f"kill-write:{rng.choice(checkpoint_writes)}:{phase}" for phase in ("partial", "rotated", "replaced")]
    faults += [f"kill-write:{rng.choice(other_writes)}:partial", f"kill-step:{rng.randint(1, STEPS)}"]
    for i, fault in enumerate(faults):
        kill_and_resume(tmp_path / f"run{i}", fault, reference_run)


def test_sigkill_at_random_times_loses_nothing(tmp_path, reference):
    """The same run killed twice at random moments of its training (whatever it is doing), then resumed to the end."""
    reference_run, _ = reference
    rng, run, kills, attempts = random.Random(7), tmp_path / "run", 0, 0
    while kills < 2 and attempts < 6:
        kills, attempts = kills + kill_at_random(run, rng, within=1.0), attempts + 1
    finish_and_compare(run, reference_run)
    assert kills == 2


def test_sigterm_checkpoints_exits_75_and_resume_continues(tmp_path, reference):
    reference_run, _ = reference
    run = tmp_path / "run"
    first = cli(run, "term-step:2", mode="fresh")
    assert first.returncode == EXIT_INTERRUPTED, first.stderr[-2000:]
    assert "stopped by SIGTERM at epoch 0 step 2" in first.stderr and "Traceback" not in first.stderr
    state = checkpoints.read(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 2)
    second = cli(run, "term-step:3", mode="bare")  # the resumed process's 3rd step: epoch 1, step 2
    assert second.returncode == EXIT_INTERRUPTED and "at epoch 1 step 2" in second.stderr, second.stderr[-2000:]
    train(None, run, resume=True)  # a checkpoint of the command line continues in Python (the study's path)
    finish_and_compare(run, reference_run, mode="bare")


def test_a_full_disk_then_a_corrupt_checkpoint_lose_nothing(tmp_path, reference):
    reference_run, writes = reference
    run = tmp_path / "run"
    k = [i for i, (name, kept) in enumerate(writes, start=1) if name == "last.pt" and kept][2]
    first = cli(run, f"enospc-write:{k}", mode="fresh")
    lines = first.stderr.strip().splitlines()
    assert first.returncode == 2 and len(lines) == 1 and "no space left on the device" in lines[0], first.stderr
    assert "last.pt" in lines[0] and "previous content is intact" in lines[0]
    last = run / "checkpoints" / "last.pt"
    checkpoints.read(last)
    last.write_bytes(last.read_bytes()[:1000])  # and then the newest checkpoint is truncated
    resumed = cli(run, mode="bare")
    assert resumed.returncode == 0 and "last.pt cannot be read" in resumed.stderr, resumed.stderr[-2000:]
    finish_and_compare(run, reference_run, mode="bare")


def test_two_processes_on_one_folder(tmp_path, reference):
    reference_run, _ = reference
    run = tmp_path / "run"
    release = tmp_path / "release"
    owner = cli(run, f"hold-step:2:{release}", mode="fresh", wait=False)
    deadline = time.monotonic() + 120
    while not (run / LOCK_NAME).exists() or not (run / "config.yaml").exists():
        assert time.monotonic() < deadline and owner.poll() is None, "the first process never took the folder"
        time.sleep(0.1)
    second = cli(run, mode="bare")
    assert second.returncode == 2 and f"is in use: pid {owner.pid}" in second.stderr, second.stderr[-2000:]
    fresh = cli(run, mode="fresh")
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr
    release.touch()
    assert owner.wait(timeout=300) == 0, owner.stderr.read()[-2000:]
    finish_and_compare(run, reference_run)


# ------------------------------------------------------------------------------------------------ the sweep


@pytest.mark.sweep
def test_sweep_sigkill_at_every_write_phase_and_step(tmp_path, reference):
    reference_run, writes = reference
    points = kill_points(writes)
    for i, fault in enumerate(points):
        kill_and_resume(tmp_path / f"run{i}", fault, reference_run)
    print(f"\nSIGKILL points: {len(points)} ({len(writes)} writes, {STEPS} steps); all resumed identically")


@pytest.mark.sweep
def test_sweep_sigterm_at_every_step(tmp_path, reference):
    reference_run, _ = reference
    for k in range(1, STEPS + 1):
        run = tmp_path / f"run{k}"
        first = cli(run, f"term-step:{k}", mode="fresh")
        assert first.returncode == EXIT_INTERRUPTED, first.stderr[-2000:]
        finish_and_compare(run, reference_run)
    print(f"\nSIGTERM points: {STEPS}; all resumed identically")


@pytest.mark.sweep
def test_sweep_sigkill_at_random_times(tmp_path, reference):
    reference_run, _ = reference
    rng, kills = random.Random(2026), 0
    for chain in range(10):
        run = tmp_path / f"run{chain}"
        for _ in range(3):
            kills += kill_at_random(run, rng, within=1.5)
        finish_and_compare(run, reference_run)
    print(f"\nrandom-time SIGKILLs that hit a live run: {kills} in 10 runs; all resumed identically")


@pytest.mark.sweep
def test_sweep_torchrun_forwards_sigterm_and_the_ranks_stop_together(tmp_path):
    """torchrun with two processes gets SIGTERM: both ranks stop after the same step, rank 0 checkpoints, and the
    resumed run ends as an uninterrupted two-process run does."""
    overrides = [*OVERRIDES, "log_every=1", "optim.batch_size=32"]

    def torchrun(run: Path, *extra: str, wait: bool = True):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += ["-m", "clml_core.train", "--preset", "smoke", "--out", str(run), *overrides, *extra]
        if not wait:
            return subprocess.Popen(command, cwd=run.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(command, cwd=run.parent, capture_output=True, text=True, timeout=600)

    reference_run, run = tmp_path / "reference", tmp_path / "run"
    assert torchrun(reference_run).returncode == 0
    launcher = torchrun(run, wait=False)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline and launcher.poll() is None, "the run never checkpointed"
        time.sleep(0.05)
    launcher.terminate()  # SIGTERM to torchrun, which forwards it to both workers
    _, stderr = launcher.communicate(timeout=300)
    assert "stopped by SIGTERM at epoch" in stderr, stderr[-3000:]
    resumed = torchrun(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics, results = outcome(run)
    ref_metrics, ref_results = outcome(reference_run)
    pd.testing.assert_frame_equal(metrics, ref_metrics)
    assert results == ref_results
