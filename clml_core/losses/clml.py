"""The CLML term: a label-structure-preserving low-rank regulariser on the embeddings.

For embeddings Z (B, D) and labels Y (B, C) in {0, 1}::

    loss = lam / B * ( local_weight * sum_k max(delta, ||Z_k||_*)  -  global_weight * ||Z||_* )

where Z_k holds the rows i with Y[i, k] == 1 and ||.||_* is the nuclear norm (sum of singular values). The local
term pulls the images that share a label towards a low-rank subspace; the global term pushes the whole batch towards
a high-rank one. A weight of 0 switches a term off (the ablation).

How it is computed. ||A||_* = tr sqrt(A A^T), so every nuclear norm is taken from one Gram matrix K = Z Z^T (B, B):
the Gram of Z_k is the sub-matrix K[S_k, S_k] over the rows S_k of label k. The labels are sorted and bucketed by
their count (n up to the next power of two), since eigh costs grow fast with n; each bucket's sub-matrices are
gathered in one indexing operation into a block (m, n, n) (members first, zero padding), n the bucket's largest
count, and decomposed with batched ``eigh`` in float64, which converges where float32 ``eigh`` on zero-padded Gram
matrices does not. Bucketing reads the labels on the host: free on a CPU; on CUDA ``torch.linalg.eigh`` synchronises
with the host anyway (as PyTorch documents), and its batched solver is used only up to n = 32 (pytorch/pytorch#175585).
There ``CLMLLoss(eigh="host")`` copies the (B, B) Gram matrix to the host for the decompositions and the (B, B)
gradient of K back; ``"device"`` keeps them on the device (neither was timed: no GPU was available;
``benchmarks/bench_clml_loss.py --device cuda --eigh host|device`` compares them). The cost is then one (B, D) x
(D, B) product and small eigen-decompositions instead of C SVDs of (n_k, D) matrices, in one autograd node (the
loss's constants included; the loss and its terms are assembled on the host from the 1 + C' norms) whose backward is
one (B, B) x (B, D) product. On the CPU the float64 copy of Z and that product live in per-thread buffers
(``_Workspace``): fresh ones cost page faults on every call.

Gradient and subgradient. d tr sqrt(G) / dG = G^{-1/2} / 2, which gives the familiar dZ_k = U V^T of the nuclear
norm. At rank-deficient points (duplicate rows, a label with one zero row, all-zero embeddings) the nuclear norm is
not differentiable; we use the subgradient U_r V_r^T over the singular values above the tolerance
``s_max * sqrt(m * eps64)`` with m = max(B, D): the eigenvalues of a float64 Gram matrix carry an error of about
``m * eps64 * s_max^2``, and what is below it is treated as exactly zero. At Z_k = 0 that subgradient is 0. The
tolerance does not depend on the input dtype: float32 (or bfloat16) embeddings are exact float64 numbers, so a
float32 batch is resolved as far as a float64 one, down to about 1e-6 * s_max (a spectrum over 6 decades). The
backward product is taken in float64 as well: dK carries 1 / s for the smallest kept singular values and its product
with Z cancels down to U V^T, which float32 (or TF32, which does not touch float64) would lose. The authors' release
drops singular values under an absolute 1e-6 instead, which depends on the scale of the features.

Second derivatives are not implemented: a backward with ``create_graph=True`` (the first step of a Hessian-vector
product) raises a RuntimeError. It raises at once rather than when the gradient is differentiated again, because a
gradient that also depends on other terms (a base loss) would otherwise carry them alone, silently.

The backward multiplies by the incoming gradient, so under AMP loss scaling (loss * S) the embedding gradient is
scaled by S as well. The authors' release ignores the incoming gradient, which divides the CLML gradient by S.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn


def _eigh(sub: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (..., n) ascending and eigenvectors (..., n, n) of symmetric (..., n, n) matrices."""
    if sub.shape[-1] == 1:
        return sub[..., 0], torch.ones_like(sub)
    return torch.linalg.eigh(sub)


