"""DistributedDataParallel support: process-group set-up and an all-gather that keeps gradients.

The CLML term needs the nuclear norms of the GLOBAL batch, so each rank gathers every rank's embeddings with
:func:`gather_with_grad` and the labels with :func:`gather_no_grad`, and computes the same CLML value.

Gradient convention (proved in ``tests/test_distributed.py``). With W ranks, DDP averages parameter gradients:
``g = (1/W) sum_r dL_r/dtheta``. The backward of :func:`gather_with_grad` all-reduces (sums) the incoming gradient
over ranks and returns this rank's slice. Every rank computes the same gathered-batch term T(Z), so rank r receives
``W * dT/dZ_r`` for its slice, and after DDP's averaging the parameter gradient is exactly ``dT/dtheta`` of the
single-process run on the concatenated batch. The rule for the whole per-rank loss is therefore:

    **each rank's loss must be a quantity whose average over ranks is the single-process loss.**

- A term on gathered tensors (the CLML term, with B = global batch size) already is: use it unchanged.
- A base loss reduced by a mean over the local batch is, when all ranks have the same batch size.
- A base loss reduced by a sum over the local batch (the authors' convention: sum over batch x classes) is not:
  multiply it by ``world_size()``. Then ``mean_r(W * sum_local) = sum_global`` also for unequal batch sizes.

The logged loss value of the single-process run is the all-reduced mean of the per-rank losses.

Batch sizes may differ between ranks (the gather pads to the largest and trims); this costs one extra all-gather of
the sizes per call, skipped with ``equal_sizes=True`` (the training engine's batches are equal by construction).
The backward all-reduces the full (N, ...) gradient rather than reduce-scattering it, which works on every backend
(gloo has no reduce-scatter) at W times the traffic of the embeddings, small next to DDP's gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class DistInfo(NamedTuple):
    """Where this process sits: its global rank, the world size, its local rank and the device to use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return rank() == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def setup_from_env(backend: str | None = None) -> DistInfo:
    """Initialise the default process group from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without WORLD_SIZE, or with WORLD_SIZE=1, nothing is initialised and the process runs alone. The backend
    defaults to nccl when CUDA is available and gloo otherwise; on CUDA the process uses device ``cuda:LOCAL_RANK``.
    MASTER_ADDR and MASTER_PORT (set by torchrun) give the rendezvous address.

    Args:
        backend: process-group backend, None to choose as above.

    Returns:
        This process's :class:`DistInfo`.
    """
    world = _env_int("WORLD_SIZE")
    cuda = torch.cuda.is_available()
    if world is None or world == 1:
        return DistInfo(0, 1, 0, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world}: expected >= 1")
    global_rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if global_rank is None or not 0 <= global_rank < world:
        raise ValueError(f"environment variable RANK={global_rank}: expected an integer in [0, WORLD_SIZE={world})")
    local_rank = global_rank if local_rank is None else local_rank
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set (torchrun sets it; launch with torchrun)")
    if cuda:
        if not 0 <= local_rank < torch.cuda.device_count():
            raise ValueError(
                f"environment variable LOCAL_RANK={local_rank}: only {torch.cuda.device_count()} CUDA devices"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"), init_method="env://", rank=global_rank, world_size=world
        )
    return DistInfo(global_rank, world, local_rank, device)


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (for building a shared cache once).

    The other ranks wait at a barrier until rank 0 has finished the block, so they find its result on disk. A
    no-op without a process group.
    """
    if not is_distributed():
        yield
        return
    if rank() != 0:
        dist.barrier()
    yield
    if rank() == 0:
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    if is_distributed():
        dist.destroy_process_group()


def _gather_sizes(x: Tensor) -> list[int]:
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _sizes(x: Tensor, equal: bool) -> list[int]:
    return [x.shape[0]] * dist.get_world_size() if equal else _gather_sizes(x)


def _all_gather(x: Tensor, sizes: list[int]) -> Tensor:
    x = x.contiguous()
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, equal_sizes: bool) -> Tensor:
        sizes = _sizes(x, equal_sizes)
        ctx.start = sum(sizes[: dist.get_rank()])
        ctx.size = x.shape[0]
        return _all_gather(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank holds a copy of the loss; the gradient of its slice is the sum over all copies.
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.size], None


def _check(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("cannot gather a 0-dim tensor along dim 0; expected shape (B, ...)")


def gather_with_grad(x: Tensor, *, equal_sizes: bool = False) -> Tensor:
    """All-gather along dim 0, in rank order, with gradients flowing back to each rank's slice.

    Identity without a process group or with one process. See the module docstring for the gradient convention:
    the backward sums the gradient over ranks, so with DDP's averaging a term computed identically on every rank
    from the gathered tensor gets the single-process gradient.

    Args:
        x: (B_r, ...) this rank's tensor; B_r may differ between ranks, the trailing shape and dtype may not.
        equal_sizes: the caller guarantees every rank has the same B_r, so the all-gather of the sizes (a
            collective and a host read) is skipped.

    Returns:
        (sum_r B_r, ...) the concatenation over ranks 0..W-1.
    """
    _check(x)
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, equal_sizes)


def gather_no_grad(x: Tensor, *, equal_sizes: bool = False) -> Tensor:
    """All-gather along dim 0, in rank order, detached (for labels and logging).

    Args:
        x: (B_r, ...) this rank's tensor of any dtype (bool is sent as uint8).
        equal_sizes: every rank has the same B_r (see :func:`gather_with_grad`).

    Returns:
        (sum_r B_r, ...) the concatenation over ranks, without gradient.
    """
    _check(x)
    if world_size() == 1:
        return x.detach()
    with torch.no_grad():
        if x.dtype == torch.bool:
            return _all_gather(x.to(torch.uint8), _sizes(x, equal_sizes)).bool()
        return _all_gather(x.detach(), _sizes(x, equal_sizes))
