"""Shared timing helpers of the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(
    step: Callable[[], None], device: torch.device, repeats: int, warmup: int, clock: Callable[[], float]
) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = clock()
        step()
        _sync(device)
        times.append(clock() - start)
    return times


def median_seconds(step: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``step`` in seconds after ``warmup`` calls, synchronising the GPU around each call."""
    return statistics.median(_times(step, device, repeats, warmup, time.perf_counter))


class Paired(NamedTuple):
    """Median seconds of two steps timed in alternating rounds, and the median of the per-round ratios b / a."""

    a: float
    b: float
    ratio: float


def paired_seconds(
    a: Callable[[], None],
    b: Callable[[], None],
    device: torch.device,
    repeats: int,
    rounds: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> Paired:
    """Time ``a`` and ``b`` in ``rounds`` alternating rounds of about ``repeats / rounds`` calls each.

    The speed of a shared machine drifts over seconds; alternating the two steps lets a drift hit both, and the
    ratio is taken within each round before the median over rounds. ``clock`` is wall time by default;
    ``time.thread_time`` counts only this thread's CPU time (with one torch thread: all the work, without the time
    other processes hold the CPU).
    """
    per_round = max(1, -(-repeats // rounds))
    times_a, times_b, ratios = [], [], []
    for _ in range(rounds):
        round_a = _times(a, device, per_round, 2, clock)
        round_b = _times(b, device, per_round, 2, clock)
        times_a += round_a
        times_b += round_b
        ratios.append(statistics.median(round_b) / statistics.median(round_a))
    return Paired(statistics.median(times_a), statistics.median(times_b), statistics.median(ratios))