class _Groups(NamedTuple):
    """The label groups of one batch as blocks of sub-matrices of the Gram matrix K = Z Z^T.

    ``spans`` cuts the labels ``classes`` (C',) into blocks ``(start, stop, n)`` whose n x n sub-matrices are
    decomposed together. ``index`` holds, block after block, the flat positions of those sub-matrices in K padded
    with a zero last row and column (position B pads a label with fewer than n rows); labels not in ``classes`` have
    no rows.
    """

    classes: Tensor
    index: Tensor
    spans: tuple[tuple[int, int, int], ...]


def _label_groups(members: Tensor, group_size: int | None, device: torch.device | None = None) -> _Groups:
    """Index blocks of the label groups of ``members`` (C, B) bool, the index on ``device`` (where the Gram
    matrix is decomposed; that of ``members`` by default).

    With ``group_size`` None the labels are sorted by count, those without rows are left out and the rest are
    bucketed by count rounded up to a power of two, each block as wide as its largest label. This is bookkeeping on
    a (C, B) bool matrix, done with NumPy on the host (a copy of the labels: a synchronisation on an accelerator,
    where ``eigh`` synchronises anyway). Otherwise one block holds every label, padded to ``group_size``: static
    shapes, no host read.
    """
    classes, batch = members.shape
    if group_size is not None:
        width = max(1, min(group_size, batch))
        if members.device.type == "cpu" and classes and int(members.sum(1).max()) > width:  # free to check on CPU
            raise ValueError(f"group_size {group_size} is smaller than the largest label count")
        rows = torch.where(members, torch.arange(batch, device=members.device), batch)  # (C, B): row i or padding B
        rows = rows.topk(width, largest=False).values  # (C, w): the label's rows first, then padding
        pairs = rows[:, :, None] * (batch + 1) + rows[:, None, :]  # (C, w, w) flat positions in the padded K
        labels = torch.arange(classes, device=members.device)
        return _Groups(labels, pairs.view(-1).to(device or members.device), ((0, classes, width),))
    held = members.cpu().numpy()
    counts = held.sum(1)
    labels = np.argsort(counts, kind="stable")
    counts = counts[labels]
    bounds = [int(np.searchsorted(counts, 0, side="right"))]  # labels without rows are left out
    while bounds[-1] < classes:  # one block per power of two from 2 on: at most log2(B) blocks
        top = max(2, 1 << (int(counts[bounds[-1]]) - 1).bit_length())
        bounds.append(int(np.searchsorted(counts, top, side="right")))
    start = bounds[0]
    spans = tuple((a - start, b - start, int(counts[b - 1])) for a, b in zip(bounds, bounds[1:]))
    labels, counts = labels[start:], counts[start:]
    label, row = np.nonzero(held[labels])  # the rows of every label, label after label
    rows = np.full((len(labels), max(1, counts[-1] if len(counts) else 0)), batch)  # (C', w), padding row B
    rows[label, np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)] = row  # the label's rows first
    # Per block, the flat positions of its (n, n) sub-matrices in the padded K.
    pairs = [(rows[a:b, :n, None] * (batch + 1) + rows[a:b, None, :n]).reshape(-1) for a, b, n in spans]
    index = np.concatenate(pairs or [np.zeros(0, np.int64)])
    return _Groups(
        torch.from_numpy(labels).to(members.device), torch.from_numpy(index).to(device or members.device), spans
    )


