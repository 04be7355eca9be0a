"""Forward + backward time of CLMLLoss against the per-class SVD loop, run in the same process.

    python benchmarks/bench_clml_loss.py [--device cpu|cuda] [--repeats 30] [--rounds 5] [--threads 1 --clock cpu]
    python benchmarks/bench_clml_loss.py --shape 64 2048 80 --runs 20   # one shape, its spread over 20 runs
    python benchmarks/bench_clml_loss.py --labels coco --coco-annotations instances_train2014.json

Prints a markdown table: milliseconds per forward+backward (median over repeats) for B in {32, 64, 128},
D in {512, 2048}, C in {20, 80} and three label distributions, and the loop / CLMLLoss ratio:

- ``uniform``: every label with probability 3 / C (about 3 positive labels per row, the largest group small);
- ``coco``: COCO's skew, every label k with its own probability p_k (:data:`COCO_2014`, the real per-class
  frequencies of COCO-2014 train, or those of any COCO ``instances_*.json`` with ``--coco-annotations``); at C < 80
  the profile is sampled at C evenly spaced ranks, so the most frequent label (person, in 54.6% of the rows) is
  always there;
- ``single``: the single-positive protocol, one positive label per row drawn from the COCO frequencies.

The two are timed in alternating rounds and the ratio is the median of the per-round ratios, so that a drift in the
machine's speed (common on shared virtual machines) does not land on one side only; on a machine busy with other
work, ``--threads 1 --clock cpu`` times this thread's CPU time instead of wall time. With ``--runs N`` each cell is
timed N times and a last line gives the median, lowest and highest ratio. On CUDA, ``--eigh host|device`` chooses
where CLMLLoss runs its small ``eigh`` calls (see :class:`clml_core.losses.CLMLLoss`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from timing import paired_seconds

from clml_core.losses import CLMLLoss, clml_loss_reference

# COCO-2014 train (instances_train2014.json, 82,783 images): how many images hold each of the 80 categories, in
# COCO's category order (person, bicycle, car, ..., toothbrush). Transcribed from a public listing of these counts;
# checks: person 45,174 (its known count), 241,035 labels in all, 2.91 per image as published for COCO, and each
# class about 0.70 of its train2017 count (82,783 / 118,287 images). ``--coco-annotations`` recomputes them.
COCO_2014_TRAIN_IMAGES = 82_783
COCO_2014_TRAIN_COUNTS = (
    45174, 2287, 8606, 2442, 2243, 2791, 2464, 4321, 2098, 2893, 1205, 1214, 481, 3844, 2241, 2818,
    3041, 2068, 1105, 1389, 1518, 668, 1324, 1798, 3924, 2749, 4861, 2667, 1631, 1511, 2209, 1170,
    2986, 1625, 1804, 1884, 2511, 2343, 2368, 5968, 1771, 6518, 2537, 3097, 2493, 5028, 1618, 1171,
    1645, 1216, 1340, 1186, 821, 2202, 1062, 2080, 8950, 3170, 3084, 2539, 8378, 2317, 3191, 2475,
    1290, 2180, 1471, 3322, 1089, 2003, 151, 3291, 1671, 3734, 3159, 2530, 673, 1510, 128, 700,
)  # fmt: skip
# The fraction of the images holding each label, most frequent first.
COCO_2014 = tuple(sorted((count / COCO_2014_TRAIN_IMAGES for count in COCO_2014_TRAIN_COUNTS), reverse=True))
LABELS = ("uniform", "coco", "single")


def coco_frequencies(path: Path) -> tuple[float, ...]:
    """Fraction of the images of a COCO ``instances_*.json`` holding each category, most frequent first."""
    data = json.loads(path.read_text())
    images = {image["id"] for image in data["images"]}
    if not images or not data["categories"]:
        raise ValueError(f"{path}: no images or no categories")
    holding = {category["id"]: set() for category in data["categories"]}
    for annotation in data["annotations"]:
        holding[annotation["category_id"]].add(annotation["image_id"])
    return tuple(sorted((len(ids) / len(images) for ids in holding.values()), reverse=True))


def draw_labels(
    kind: str, batch: int, classes: int, generator: torch.Generator, profile: tuple[float, ...]
) -> torch.Tensor:
    """(B, C) bool labels of one of :data:`LABELS` (see the module docstring)."""
    if kind == "uniform":
        return torch.rand(batch, classes, generator=generator) < 3.0 / classes
    ranks = torch.linspace(0, len(profile) - 1, classes).round().long()
    frequencies = torch.tensor(profile, dtype=torch.float64)[ranks]
    if kind == "coco":
        return torch.rand(batch, classes, generator=generator, dtype=torch.float64) < frequencies
    if kind == "single":
        chosen = torch.multinomial(frequencies, batch, replacement=True, generator=generator)
        return torch.nn.functional.one_hot(chosen, classes).bool()
    raise ValueError(f"unknown label distribution {kind!r}; expected one of {LABELS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30, help="calls of each per cell")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds the calls are split into")
    parser.add_argument("--labels", nargs="+", choices=LABELS, default=list(LABELS), help="label distributions")
    parser.add_argument("--coco-annotations", type=Path, help="COCO instances_*.json for the coco frequencies")
    parser.add_argument("--eigh", choices=("host", "device"), default="device", help="where CLMLLoss runs eigh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "D", "C"), help="time this shape only")
    parser.add_argument("--runs", type=int, default=1, help="times each cell is timed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time (needs --threads 1)"
    )
    args = parser.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu counts one thread's CPU time: use it with --threads 1 on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    profile = coco_frequencies(args.coco_annotations) if args.coco_annotations else COCO_2014
    loss_fn = CLMLLoss(check_values=False, eigh=args.eigh)
    shapes = [tuple(args.shape)] if args.shape else list(itertools.product((32, 64, 128), (512, 2048), (20, 80)))

    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {args.clock} clock, "
        "float32 fwd+bwd, "
        f"eigh {loss_fn.eigh}, coco profile {args.coco_annotations or 'COCO_2014'}"
    )
    print("| labels | B | D | C | largest group | CLMLLoss ms | per-class loop ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for kind, (batch, dim, classes) in itertools.product(args.labels, shapes):
        z = torch.randn(batch, dim, generator=generator).to(device)
        labels = draw_labels(kind, batch, classes, generator, profile).to(device)

        def ours(z: torch.Tensor = z, labels: torch.Tensor = labels) -> None:
            leaf = z.detach().requires_grad_()
            loss_fn(leaf, labels).backward()

        def loop(z: torch.Tensor = z, labels: torch.Tensor = labels) -> None:
            leaf = z.detach().requires_grad_()
            clml_loss_reference(leaf, labels).backward()

        largest = int(labels.sum(0).max())
        for _ in range(args.runs):
            t = paired_seconds(ours, loop, device, args.repeats, args.rounds, clock)
            print(
                f"| {kind} | {batch} | {dim} | {classes} | {largest} | {1e3 * t.a:.2f} | {1e3 * t.b:.2f} "
                f"| {t.ratio:.1f}x |",
                flush=True,
            )
            ratios.setdefault((kind, batch, dim, classes), []).append(t.ratio)
    if args.runs > 1:
        for (kind, batch, dim, classes), values in ratios.items():
            print(
                f"{kind} B={batch} D={dim} C={classes}, {len(values)} runs: ratio median "
                f"{statistics.median(values):.1f}x, lowest {min(values):.1f}x, highest {max(values):.1f}x"
            )


if __name__ == "__main__":
    main()
