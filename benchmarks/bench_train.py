"""Training-step throughput and the share of step time spent in the CLML term.

    python benchmarks/bench_train.py                        # CPU: smallcnn 64 px, ResNet101 224 and 448 px
    python benchmarks/bench_train.py --device cuda --compile  # GPU: adds our step against the authors' plain fp32 step

Each configuration times full optimiser steps (forward, base loss + CLML, backward, Adam) on random images held in
memory, so data loading is excluded (see bench_loading.py for that). The CLML share is the time of the CLML term's
forward + backward on the step's embeddings divided by the step time. "ours" is channels_last + bf16 autocast (+
torch.compile with --compile); "plain fp32" is the authors' setting: fp32, contiguous, a GradScaler, no autocast.
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds

from clml_core.losses import CLMLLoss, make_base_loss
from clml_core.models import build_model, param_groups


def bench(arch: str, size: int, batch: int, device: torch.device, mode: str, repeats: int, warmup: int) -> dict:
    """Seconds per step and per CLML term for one configuration; mode is "ours", "ours+compile" or "plain"."""
    torch.manual_seed(0)
    num_classes = 80
    widths = [16, 32, 64, 128] if arch == "smallcnn" else None  # the default study's model
    model = build_model(arch, num_classes, weights=None, widths=widths).to(device)
    ours = mode.startswith("ours")
    if ours:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if mode == "ours+compile" else model
    optimizer = torch.optim.Adam(param_groups(model, 1e-4), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=not ours and device.type == "cuda")
    base_loss = make_base_loss("bce", check_values=False)
    clml = CLMLLoss(check_values=False)
    images = torch.rand(batch, 3, size, size, device=device)
    if ours:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(batch, num_classes, device=device) < 3 / num_classes).float()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ours and device.type == "cuda")

    def step() -> None:
        with autocast:
            out = net(images)
            loss = base_loss(out.logits.float(), labels) + clml(out.embeddings, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    embeddings = torch.randn(batch, model.embed_dim, device=device)

    def clml_only() -> None:
        leaf = embeddings.detach().requires_grad_()
        clml(leaf, labels).backward()

    step_s = median_seconds(step, device, repeats, warmup)
    clml_s = median_seconds(clml_only, device, max(repeats, 5))
    return {"step_s": step_s, "clml_s": clml_s, "images_per_s": batch / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    # (arch, image size, batch): the CPU study's model and batch, then the paper's backbone at two sizes.
    configs = [("smallcnn", 32, 32), ("resnet101", 224, 64 if gpu else 8), ("resnet101", 448, 64 if gpu else 4)]
    modes = ["plain", "ours"] + (["ours+compile"] if args.compile else []) if gpu else ["ours"]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print("| model | px | batch | step | images/s | step ms | CLML ms | CLML share | vs plain |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for arch, size, batch in configs:
        plain = None
        for mode in modes:
            warmup = 3 if mode == "ours+compile" else 1
            r = bench(arch, size, batch, device, mode, args.repeats, warmup)
            plain = r if mode == "plain" else plain
            ratio = f"{plain['step_s'] / r['step_s']:.2f}x" if plain else "-"
            print(
                f"| {arch} | {size} | {batch} | {mode} | {r['images_per_s']:.1f} | {r['step_s'] * 1e3:.1f} | "
                f"{r['clml_s'] * 1e3:.2f} | {100 * r['clml_s'] / r['step_s']:.1f}% | {ratio} |"
            )


if __name__ == "__main__":
    main()