class _Workspace(threading.local):
    """Per-thread float64 buffers on the CPU: ``copy`` for the float64 copy of the embeddings, ``product`` for the
    float64 product of the backward.

    A fresh B x D float64 tensor per call costs more there than the products it feeds: glibc returns blocks of that
    size to the system when they are freed and the next call page-faults them back in (about 600 minor faults, 0.9 of
    2.9 ms per forward + backward at B = 64, D = 2048, ``benchmarks/bench_clml_loss.py``). The copy is marked with
    the token of the call that wrote it, so that this call's backward reuses it when no other call has written since
    (the usual forward, backward, forward, ...) and copies again otherwise. Nothing returned is a buffer. Each keeps
    the largest size asked for. On an accelerator the caching allocator reuses memory already, and this is not used.
    """

    def __init__(self) -> None:
        self.copy = torch.empty(0, dtype=torch.float64)
        self.product = torch.empty(0, dtype=torch.float64)
        self.holder: object | None = None  # the token of the call whose embeddings ``copy`` holds

    def float64(self, z: Tensor, token: object) -> Tensor:
        """The float64 copy of the CPU tensor ``z`` (B, D) for the call ``token``."""
        size = z.numel()
        if self.copy.numel() < size:
            self.copy, self.holder = torch.empty(size, dtype=torch.float64), None
        copy = self.copy[:size].view(z.shape)
        if self.holder is not token:
            copy.copy_(z)
            self.holder = token
        return copy

    def product_buffer(self, rows: int, cols: int) -> Tensor:
        if self.product.numel() < rows * cols:
            self.product = torch.empty(rows * cols, dtype=torch.float64)
        return self.product[: rows * cols].view(rows, cols)


_WORKSPACE = _Workspace()


def _float64(z: Tensor, token: object) -> Tensor:
    """``z`` in float64: itself, or a copy (on the CPU, the workspace's for the call ``token``)."""
    if z.dtype == torch.float64:
        return z
    if z.device.type != "cpu":
        return z.double()
    return _WORKSPACE.float64(z, token)


def _norms_forward(z: Tensor, groups: _Groups | None, host: bool, token: object) -> tuple[Tensor, tuple[Tensor, ...]]:
    """||Z||_* and the norms ||Z_k||_* of the labels of ``groups.classes`` as one float64 vector (1 + C',), from one
    float64 Gram matrix K = Z Z^T, and the tensors their backward needs besides Z (all on the host with ``host``).

    The Gram matrix of Z_k is K[S_k, S_k]; ||Z_k||_* = tr sqrt(K[S_k, S_k]) is the sum of the square roots of its
    kept eigenvalues.
    """
    batch, dim = z.shape
    z64 = _float64(z, token)  # autocast leaves float64 alone, so everything below runs in float64 under it too
    gram = z64 @ z64.T
    if host:  # the labels' index is on the host already
        gram = gram.cpu()
    # A non-finite Gram matrix gives NaN (so a caller's finiteness check sees it) instead of an eigh failure. Its
    # diagonal tells: K_ii is NaN or Inf for a row with a NaN or Inf, and |K_ij| <= sqrt(K_ii K_jj).
    finite = torch.isfinite(gram.diagonal().sum())
    gram = torch.where(finite, gram, 0.0)
    blocks = len(groups.classes) if groups is not None else 0
    evals = gram.new_zeros(1 + blocks, batch)  # (1 + C', B): every norm's eigenvalues, zero padded (never kept)
    evals[0], evecs = _eigh(gram)
    vectors = []  # one (m, n, n) block of eigenvectors per span
    if groups is not None:
        subs = torch.nn.functional.pad(gram, (0, 1, 0, 1)).view(-1)[groups.index]
        offset = 0
        for a, b, n in groups.spans:
            block = subs[offset : offset + (b - a) * n * n].view(b - a, n, n)
            offset += (b - a) * n * n
            evals[1 + a : 1 + b, :n], block_vectors = _eigh(block)
            vectors.append(block_vectors)
    # What a float64 Gram matrix resolves: eigenvalues carry an error of about max(B, D) * eps64 * lambda_max.
    tol = evals.amax(-1, keepdim=True).clamp(min=0) * (max(batch, dim) * torch.finfo(torch.float64).eps)
    root = torch.where(evals > tol, evals, 0.0).sqrt()  # (1 + C', B) singular values
    values = torch.where(finite, root.sum(-1), math.nan)
    local = (groups.index, *vectors) if vectors else ()
    return values, (root, evecs, *local)


