"""The CLML term: a label-structure-preserving low-rank regulariser on the embeddings.

For embeddings Z (B, D) and labels Y (B, C) in {0, 1}::

    loss = lam / B * ( local_weight * sum_k max(delta, ||Z_k||_*)  -  global_weight * ||Z||_* )

where Z_k holds the rows i with Y[i, k] == 1 and ||.||_* is the nuclear norm (sum of singular values). The local
term pulls the images that share a label towards a low-rank subspace; the global term pushes the whole batch towards
a high-rank one. A weight of 0 switches a term off (the ablation).

How it is computed. ||A||_* = tr sqrt(A A^T), so every nuclear norm is taken from one Gram matrix K = Z Z^T (B, B):
the Gram of Z_k is the sub-matrix K[S_k, S_k] over the rows S_k of label k. The sub-matrices are gathered into
batches (m, n, n) (members first, zero padding) and decomposed with batched ``eigh`` in float64, which converges
where float32 ``eigh`` on zero-padded Gram matrices does not. On CPU the labels are bucketed by their count (n up to
the next power of two, a host read that costs nothing there), since eigh costs grow fast with n; on an accelerator
one batch (C, B, B) keeps shapes static so that nothing waits for the device. The cost is then one (B, D) x (D, B)
product and small eigen-decompositions instead of C SVDs of (n_k, D) matrices.

Gradient and subgradient. d tr sqrt(G) / dG = G^{-1/2} / 2, which gives the familiar dZ_k = U V^T of the nuclear
norm. At rank-deficient points (duplicate rows, a label with one zero row, all-zero embeddings) the nuclear norm is
not differentiable; we use the subgradient U_r V_r^T over the singular values above the tolerance
``s_max * max(m * eps, sqrt(m * eps64))`` with m = max(n, D), eps that of float32 or of the input dtype if wider
(NumPy's ``matrix_rank`` rule, floored at what a float64 Gram matrix resolves), and treat the rest as exactly
zero. At Z_k = 0 that subgradient is 0. The authors' release drops singular values under an absolute
1e-6 instead, which depends on the scale of the features.

The backward multiplies by the incoming gradient, so under AMP loss scaling (loss * S) the embedding gradient is
scaled by S as well. The authors' release ignores the incoming gradient, which divides the CLML gradient by S.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


def _eigh(sub: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (m, n) ascending and eigenvectors (m, n, n) of symmetric (m, n, n) matrices."""
    if sub.shape[-1] == 1:
        return sub[..., 0], torch.ones_like(sub)
    return torch.linalg.eigh(sub)


class _TraceSqrtBlocks(torch.autograd.Function):
    """tr sqrt(G[I, I]) of principal sub-matrices of one PSD matrix G, for every row of every index block I.

    ``gram`` is (N, N) float64; each block is an (m, n) index tensor (an index may repeat only as a pointer to an
    all-zero padding row) with its relative singular-value tolerance in ``rtols``. Returns the m_1 + m_2 + ...
    values, in block order.
    """

    @staticmethod
    def forward(ctx, gram: Tensor, rtols: tuple[float, ...], *blocks: Tensor) -> Tensor:
        # A non-finite Gram matrix gives NaN (so a caller's finiteness check sees it) instead of an eigh failure.
        finite = torch.isfinite(gram).all()
        gram = torch.where(finite, gram, torch.zeros_like(gram))
        width = max(idx.shape[1] for idx in blocks)
        evals, evecs = [], []
        for idx in blocks:
            values, vectors = _eigh(gram[idx[:, :, None], idx[:, None, :]])  # (m, n), (m, n, n)
            evals.append(torch.nn.functional.pad(values, (0, width - idx.shape[1])))  # zeros are never kept
            evecs.append(vectors)
        evals = torch.cat(evals)  # (M, width), all blocks at once from here on
        sizes = torch.tensor([idx.shape[0] for idx in blocks], device=gram.device)
        rtol = torch.repeat_interleave(torch.tensor(rtols, dtype=gram.dtype, device=gram.device), sizes)  # (M,)
        tiny = torch.finfo(gram.dtype).tiny
        tol = evals.amax(-1).clamp(min=0) * rtol**2  # (M,): singular-value tolerance, squared
        keep = evals > tol.clamp(min=tiny)[:, None]
        root = torch.where(keep, evals, torch.zeros_like(evals)).sqrt()  # (M, width) singular values
        half_inv_root = torch.where(keep, 0.5 / root.clamp(min=tiny), torch.zeros_like(root))
        ctx.save_for_backward(half_inv_root, *blocks, *evecs)
        ctx.num_blocks, ctx.size = len(blocks), gram.shape[0]
        values = root.sum(-1)
        return torch.where(finite, values, torch.full_like(values, math.nan))

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        half_inv_root, *tensors = ctx.saved_tensors
        blocks, evecs_list = tensors[: ctx.num_blocks], tensors[ctx.num_blocks :]
        scaled = half_inv_root * grad_out[:, None]  # (M, width)
        grad_gram = grad_out.new_zeros(ctx.size, ctx.size)
        offset = 0
        for idx, evecs in zip(blocks, evecs_list):
            m, n = idx.shape
            # d tr sqrt(G) / dG = V diag(1 / (2 sqrt(lambda))) V^T over the kept eigenvalues.
            grad = (evecs * scaled[offset : offset + m, None, :n]) @ evecs.transpose(-1, -2)  # (m, n, n)
            rows, cols = idx[:, :, None].expand_as(grad), idx[:, None, :].expand_as(grad)
            grad_gram.index_put_((rows, cols), grad, accumulate=True)
            offset += m
        return (grad_gram, None, *([None] * ctx.num_blocks))


