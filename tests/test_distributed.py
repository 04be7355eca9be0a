"""DDP with the gathered CLML term equals the single-process run on the concatenated batch (gloo, 2 CPU ranks)."""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from clml_core import distributed
from clml_core.losses import CLMLLoss
from clml_core.models import MultiLabelNet

WORLD = 2
N, D_IN, EMBED, CLASSES = 8, 5, 4, 3
# Rows per rank in each case; the unequal case checks the padding path of the gather.
# "known": the caller promises equal sizes, so the gather skips its all-gather of the sizes.
SPLITS = {"sum_equal": (4, 4), "mean_equal": (4, 4), "sum_unequal": (3, 5), "sum_equal_known": (4, 4)}
TIMEOUT_S = 120


def _problem() -> tuple[MultiLabelNet, Tensor, Tensor]:
    """A tiny float64 MultiLabelNet (Linear-Tanh backbone, no head), inputs X (N, D_IN) and labels Y (N, C)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MultiLabelNet(nn.Sequential(nn.Linear(D_IN, EMBED), nn.Tanh()), EMBED, CLASSES).double()
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    y = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]])
    return model, x, y.bool()


CLML = CLMLLoss(lam=1.0, delta=0.5)


def _loss(case: str, logits: Tensor, labels: Tensor, embeddings: Tensor, all_labels: Tensor, world: int) -> Tensor:
    """Per-rank loss under the documented convention (its mean over ranks is the single-process loss)."""
    target = labels.double()
    if case.startswith("sum"):
        base = world * bce(logits, target, reduction="sum")
    else:
        base = bce(logits, target, reduction="mean")
    return base + CLML(embeddings, all_labels)


def _worker(rank: int, out_dir: str) -> None:
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    info = distributed.setup_from_env("gloo")
    assert (info.rank, info.world_size, distributed.is_main_process()) == (rank, WORLD, rank == 0)
    results = {}
    try:
        for case, split in SPLITS.items():
            model, x, y = _problem()
            ddp = nn.parallel.DistributedDataParallel(model)
            lo = sum(split[:rank])
            x_local, y_local = x[lo : lo + split[rank]], y[lo : lo + split[rank]]
            out = ddp(x_local)
            known = case.endswith("known")
            embeddings = distributed.gather_with_grad(out.embeddings, equal_sizes=known)  # (N, EMBED)
            labels = distributed.gather_no_grad(y_local, equal_sizes=known)  # (N, C) bool
            loss = _loss(case, out.logits, y_local, embeddings, labels, distributed.world_size())
            loss.backward()
            results[case] = {
                "loss": loss.detach(),
                "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
                "embeddings": embeddings.detach(),
                "labels": labels,
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


def _nan_worker(rank: int, out_dir: str) -> None:
    """Train the smoke preset on two ranks; rank 1's base loss (not the shared CLML term) turns NaN at its first
    step of epoch 1, so rank 0's own loss of that step is finite."""
    from clml_core import engine
    from clml_core.config import resolve_config

    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    distributed.setup_from_env("gloo")
    original = engine.Trainer._train_step

    def poisoned(self, images, observed, index):
        if rank == 1 and self.epoch == 1 and not hasattr(self, "clean_base"):
            self.clean_base = self.objective.base_loss.forward
            self.objective.base_loss.forward = lambda *args, **kwargs: self.clean_base(*args, **kwargs) * float("nan")
        return original(self, images, observed, index)

    engine.Trainer._train_step = poisoned
    overrides = {"progress": False, "threads": 1, "log_every": 1, "data": {"limit_train": 128}, "optim": {"epochs": 2}}
    try:
        engine.train(resolve_config("smoke", overrides=overrides), Path(out_dir) / "run")
        message = "finished"
    except engine.NonFiniteLossError as error:
        message = str(error)
    finally:
        distributed.cleanup()
    (Path(out_dir) / f"rank{rank}.txt").write_text(message)


