"""One scripted GPU check: CLML on the device, the training step's speed, and a short paper-preset run.

    python benchmarks/gpu_check.py                      # on one GPU: under 8 minutes on an H100/H200 (make gpu-check)
    python benchmarks/gpu_check.py --device cpu --tiny  # seconds: the same code paths on small shapes (CI runs it)

Needs only what a stock PyTorch image has (torch, torchvision, numpy, pillow, pyyaml, tqdm; no downloads, weights
None) and prints one table, also written as JSON with ``--json FILE``:

1. **CLML on the device**: CLMLLoss (value and embedding gradient) at B=64, D=2048, C=80 against an obvious CPU float64
   reference (a per-class ``svdvals`` loop), in float32, and on embeddings produced under bf16 and fp16 autocast.
   If pytest and the repository's tests are there, the CUDA tests of ``tests/test_clml_loss.py`` run too. Then its
   forward + backward time with the eigen-decompositions on the host (``eigh="host"``) and on the device, for the
   uniform, COCO-2014 and single-positive labels of ``bench_clml_loss.py``: the faster should be the default.
2. **The training step** (``bench_train.py``): images/s of the authors' plain fp32 step and of ours (channels_last +
   bf16, then + torch.compile) for ResNet101 at 448 px, batch 64, and the CLML term's share of our step.
   Targets: CLML under 2% of the step; ours + compile at least 2.5x the plain step.
3. **The paper preset** on the embedded benchmark (generated at 32 px, resized to 448 px by the loader), weights None:
   a few hundred steps, stopped as a crash would stop it after ``--kill-at`` steps and resumed from its checkpoint;
   the per-epoch loss, the final test mAP and the peak GPU memory.

Rows whose target is n/a (on a CPU every speed target is) only report. The exit status is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_clml_loss import COCO_2014, LABELS, draw_labels  # noqa: E402
from bench_train import bench  # noqa: E402
from timing import paired_seconds  # noqa: E402

from clml_core import checkpoints, runfolder  # noqa: E402
from clml_core.config import resolve_config  # noqa: E402
from clml_core.engine import train  # noqa: E402
from clml_core.losses import CLMLLoss  # noqa: E402

ROWS: list[dict[str, str]] = []


def row(section: str, check: str, result: str, target: str = "n/a", ok: bool | None = None) -> None:
    """Record one table row; ``ok`` None means report only."""
    status = "report" if ok is None else "PASS" if ok else "FAIL"
    ROWS.append({"section": section, "check": check, "result": result, "target": target, "status": status})
    print(f"[gpu-check] {section} | {check} | {result} | {target} | {status}", flush=True)


def reference_clml(z: torch.Tensor, labels: torch.Tensor, lam: float = 1.0, delta: float = 1.0) -> torch.Tensor:
    """lam / B * (sum_k max(delta, ||Z_k||_*) - ||Z||_*) with one svdvals per class (the obvious loop)."""
    local = sum(
        torch.clamp(torch.linalg.svdvals(z[labels[:, k]]).sum(), min=delta)
        for k in range(labels.shape[1])
        if labels[:, k].any()
    )
    return lam / z.shape[0] * (local - torch.linalg.svdvals(z).sum())


def check_clml(device: torch.device, batch: int, dim: int, classes: int) -> None:
    section = "CLML on " + device.type
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, dim, generator=gen).relu()  # (B, D) post-ReLU, as pooled features are
    labels = torch.rand(batch, classes, generator=gen) < 3.0 / classes  # (B, C)
    z64 = z.double().requires_grad_()
    ref = reference_clml(z64, labels)
    ref.backward()
    for name, dtype in (("float32", None), ("bf16 autocast", torch.bfloat16), ("fp16 autocast", torch.float16)):
        if dtype is not None and device.type == "cpu" and dtype == torch.float16:
            continue  # CPU autocast is bf16 only
        layer = torch.nn.Linear(dim, dim, bias=False, device=device)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(dim))
        inputs = z.to(device).clone().requires_grad_()  # a fresh leaf (on a CPU .to() returns z itself)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            embeddings = layer(inputs)  # (B, D), in the autocast dtype
            value = CLMLLoss(check_values=False)(embeddings, labels.to(device))
        value.backward()
        # The reference on the embeddings as the loss saw them (rounded to the autocast dtype).
        seen = embeddings.detach().double().cpu().requires_grad_()
        target = reference_clml(seen, labels)
        target.backward()
        value_err = abs(value.item() - target.item()) / abs(target.item())
        grad_err = float((inputs.grad.double().cpu() - seen.grad).norm() / seen.grad.norm())
        tolerance = 1e-4 if dtype is None else 2e-2
        ok = math.isfinite(value_err) and value_err < tolerance and grad_err < max(tolerance, 1e-3)
        errors = f"{value_err:.1e} / {grad_err:.1e}"
        row(section, f"{name}: value / gradient rel. error", errors, f"< {tolerance:g}", ok)


def check_clml_eigh(device: torch.device, batch: int, dim: int, classes: int, repeats: int) -> None:
    """CLMLLoss forward + backward with its eigen-decompositions on the host against on the device, per label
    distribution of ``benchmarks/bench_clml_loss.py`` (alternating rounds); the faster should be the default."""
    section = "CLML eigh placement"
    gen = torch.Generator().manual_seed(0)
    host, on_device = CLMLLoss(check_values=False, eigh="host"), CLMLLoss(check_values=False, eigh="device")
    for kind in LABELS:
        z = torch.randn(batch, dim, generator=gen).to(device)
        labels = draw_labels(kind, batch, classes, gen, COCO_2014).to(device)

        def step(loss_fn: CLMLLoss, z: torch.Tensor = z, labels: torch.Tensor = labels) -> None:
            loss_fn(z.detach().requires_grad_(), labels).backward()

        t = paired_seconds(lambda: step(host), lambda: step(on_device), device, repeats)
        result = f"host {1e3 * t.a:.2f} ms, device {1e3 * t.b:.2f} ms, device / host {t.ratio:.2f}"
        row(section, f"{kind} labels, B={batch} D={dim} C={classes}", result)


def run_cuda_tests() -> None:
    tests = ROOT / "tests" / "test_clml_loss.py"
    try:
        import pytest  # noqa: F401
    except ImportError:
        row("CLML on cuda", "tests/test_clml_loss.py -k cuda", "skipped: pytest is not installed")
        return
    if not tests.is_file():
        row("CLML on cuda", "tests/test_clml_loss.py -k cuda", "skipped: no tests/ folder")
        return
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    row("CLML on cuda", "tests/test_clml_loss.py -k cuda", last, "all pass", done.returncode == 0)


def check_step(device: torch.device, arch: str, size: int, batch: int, repeats: int, compile_: bool) -> None:
    section = f"step {arch} {size}px batch {batch}"
    gpu = device.type == "cuda"
    modes = ["plain", "ours"] + (["ours+compile"] if compile_ else [])
    results = {}
    for mode in modes:
        results[mode] = bench(arch, size, batch, device, mode, repeats, 3 if mode == "ours+compile" else 1)
        r = results[mode]
        row(section, f"{mode}: images/s", f"{r['images_per_s']:.1f}")
    best = modes[-1]
    ours = results[best]
    share = ours["clml_s"] / ours["step_s"]
    speedup = results["plain"]["step_s"] / ours["step_s"]
    if gpu:
        row(section, f"CLML share of the {best} step", f"{100 * share:.2f}%", "< 2%", share < 0.02)
        row(section, f"{best} vs plain fp32", f"{speedup:.2f}x", ">= 2.5x", speedup >= 2.5)
    else:  # the targets are for an H100/H200
        row(section, f"CLML share of the {best} step", f"{100 * share:.2f}%")
        row(section, f"{best} vs plain fp32", f"{speedup:.2f}x")


def check_paper_run(device: torch.device, tiny: bool, kill_at: int, epochs: int, workers: int) -> None:
    section = "paper preset, embedded benchmark"
    data = {"dataset": "synthetic", "synthetic_image_size": 32, "workers": workers, "packed_cache": False}
    overrides: dict = {
        "progress": False,
        "device": device.type,
        "checkpoint_every": 25,
        "data": data,
        "model": {"weights": None},
        "optim": {"epochs": epochs, "stop_epoch": 0},
    }
    if tiny:
        data |= {"synthetic_size": "tiny", "image_size": 32}
        overrides["checkpoint_every"] = 4
        overrides["model"] |= {"arch": "smallcnn", "widths": [8, 16], "channels_last": False}
        overrides["optim"] |= {"batch_size": 32, "amp": "off"}
    config = resolve_config("paper", overrides=overrides)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="clml-gpu-check-") as tmp:
        out = Path(tmp) / "run"
        started = time.perf_counter()
        assert train(config, out, max_steps=kill_at) == {}  # stopped as a crash would stop it
        state = checkpoints.read(runfolder.checkpoint_file(out, "last"))
        resumed_from = f"epoch {state['epoch']} step {state['step']}"
        results = train(None, out, resume=True)
        seconds = time.perf_counter() - started
        losses = runfolder.read_metrics(out)["train_loss"].tolist()
    row(section, "stopped after / resumed from", f"{kill_at} steps / {resumed_from}")
    curve = " ".join(f"{v:.4g}" for v in losses)
    row(section, "train loss per epoch", curve, "finite", all(map(math.isfinite, losses)))
    row(section, "test mAP, seconds", f"{results['test_map']:.2f}, {seconds:.0f} s")
    if device.type == "cuda":
        row(section, "peak GPU memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes: checks the script (CPU, CI)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--kill-at", type=int, default=None, help="steps before the simulated crash")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the paper-preset run")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu --tiny to check the script)")
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}, tiny={args.tiny}", flush=True)
    torch.manual_seed(0)
    if args.tiny:
        check_clml(device, 16, 32, 6)
        check_clml_eigh(device, 16, 32, 6, repeats=2)
        check_step(device, "smallcnn", 32, 8, repeats=2, compile_=False)
        check_paper_run(device, True, args.kill_at or 10, args.epochs or 2, workers=0)
    else:
        check_clml(device, 64, 2048, 80)
        check_clml_eigh(device, 64, 2048, 80, repeats=50)
        if device.type == "cuda":
            run_cuda_tests()
        check_step(device, "resnet101", 448, 64, repeats=10, compile_=not args.no_compile)
        # 4000 images / 64 = 62 steps an epoch: 5 epochs are 310 steps.
        check_paper_run(device, False, args.kill_at or 100, args.epochs or 5, workers=8)
    total = time.perf_counter() - started
    width = {key: max(len(key), *(len(r[key]) for r in ROWS)) for key in ROWS[0]}
    print()
    print("| " + " | ".join(key.ljust(width[key]) for key in width) + " |")
    print("|" + "|".join("-" * (width[key] + 2) for key in width) + "|")
    for r in ROWS:
        print("| " + " | ".join(r[key].ljust(width[key]) for key in width) + " |")
    failed = [r for r in ROWS if r["status"] == "FAIL"]
    print(f"\n{len(ROWS)} rows, {len(failed)} failed, {total:.0f} s on {name}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": ROWS}, indent=2))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
