"""Forward + backward time of CLMLLoss against the per-class SVD loop, run in the same process.

    python benchmarks/bench_clml_loss.py [--device cpu|cuda] [--repeats 50] [--rounds 5]
    python benchmarks/bench_clml_loss.py --shape 64 2048 80 --runs 20   # one shape, its spread over 20 runs

Prints a markdown table: milliseconds per forward+backward (median over repeats) for B in {32, 64, 128},
D in {512, 2048}, C in {20, 80}, about 3 positive labels per row, and the loop / CLMLLoss ratio. The two are timed
in alternating rounds and the ratio is the median of the per-round ratios, so that a drift in the machine's speed
(common on shared virtual machines) does not land on one side only. With ``--runs N`` each shape is timed N times
and a last line gives the median, lowest and highest ratio.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from timing import paired_seconds

from clml_core.losses import CLMLLoss, clml_loss_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50, help="calls of each per cell")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds the calls are split into")
    parser.add_argument("--positives", type=float, default=3.0, help="mean positive labels per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "D", "C"), help="time this shape only")
    parser.add_argument("--runs", type=int, default=1, help="times each shape is timed")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    loss_fn = CLMLLoss(check_values=False)
    shapes = [tuple(args.shape)] if args.shape else list(itertools.product((32, 64, 128), (512, 2048), (20, 80)))

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, float32 fwd+bwd")
    print("| B | D | C | CLMLLoss ms | per-class loop ms | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for batch, dim, classes in shapes:
        z = torch.randn(batch, dim, generator=generator).to(device)
        labels = (torch.rand(batch, classes, generator=generator) < args.positives / classes).to(device)

        def ours(z: torch.Tensor = z, labels: torch.Tensor = labels) -> None:
            leaf = z.detach().requires_grad_()
            loss_fn(leaf, labels).backward()

        def loop(z: torch.Tensor = z, labels: torch.Tensor = labels) -> None:
            leaf = z.detach().requires_grad_()
            clml_loss_reference(leaf, labels).backward()

        for _ in range(args.runs):
            t = paired_seconds(ours, loop, device, args.repeats, args.rounds)
            print(f"| {batch} | {dim} | {classes} | {1e3 * t.a:.2f} | {1e3 * t.b:.2f} | {t.ratio:.1f}x |", flush=True)
            ratios.setdefault((batch, dim, classes), []).append(t.ratio)
    if args.runs > 1:
        for (batch, dim, classes), values in ratios.items():
            print(
                f"B={batch} D={dim} C={classes}, {len(values)} runs: ratio median {statistics.median(values):.1f}x, "
                f"lowest {min(values):.1f}x, highest {max(values):.1f}x"
            )


if __name__ == "__main__":
    main()