def _spawn(worker, out_dir: Path) -> None:
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even where a GPU exists
    }
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    with pytest.MonkeyPatch.context() as mp_env:
        for key, value in env.items():
            mp_env.setenv(key, value)
        context = mp.spawn(worker, args=(str(out_dir),), nprocs=WORLD, join=False)
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")


def _first_worker(rank: int, out_dir: str) -> None:
    """Each rank logs when it enters and leaves a rank_zero_first block; rank 0 dawdles inside."""
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    distributed.setup_from_env("gloo")
    log = Path(out_dir) / f"rank{rank}.txt"
    try:
        with distributed.rank_zero_first():
            entered = time.time()
            if rank == 0:
                time.sleep(1.0)  # building the cache
            log.write_text(f"{entered} {time.time()}")
    finally:
        distributed.cleanup()


def test_rank_zero_first_runs_the_block_on_rank_zero_before_the_others(tmp_path: Path) -> None:
    _spawn(_first_worker, tmp_path)
    zero = [float(v) for v in (tmp_path / "rank0.txt").read_text().split()]
    one = [float(v) for v in (tmp_path / "rank1.txt").read_text().split()]
    assert one[0] >= zero[1]  # rank 1 entered only after rank 0 had left


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_message(tmp_path: Path) -> None:
    _spawn(_nan_worker, tmp_path)
    own, other = (tmp_path / "rank1.txt").read_text(), (tmp_path / "rank0.txt").read_text()
    assert own.startswith("loss is nan at epoch 1 step 0 (base nan") and "last good checkpoint" in own
    assert other.startswith("loss is not finite on another rank in epoch 1") and "last good checkpoint" in other
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 0)  # the epoch-0 checkpoint, written before the NaN


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, out_dir)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(case: str) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    model, x, y = _problem()
    out = model(x)
    target = y.double()
    base = bce(out.logits, target, reduction="sum" if case.startswith("sum") else "mean")
    loss = base + CLML(out.embeddings, y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, out.embeddings.detach()


@pytest.mark.parametrize("case", list(SPLITS))
def test_ddp_matches_single_process(ddp_results: list[dict], case: str) -> None:
    loss_ref, grads_ref, embeddings_ref = _single_process(case)
    ranks = [r[case] for r in ddp_results]
    # The gathered tensors are the concatenation in rank order.
    _, _, y = _problem()
    for r in ranks:
        torch.testing.assert_close(r["embeddings"], embeddings_ref, rtol=0, atol=1e-12)
        assert torch.equal(r["labels"], y) and r["labels"].dtype == torch.bool
    # The all-reduced mean of the per-rank losses is the single-process loss.
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, loss_ref, rtol=1e-12, atol=1e-12)
    # After DDP's averaging every rank holds the single-process gradient.
    for r in ranks:
        assert r["grads"].keys() == grads_ref.keys()
        for name, grad in grads_ref.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_clml_gradient_is_not_negligible() -> None:
    """Guards the test above: a wrong factor on the CLML gradient would show at float64 tolerance."""
    model, x, y = _problem()
    CLML(model(x).embeddings, y).backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert norm > 1e-2


def test_single_process_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    gathered = distributed.gather_no_grad(x)
    assert not gathered.requires_grad and torch.equal(gathered, x)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.setup_from_env()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0) and not distributed.is_distributed()
    distributed.cleanup()  # a no-op without a process group


def test_world_size_one_process_group_is_identity() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed.is_distributed() and distributed.world_size() == 1
        x = torch.randn(3, 2, requires_grad=True)
        assert distributed.gather_with_grad(x) is x
    finally:
        distributed.cleanup()
    assert not distributed.is_distributed()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
        ({"WORLD_SIZE": "2"}, "RANK=None"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ],
)
def test_setup_from_env_rejects_bad_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], match: str
) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        distributed.setup_from_env()


def test_gather_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        distributed.gather_with_grad([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0-dim"):
        distributed.gather_no_grad(torch.tensor(1.0))
