"""The CLML term: a label-structure-preserving low-rank regulariser on the embeddings.

For embeddings Z (B, D) and labels Y (B, C) in {0, 1}::

    loss = lam / B * ( local_weight * sum_k max(delta, ||Z_k||_*)  -  global_weight * ||Z||_* )

where Z_k holds the rows i with Y[i, k] == 1 and ||.||_* is the nuclear norm (sum of singular values). The local
term pulls the images that share a label towards a low-rank subspace; the global term pushes the whole batch towards
a high-rank one. A weight of 0 switches a term off (the ablation).

How it is computed. ||A||_* = tr sqrt(A A^T), so every nuclear norm is taken from one Gram matrix K = Z Z^T (B, B):
the Gram of Z_k is the sub-matrix K[S_k, S_k] over the rows S_k of label k. The sub-matrices are gathered into a
batch (C, n, n) (members first, zero padding) and decomposed with one batched ``eigh`` in float64, which converges
where float32 ``eigh`` on zero-padded Gram matrices does not. On CPU n is the largest label count in the batch (a
host read, which costs nothing there); on an accelerator n = B so that shapes are static and nothing waits for the
device. The cost is then one (B, D) x (D, B) product and C small eigen-decompositions instead of C SVDs of (n_k, D)
matrices.

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


class _TraceSqrtPSD(torch.autograd.Function):
    """tr sqrt(G) for a batch of symmetric PSD matrices G (..., n, n), differentiable, in float64."""

    @staticmethod
    def forward(ctx, gram: Tensor, rtol: float) -> Tensor:
        # A non-finite matrix gives NaN (so a caller's finiteness check sees it) instead of an eigh failure.
        finite = torch.isfinite(gram).flatten(-2).all(-1)  # (...,)
        gram = torch.where(finite[..., None, None], gram, torch.zeros_like(gram))
        evals, evecs = torch.linalg.eigh(gram)  # (..., n), (..., n, n); ascending
        tol = evals[..., -1:].clamp(min=0) * rtol**2  # (..., 1): singular-value tolerance, squared
        keep = evals > tol.clamp(min=torch.finfo(gram.dtype).tiny)
        root = torch.where(keep, evals, torch.zeros_like(evals)).sqrt()  # (..., n) singular values
        ctx.save_for_backward(evecs, torch.where(keep, 0.5 / root.clamp(min=torch.finfo(gram.dtype).tiny), 0.0))
        return torch.where(finite, root.sum(-1), torch.full_like(root[..., 0], math.nan))

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        evecs, half_inv_root = ctx.saved_tensors
        # d tr sqrt(G) / dG = V diag(1 / (2 sqrt(lambda))) V^T over the kept eigenvalues.
        grad = (evecs * half_inv_root.unsqueeze(-2)) @ evecs.transpose(-1, -2)  # (..., n, n)
        return grad_out[..., None, None] * grad, None


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


def _gram64(embeddings: Tensor) -> Tensor:
    return _Gram64.apply(embeddings)  # (B, B) float64


def _nuclear_norm_from_gram(gram: Tensor, embeddings: Tensor) -> Tensor:
    return _TraceSqrtPSD.apply(gram.unsqueeze(0), _rtol(embeddings, gram.shape[0]))[0]


def _group_nuclear_norms_from_gram(gram: Tensor, embeddings: Tensor, labels: Tensor, group_size: int | None) -> Tensor:
    batch = gram.shape[0]
    members = labels.T  # (C, B) bool
    if group_size is None:
        group_size = int(members.sum(1).max()) if gram.device.type == "cpu" else batch
    n = max(1, min(group_size, batch))
    # order[k] lists the rows of label k, then the index B of an all-zero padding row.
    slot = torch.where(members, members.cumsum(1) - 1, n)  # (C, B); non-members go to the dropped column n
    rows = torch.arange(batch, device=gram.device).expand_as(slot)
    order = torch.full((members.shape[0], n + 1), batch, dtype=torch.long, device=gram.device)
    order = order.scatter(1, slot, rows)[:, :n]  # (C, n)
    padded = torch.nn.functional.pad(gram, (0, 1, 0, 1))  # (B + 1, B + 1)
    sub = padded[order[:, :, None], order[:, None, :]]  # (C, n, n), zero outside the label's rows
    return _TraceSqrtPSD.apply(sub, _rtol(embeddings, n))


def nuclear_norm(embeddings: Tensor) -> Tensor:
    """Nuclear norm ||Z||_* of a (B, D) matrix as a 0-dim float64 tensor (see the module docstring)."""
    return _nuclear_norm_from_gram(_gram64(embeddings), embeddings)


def group_nuclear_norms(embeddings: Tensor, labels: Tensor, group_size: int | None = None) -> Tensor:
    """Nuclear norms ||Z_k||_* of the row groups of every label, in one batched decomposition.

    Args:
        embeddings: (B, D) floating point.
        labels: (B, C) bool, rows i with labels[i, k] form group k.
        group_size: padding size n of the per-label Gram matrices, at least the largest label count. None picks the
            largest count on CPU (a host read) and B elsewhere (static shapes, no device synchronisation).

    Returns:
        (C,) float64; 0 for a label with no rows.
    """
    return _group_nuclear_norms_from_gram(_gram64(embeddings), embeddings, labels, group_size)


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
            gram = _gram64(embeddings)
            local = zero
            if self.local_weight:
                norms = _group_nuclear_norms_from_gram(gram, embeddings, labels.bool(), None)
                local = self.local_weight * norms.clamp(min=self.delta).sum()
            global_ = zero
            if self.global_weight:
                global_ = self.global_weight * _nuclear_norm_from_gram(gram, embeddings)
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