def _norms_backward(
    z: Tensor, saved: tuple[Tensor, ...], spans: tuple[tuple[int, int, int], ...], grad_values: Tensor, token: object
) -> Tensor:
    """dZ (B, D) in the dtype of ``z`` for the gradient ``grad_values`` (1 + C',) of the vector of
    :func:`_norms_forward` called with ``token``."""
    if torch.is_grad_enabled():  # autograd runs a backward in grad mode only with create_graph=True
        raise RuntimeError(
            "CLMLLoss: second derivatives are not implemented; backward with create_graph=True is not supported"
        )
    root, evecs, *local = saved
    # d tr sqrt(G) / dG = V diag(1 / (2 sqrt(lambda))) V^T over the kept eigenvalues, and K = Z Z^T with a
    # symmetric dK gives dZ = 2 dK Z: dZ = V diag(1 / sqrt(lambda)) V^T Z.
    scaled = torch.where(root > 0, root.reciprocal(), 0.0) * grad_values.to(root.device)[:, None]
    grad_gram = (evecs * scaled[0]) @ evecs.T
    if local:
        index, *vectors = local
        grad_subs = [
            ((block * scaled[1 + a : 1 + b, None, :n]) @ block.mT).view(-1) for (a, b, n), block in zip(spans, vectors)
        ]
        padded = torch.nn.functional.pad(grad_gram, (0, 1, 0, 1)).view(-1)
        padded.index_add_(0, index, torch.cat(grad_subs))
        grad_gram = padded.view(z.shape[0] + 1, -1)[:-1, :-1]
    # In float64 (see the module docstring).
    z64 = _float64(z, token)
    if z64 is z or z.device.type != "cpu":
        return (grad_gram.to(z.device) @ z64).to(z.dtype)
    return torch.mm(grad_gram, z64, out=_WORKSPACE.product_buffer(*z.shape)).to(z.dtype)


class _NuclearNorms(torch.autograd.Function):
    """||Z||_* (0-dim) and the norms (C',) of the labels of ``groups.classes``, in float64."""

    @staticmethod
    def forward(ctx, z: Tensor, groups: _Groups | None) -> tuple[Tensor, Tensor]:
        ctx.token = object()
        values, saved = _norms_forward(z, groups, False, ctx.token)
        ctx.save_for_backward(z, *saved)
        ctx.spans = groups.spans if groups is not None else ()
        return values[0], values[1:]

    @staticmethod
    def backward(ctx, grad_norm: Tensor, grad_norms: Tensor) -> tuple[Tensor, None]:
        z, *saved = ctx.saved_tensors
        grad_values = torch.cat([grad_norm[None], grad_norms])
        return _norms_backward(z, saved, ctx.spans, grad_values, ctx.token), None


class _Weights(NamedTuple):
    """The CLML loss's constants for one batch: lam / B, delta, the term weights, labels without rows."""

    scale: float
    delta: float
    local: float
    global_: float
    missing: int


class _CLMLFunction(torch.autograd.Function):
    """The CLML loss and its weighted local and global terms (0-dim, ``out_dtype``) in one autograd node.

    The three are assembled on the host from the 1 + C' norms (free on a CPU; on an accelerator ``eigh`` has
    synchronised already), with the (1 + C', 3) matrix of their derivatives by the norms that the backward applies
    to the three incoming gradients.
    """

    @staticmethod
    def forward(
        ctx, z: Tensor, groups: _Groups | None, weights: _Weights, out_dtype: torch.dtype, host: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.token = object()
        values, saved = _norms_forward(z, groups, host, ctx.token)
        norm, *norms = values.tolist()
        delta = weights.delta
        # max(delta, .) of each label's norm (a NaN stays NaN); labels left out of ``norms`` have no rows and
        # contribute delta each (all of them at local weight 0).
        local = weights.local * (sum(delta if n < delta else n for n in norms) + delta * weights.missing)
        global_ = weights.global_ * norm
        loss = weights.scale * (local - global_)
        # d(loss, local, global_) / d(||Z||_*, ||Z_k||_*); max(delta, .) passes the gradient where ||Z_k||_* >= delta.
        derivatives = np.zeros((1 + len(norms), 3))
        derivatives[0] = (-weights.scale * weights.global_, 0.0, weights.global_)
        passes = np.array(norms) >= delta
        derivatives[1:, :2] = np.multiply.outer(passes, (weights.scale * weights.local, weights.local))
        ctx.save_for_backward(z, torch.from_numpy(derivatives).to(values.device), *saved)
        ctx.spans = groups.spans if groups is not None else ()
        device = z.device
        return tuple(torch.tensor(value, dtype=out_dtype, device=device) for value in (loss, local, global_))

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_local: Tensor, grad_global: Tensor) -> tuple[Tensor | None, ...]:
        z, derivatives, *saved = ctx.saved_tensors
        incoming = torch.stack([grad_loss, grad_local, grad_global]).to(derivatives)
        grad_z = _norms_backward(z, saved, ctx.spans, derivatives @ incoming, ctx.token)
        return grad_z, None, None, None, None


