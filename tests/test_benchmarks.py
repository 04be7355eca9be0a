"""The CLML benchmark script runs end to end on a tiny shape and prints its table and spread line."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_clml_loss_prints_rows_and_the_spread():
    command = [sys.executable, "benchmarks/bench_clml_loss.py", "--shape", "8", "16", "4", "--runs", "2"]
    result = subprocess.run(command + ["--repeats", "2", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\| 8 \| 16 \| 4 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", result.stdout, flags=re.M)
    assert len(rows) == 2
    spread = r"^B=8 D=16 C=4, 2 runs: ratio median [\d.]+x, lowest [\d.]+x, highest [\d.]+x$"
    assert re.search(spread, result.stdout, flags=re.M)