class _Gram64(torch.autograd.Function):
    """K = Z Z^T (B, B) in float64, with a one-product backward dZ = (dK + dK^T) Z in at least float32.

    The eigenvalues need the float64 Gram; the gradient only needs the precision of the embeddings it flows into.
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        z64 = z.double()
        return z64 @ z64.T

    @staticmethod
    def backward(ctx, grad_gram: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        work = torch.promote_types(z.dtype, torch.float32)
        return ((grad_gram + grad_gram.T).to(work) @ z.to(work)).to(z.dtype)


def _rtol(embeddings: Tensor, n: int) -> float:
    """Relative singular-value tolerance: NumPy's matrix_rank rule at the input precision, and never below what
    a float64 Gram matrix resolves (its eigenvalues carry an error of about n * eps64 * lambda_max)."""
    size = max(n, embeddings.shape[1])
    eps = torch.finfo(torch.promote_types(embeddings.dtype, torch.float32)).eps
    return max(size * eps, (size * torch.finfo(torch.float64).eps) ** 0.5)


def _group_blocks(members: Tensor, group_size: int | None) -> list[tuple[Tensor, Tensor]]:
    """(class ids (m,), row indices (m, n)) of the label groups, rows first and then B (the zero padding row).

    With ``group_size`` None on CPU the classes are bucketed by their count (n rounded up to a power of two, empty
    labels left out), since eigh costs grow fast with n; this reads the counts on the host, free on a CPU.
    Otherwise one block holds every class, padded to ``group_size`` (B on an accelerator: static shapes, no device
    synchronisation).
    """
    classes, batch = members.shape
    counts = members.sum(1)  # (C,)
    slot = torch.where(members, members.cumsum(1) - 1, batch)  # (C, B); non-members go to the dropped column B
    rows = torch.arange(batch, device=members.device).expand_as(slot)
    order = torch.full((classes, batch + 1), batch, dtype=torch.long, device=members.device)
    order = order.scatter(1, slot, rows)[:, :batch]  # (C, B): each label's rows, then padding
    ids = torch.arange(classes, device=members.device)
    if group_size is not None or members.device.type != "cpu":
        n = max(1, min(group_size or batch, batch))
        return [(ids, order[:, :n])]
    level = torch.where(counts > 0, torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), -1)  # (C,)
    by_level = torch.argsort(level, stable=True)
    levels, sizes = torch.unique_consecutive(level[by_level], return_counts=True)
    blocks = []
    for lvl, chosen in zip(levels.tolist(), torch.split(by_level, sizes.tolist())):  # at most log2(B) + 2 buckets
        if lvl >= 0:
            blocks.append((chosen, order[chosen, : int(counts[chosen].max())]))
    return blocks


def _nuclear_norms(
    embeddings: Tensor, labels: Tensor | None, group_size: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """||Z||_* (0-dim) and, with labels, ||Z_k||_* (C,), all float64, from one Gram matrix and one Function."""
    batch = embeddings.shape[0]
    gram = torch.nn.functional.pad(_Gram64.apply(embeddings), (0, 1, 0, 1))  # (B + 1, B + 1), zero last row
    blocks = [(None, torch.arange(batch, device=embeddings.device)[None])]
    if labels is not None:
        blocks += _group_blocks(labels.T, group_size)
    rtols = tuple(_rtol(embeddings, idx.shape[1]) for _, idx in blocks)
    values = _TraceSqrtBlocks.apply(gram, rtols, *(idx for _, idx in blocks))
    if labels is None:
        return values[0], None
    norms = values.new_zeros(labels.shape[1])
    if len(blocks) > 1:
        ids = torch.cat([ids for ids, _ in blocks[1:]])
        norms = norms.index_put((ids,), values[1:])
    return values[0], norms


def nuclear_norm(embeddings: Tensor) -> Tensor:
    """Nuclear norm ||Z||_* of a (B, D) matrix as a 0-dim float64 tensor (see the module docstring)."""
    return _nuclear_norms(embeddings, None)[0]


def group_nuclear_norms(embeddings: Tensor, labels: Tensor, group_size: int | None = None) -> Tensor:
    """Nuclear norms ||Z_k||_* of the row groups of every label.

    Args:
        embeddings: (B, D) floating point.
        labels: (B, C) bool, rows i with labels[i, k] form group k.
        group_size: padding size n of one block of per-label Gram matrices, at least the largest label count. None
            buckets the labels by count on CPU (a host read) and uses n = B elsewhere (static shapes, no device
            synchronisation).

    Returns:
        (C,) float64; 0 for a label with no rows.
    """
    return _nuclear_norms(embeddings, labels, group_size)[1]


class CLMLTerms(NamedTuple):
    """The CLML loss and its two terms (weighted, before lam / B) for logging; all 0-dim tensors."""

    loss: Tensor
    local: Tensor
    global_: Tensor


def _validate(embeddings: Tensor, labels: Tensor, check_values: bool) -> None:
    if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("CLMLLoss: embeddings and labels must be torch tensors")
    if embeddings.dim() != 2:
        raise ValueError(f"CLMLLoss: embeddings must be 2-D (B, D), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 2:
        raise ValueError(f"CLMLLoss: labels must be 2-D (B, C), got shape {tuple(labels.shape)}")
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"CLMLLoss: embeddings have batch size {embeddings.shape[0]} but labels have {labels.shape[0]}"
        )
    if embeddings.shape[0] == 0:
        raise ValueError("CLMLLoss: empty batch (B = 0)")
    if not embeddings.is_floating_point():
        raise ValueError(f"CLMLLoss: embeddings must be floating point, got {embeddings.dtype}")
    if check_values:
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("CLMLLoss: embeddings contain NaN or Inf")
        if labels.dtype != torch.bool and not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("CLMLLoss: labels must be in {0, 1}")


class CLMLLoss(nn.Module):
    """Label-structure-preserving contrastive term of CLML (Ma et al., arXiv 2209.01314).

    ``loss = lam / B * (local_weight * sum_k max(delta, ||Z_k||_*) - global_weight * ||Z||_*)``

    Add it to a base multi-label loss. The authors sum their base losses over batch x classes; with that reduction
    ``lam = 1`` means what it meant in the paper.

    Args:
        lam: weight of the whole term.
        delta: floor of each per-label nuclear norm; a label with no rows contributes delta with no gradient.
        local_weight: weight of the per-label low-rank pull (0 switches it off).
        global_weight: weight of the whole-batch high-rank push (0 switches it off).
        check_values: check that embeddings are finite and labels in {0, 1}. This reads tensor values, one device
            synchronisation per call on an accelerator; the training engine turns it off there.

    Example:
        >>> z = torch.randn(4, 8, requires_grad=True)
        >>> y = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
        >>> CLMLLoss(lam=1.0)(z, y).backward()
    """

    def __init__(
        self,
        lam: float = 1.0,
        delta: float = 1.0,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("lam", lam), ("delta", delta), ("local_weight", local_weight)):
            if not value >= 0:
                raise ValueError(f"CLMLLoss: {name} must be >= 0, got {value}")
        if not global_weight >= 0:
            raise ValueError(f"CLMLLoss: global_weight must be >= 0, got {global_weight}")
        self.lam = lam
        self.delta = delta
        self.local_weight = local_weight
        self.global_weight = global_weight
        self.check_values = check_values

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, delta={self.delta}, local_weight={self.local_weight}, global_weight={self.global_weight}"
        )

    def terms(self, embeddings: Tensor, labels: Tensor) -> CLMLTerms:
        """The loss and its weighted local and global terms, computed once.

        Args:
            embeddings: (B, D) floating point.
            labels: (B, C) in {0, 1}, bool, integer or floating point.

        Returns:
            CLMLTerms(loss, local, global_) in the dtype of ``embeddings`` (float32 under autocast).
        """
        _validate(embeddings, labels, self.check_values)
        out_dtype = torch.promote_types(embeddings.dtype, torch.float32)
        zero = embeddings.new_zeros((), dtype=torch.float64)
        with torch.autocast(embeddings.device.type, enabled=False):
            norm, norms = _nuclear_norms(embeddings, labels.bool() if self.local_weight else None)
            local = self.local_weight * norms.clamp(min=self.delta).sum() if self.local_weight else zero
            global_ = self.global_weight * norm  # also at weight 0: keeps the loss attached to the graph
            loss = self.lam / embeddings.shape[0] * (local - global_)
        return CLMLTerms(loss.to(out_dtype), local.to(out_dtype), global_.to(out_dtype))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """CLML loss (0-dim) for embeddings (B, D) and labels (B, C); see :meth:`terms`."""
        return self.terms(embeddings, labels).loss


def clml_loss_reference(
    embeddings: Tensor,
    labels: Tensor,
    lam: float = 1.0,
    delta: float = 1.0,
    local_weight: float = 1.0,
    global_weight: float = 1.0,
) -> Tensor:
    """The slow, obvious CLML loss: one SVD per label in a Python loop. For tests and benchmarks only.

    Runs in the dtype of ``embeddings`` (use float64 for a reference). A label with no rows contributes delta.
    """
    local = embeddings.new_zeros(())
    for k in range(labels.shape[1]):
        rows = embeddings[labels[:, k].bool()]
        norm = torch.linalg.svdvals(rows).sum() if rows.shape[0] else embeddings.new_zeros(())
        local = local + torch.clamp(norm, min=delta)
    global_ = torch.linalg.svdvals(embeddings).sum()
    return lam / embeddings.shape[0] * (local_weight * local - global_weight * global_)