def _nuclear_norms(
    embeddings: Tensor, labels: Tensor | None, group_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """||Z||_* (0-dim), the norms ||Z_k||_* (C',) of the labels ``classes`` (C',), all float64; every other label
    has no rows."""
    groups = _label_groups(labels.T, group_size) if labels is not None else None
    norm, norms = _NuclearNorms.apply(embeddings, groups)
    classes = groups.classes if groups is not None else embeddings.new_zeros(0, dtype=torch.long)
    return norm, norms, classes


def nuclear_norm(embeddings: Tensor) -> Tensor:
    """Nuclear norm ||Z||_* of a (B, D) matrix as a 0-dim float64 tensor (see the module docstring)."""
    return _nuclear_norms(embeddings, None)[0]


def group_nuclear_norms(embeddings: Tensor, labels: Tensor, group_size: int | None = None) -> Tensor:
    """Nuclear norms ||Z_k||_* of the row groups of every label.

    Args:
        embeddings: (B, D) floating point.
        labels: (B, C) bool, rows i with labels[i, k] form group k.
        group_size: padding size n of one block of per-label Gram matrices (static shapes, no host read), at least
            the largest label count (a ValueError on CPU; not checked on an accelerator, where it would wait for the
            device). None buckets the labels by count (a host read of the counts).

    Returns:
        (C,) float64; 0 for a label with no rows.
    """
    _, norms, classes = _nuclear_norms(embeddings, labels, group_size)
    return norms.new_zeros(labels.shape[1]).index_put((classes,), norms)


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
        eigh: where the eigen-decompositions run when the embeddings are on an accelerator: ``"device"`` (there), or
            ``"host"`` (the (B, B) Gram matrix is copied to the CPU, and the (B, B) gradient of the Gram matrix back;
            the two (B, D) products stay on the device). The same on a CPU. ``benchmarks/bench_clml_loss.py
            --device cuda --eigh host|device`` times the two.

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
        eigh: str = "device",
    ) -> None:
        super().__init__()
        if eigh not in ("device", "host"):
            raise ValueError(f"CLMLLoss: eigh must be 'device' or 'host', got {eigh!r}")
        for name, value in (
            ("lam", lam),
            ("delta", delta),
            ("local_weight", local_weight),
            ("global_weight", global_weight),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"CLMLLoss: {name} must be a real number, got {value!r} ({type(value).__name__})")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"CLMLLoss: {name} must be a finite number >= 0, got {value}")
        self.lam = lam
        self.delta = delta
        self.local_weight = local_weight
        self.global_weight = global_weight
        self.check_values = check_values
        self.eigh = eigh

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
        batch, classes = labels.shape
        host = self.eigh == "host" and embeddings.device.type != "cpu"
        groups = (
            _label_groups(labels.bool().T, None, torch.device("cpu") if host else None) if self.local_weight else None
        )
        missing = classes - (groups.classes.shape[0] if groups is not None else 0)
        weights = _Weights(self.lam / batch, self.delta, self.local_weight, self.global_weight, missing)
        out_dtype = torch.promote_types(embeddings.dtype, torch.float32)
        return CLMLTerms(*_CLMLFunction.apply(embeddings, groups, weights, out_dtype, host))

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
