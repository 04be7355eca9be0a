"""The CLML benchmark script runs end to end on a tiny shape and prints its table and spread line; its label
distributions are what they say."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_clml_loss import COCO_2014, coco_frequencies, draw_labels  # noqa: E402


def test_bench_clml_loss_prints_rows_and_the_spread():
    command = [sys.executable, "benchmarks/bench_clml_loss.py", "--shape", "8", "16", "4", "--runs", "2"]
    options = ["--repeats", "2", "--rounds", "1", "--threads", "1", "--clock", "cpu"]
    result = subprocess.run(command + options, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "threads 1, cpu clock" in result.stdout
    for kind in ("uniform", "coco", "single"):
        row = rf"^\| {kind} \| 8 \| 16 \| 4 \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$"
        assert len(re.findall(row, result.stdout, flags=re.M)) == 2
        spread = rf"^{kind} B=8 D=16 C=4, 2 runs: ratio median [\d.]+x, lowest [\d.]+x, highest [\d.]+x$"
        assert re.search(spread, result.stdout, flags=re.M)


def test_cpu_clock_needs_one_thread():
    command = [sys.executable, "benchmarks/bench_clml_loss.py", "--clock", "cpu", "--threads", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--clock cpu counts one thread's CPU time" in result.stderr


def test_label_distributions_have_their_documented_statistics():
    g = torch.Generator().manual_seed(0)
    uniform = draw_labels("uniform", 20000, 80, g, COCO_2014)
    assert float(uniform.sum(1).double().mean()) == pytest.approx(3.0, rel=0.02)
    coco = draw_labels("coco", 20000, 80, g, COCO_2014)
    assert float(coco[:, 0].double().mean()) == pytest.approx(0.546, rel=0.02)  # person
    assert float(coco.sum(1).double().mean()) == pytest.approx(2.9, rel=0.02)
    assert (coco.double().mean(0).diff() < 0.02).all()  # most frequent first
    single = draw_labels("single", 20000, 20, g, COCO_2014)
    assert (single.sum(1) == 1).all()
    assert float(single[:, 0].double().mean()) > float(single[:, -1].double().mean())
    assert len(COCO_2014) == 80 and sum(COCO_2014) == pytest.approx(2.91, abs=0.005)
    assert max(COCO_2014) == 45174 / 82783  # person, in COCO-2014 train


def test_coco_frequencies_are_read_from_instances_json(tmp_path):
    annotations = {
        "images": [{"id": i} for i in range(4)],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 5, "name": "dog"}],
        "annotations": [
            {"image_id": 0, "category_id": 1},
            {"image_id": 0, "category_id": 1},  # two instances in one image count once
            {"image_id": 1, "category_id": 1},
            {"image_id": 2, "category_id": 1},
            {"image_id": 2, "category_id": 3},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(annotations))
    assert coco_frequencies(path) == (0.75, 0.25, 0.0)
    path.write_text(json.dumps({"images": [], "categories": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances.json: no images or no categories"):
        coco_frequencies(path)


def test_bench_loading_tiny_prints_the_cache_and_pipeline_tables():
    command = [sys.executable, "-W", "ignore::DeprecationWarning", "benchmarks/bench_loading.py", "--tiny"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\| jpeg q90 \| [\d.]+ kB \| [\d.]+ GiB \| \d+ \|$", result.stdout, flags=re.M)
    pipelines = ["files (PIL + resize)", "raw cache", "jpeg cache, decode in workers", "jpeg cache, decode on cpu"]
    for pipeline in pipelines:
        assert re.search(rf"^\| {re.escape(pipeline)} \| 0 \| \d+ \| [\d.]+x \|$", result.stdout, flags=re.M), pipeline


def test_bench_batch_reads_tiny_prints_both_readers_and_their_ratio():
    command = [sys.executable, "-W", "ignore::DeprecationWarning", "benchmarks/bench_batch_reads.py", "--tiny"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\| batch read \| [\d.]+ \| \|$", result.stdout, flags=re.M), result.stdout
    assert re.search(r"^\| item reads \| [\d.]+ \| [\d.]+x \|$", result.stdout, flags=re.M), result.stdout


def test_gpu_check_runs_its_tiny_mode_on_the_cpu(tmp_path):
    """The GPU check's code paths on small shapes: CLML against the float64 loop, the step benchmark, and a paper
    preset run stopped as a crash would stop it and resumed; every pass/fail row passes."""
    out = tmp_path / "check.json"
    command = [sys.executable, "-W", "ignore::DeprecationWarning", "benchmarks/gpu_check.py", "--device", "cpu"]
    result = subprocess.run(command + ["--tiny", "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    checks = {(r["section"], r["check"]): r for r in rows}
    assert checks[("CLML on cpu", "float32: value / gradient rel. error")]["status"] == "PASS"
    assert checks[("CLML on cpu", "bf16 autocast: value / gradient rel. error")]["status"] == "PASS"
    paper = "paper preset, embedded benchmark"
    assert checks[(paper, "train loss per epoch")]["status"] == "PASS"
    assert checks[(paper, "stopped after / resumed from")]["result"].startswith("10 steps / epoch 0 step 8")
    assert {"plain: images/s", "ours: images/s", "CLML share of the ours step"} <= {r["check"] for r in rows}
    eigh = [r["result"] for r in rows if r["section"] == "CLML eigh placement"]
    assert len(eigh) == 3 and all(re.match(r"host [\d.]+ ms, device [\d.]+ ms, device / host [\d.]+$", e) for e in eigh)
    assert re.search(r"^12 rows, 0 failed, \d+ s on cpu$", result.stdout, flags=re.M)
