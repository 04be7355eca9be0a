"""CLMLLoss against the per-class float64 SVD loop, its gradients, edge cases and bad input."""

import pytest
import torch

from clml_core.losses import CLMLLoss, clml_loss_reference, group_nuclear_norms, nuclear_norm

SHAPES = [(8, 16, 5), (32, 64, 20), (24, 300, 80), (6, 3, 4)]  # (B, D, C); the last has D < B


def _draw(batch: int, dim: int, classes: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=g, dtype=dtype)
    labels = torch.rand(batch, classes, generator=g) < 3.0 / classes
    return z, labels


def _value_and_grad(fn, z, labels):
    leaf = z.detach().clone().requires_grad_()
    value = fn(leaf, labels)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


@pytest.mark.parametrize("batch,dim,classes", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "params",
    [
        dict(lam=1.0, delta=1.0, local_weight=1.0, global_weight=1.0),
        dict(lam=0.3, delta=0.0, local_weight=1.0, global_weight=1.0),
        dict(lam=2.0, delta=5.0, local_weight=0.5, global_weight=2.0),
        dict(lam=1.0, delta=1.0, local_weight=0.0, global_weight=1.0),
        dict(lam=1.0, delta=1.0, local_weight=1.0, global_weight=0.0),
    ],
)
def test_matches_float64_svd_loop(batch, dim, classes, seed, params):
    z, labels = _draw(batch, dim, classes, seed)
    value, grad = _value_and_grad(CLMLLoss(**params), z, labels)
    ref_value, ref_grad = _value_and_grad(lambda e, y: clml_loss_reference(e, y, **params), z, labels)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("batch,dim,classes", SHAPES[:2])
def test_float32_matches_float64_loop(batch, dim, classes):
    z, labels = _draw(batch, dim, classes, seed=3)
    value, grad = _value_and_grad(CLMLLoss(), z.float(), labels)
    ref_value, ref_grad = _value_and_grad(clml_loss_reference, z, labels)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


def _ill_conditioned(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-ReLU (non-negative) float64 batches (48, 96) with large norms where training drives the CLML term.

    ``decades4`` / ``decades6``: singular values over 4 / 6 decades; ``duplicates``: every row has a near copy
    (rows i and i + 24 differ by 1e-3 relative), and half of the labels hold such pairs.
    """
    batch, dim, classes = 48, 96, 12
    g = torch.Generator().manual_seed(seed)
    if kind == "duplicates":
        base = torch.relu(torch.randn(batch // 2, dim, generator=g, dtype=torch.float64)) * 50
        z = torch.cat([base, torch.relu(base + 0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64))])
    else:
        decades = int(kind.removeprefix("decades"))
        u = torch.linalg.qr(torch.randn(batch, batch, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(dim, batch, generator=g, dtype=torch.float64))[0]
        a = (u * torch.logspace(0, 0.5 - decades, batch, dtype=torch.float64)) @ v.T
        z = 1e3 * (a - a.min())  # the shift adds one large singular value (about one decade)
    labels = torch.rand(batch, classes, generator=g) < 3.0 / classes
    labels[:, : classes // 2] |= labels[:, : classes // 2].roll(batch // 2, 0)  # rows i and i + 24 together
    return z, labels


def _assert_float32_matches_float64_loop(z32, labels, value, grad):
    # The reference runs on the float32 values themselves: they are the input, exactly representable in float64.
    ref_value, ref_grad = _value_and_grad(clml_loss_reference, z32.double(), labels)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-6, atol=0)
    # 6 decades are at the edge of what a float64 Gram matrix resolves (about 1e-6 * s_max; float32 rounding of the
    # result gives 6e-8): an error of 2e-7 of the largest entry remains there.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))
    assert float((grad.double() - ref_grad).norm() / ref_grad.norm()) < 1e-5


ILL_CONDITIONED = ["decades4", "decades6", "duplicates"]


@pytest.mark.parametrize("kind", ILL_CONDITIONED)
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_ill_conditioned_post_relu_batches_match_the_float64_loop(kind, seed):
    z, labels = _ill_conditioned(kind, seed)
    z32 = z.float()
    values = torch.linalg.svdvals(z32.double())
    decades = float(torch.log10(values[0] / values[-1]))
    assert (z32 >= 0).all() and float(z32.norm(dim=1).min()) > 50
    if kind == "duplicates":
        assert decades > 4  # condition number above 1e4
    else:
        assert int(kind.removeprefix("decades")) <= decades < int(kind.removeprefix("decades")) + 0.5
    _assert_float32_matches_float64_loop(z32, labels, *_value_and_grad(CLMLLoss(), z32, labels))


def test_second_derivatives_raise_instead_of_being_wrong():
    z, labels = _draw(8, 6, 3, seed=16)
    z.requires_grad_()
    base = (z**3).sum()  # a term with a second derivative, which alone would otherwise make the result look valid
    for value in (CLMLLoss()(z, labels), CLMLLoss().terms(z, labels).local, group_nuclear_norms(z, labels).sum()):
        with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
            torch.autograd.grad(base + value, z, create_graph=True)
    (grad,) = torch.autograd.grad(base + CLMLLoss()(z, labels), z)  # a plain backward is unaffected
    assert torch.isfinite(grad).all()


def test_gradcheck():
    z, labels = _draw(6, 5, 3, seed=4)
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: CLMLLoss(delta=0.1)(e, labels), (z,))


def test_terms_are_the_weighted_parts_of_the_loss():
    z, labels = _draw(16, 32, 10, seed=5)
    loss_fn = CLMLLoss(lam=0.7, delta=1.0, local_weight=2.0, global_weight=3.0)
    terms = loss_fn.terms(z, labels)
    local_ref = sum(
        max(1.0, float(torch.linalg.svdvals(z[labels[:, k]]).sum())) if labels[:, k].any() else 1.0 for k in range(10)
    )
    global_ref = float(torch.linalg.svdvals(z).sum())
    assert float(terms.local) == pytest.approx(2.0 * local_ref, rel=1e-10)
    assert float(terms.global_) == pytest.approx(3.0 * global_ref, rel=1e-10)
    assert float(terms.loss) == pytest.approx(0.7 / 16 * (2.0 * local_ref - 3.0 * global_ref), rel=1e-10)
    assert float(loss_fn(z, labels)) == float(terms.loss)


def test_logged_terms_carry_their_own_gradients():
    z, labels = _draw(12, 20, 6, seed=15)
    loss_fn = CLMLLoss(lam=0.7, delta=2.0, local_weight=2.0, global_weight=3.0)
    local, grad_local = _value_and_grad(lambda e, y: loss_fn.terms(e, y).local, z, labels)
    global_, grad_global = _value_and_grad(lambda e, y: loss_fn.terms(e, y).global_, z, labels)
    # clml_loss_reference is lam / B * (local - global_): lam = B and one weight at 0 leave one term.
    ref_local, ref_grad_local = _value_and_grad(
        lambda e, y: clml_loss_reference(e, y, lam=12.0, delta=2.0, local_weight=2.0, global_weight=0.0), z, labels
    )
    ref_global, ref_grad_global = _value_and_grad(
        lambda e, y: -clml_loss_reference(e, y, lam=12.0, delta=2.0, local_weight=0.0, global_weight=3.0), z, labels
    )
    torch.testing.assert_close(local, ref_local, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_local, ref_grad_local, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(global_, ref_global, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_global, ref_grad_global, rtol=1e-8, atol=1e-10)


def test_static_padding_equals_compact_padding():
    z, labels = _draw(20, 40, 12, seed=6)
    compact, grad_compact = _value_and_grad(lambda e, y: group_nuclear_norms(e, y).sum(), z, labels)
    static, grad_static = _value_and_grad(lambda e, y: group_nuclear_norms(e, y, group_size=20).sum(), z, labels)
    torch.testing.assert_close(compact, static, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_compact, grad_static, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.float32])
def test_label_dtypes_agree(dtype):
    z, labels = _draw(10, 8, 4, seed=7)
    assert float(CLMLLoss()(z, labels.to(dtype))) == float(CLMLLoss()(z, labels))


def test_label_with_no_rows_contributes_delta_without_gradient():
    z, _ = _draw(5, 4, 1, seed=8)
    labels = torch.zeros(5, 2, dtype=torch.bool)
    labels[:, 0] = True  # label 1 has no rows
    local_only = CLMLLoss(delta=0.25, global_weight=0.0)
    terms = local_only.terms(z, labels)
    assert float(terms.local) == pytest.approx(float(torch.linalg.svdvals(z).sum()) + 0.25)
    empty = torch.zeros(5, 3, dtype=torch.bool)
    value, grad = _value_and_grad(local_only, z, empty)
    assert float(value) == pytest.approx(3 * 0.25 / 5)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("classes", [0, 3])
@pytest.mark.parametrize("group_size", [None, 5])
def test_no_label_with_rows_leaves_the_global_term_and_deltas(classes, group_size):
    z, _ = _draw(5, 4, 1, seed=11)
    labels = torch.zeros(5, classes, dtype=torch.bool)
    value, grad = _value_and_grad(CLMLLoss(delta=0.5), z, labels)
    ref_value, ref_grad = _value_and_grad(lambda e, y: clml_loss_reference(e, y, delta=0.5), z, labels)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)
    assert torch.equal(group_nuclear_norms(z, labels, group_size), torch.zeros(classes, dtype=torch.float64))


def test_group_size_below_the_largest_label_count_is_rejected():
    z, _ = _draw(6, 4, 1, seed=12)
    labels = torch.zeros(6, 2, dtype=torch.bool)
    labels[:4, 0] = True
    with pytest.raises(ValueError, match="group_size 3 is smaller than the largest label count"):
        group_nuclear_norms(z, labels, group_size=3)
    assert group_nuclear_norms(z, labels, group_size=4)[0] > 0


def test_label_with_one_row_is_the_row_norm():
    z, _ = _draw(4, 6, 1, seed=9)
    labels = torch.tensor([[0], [1], [0], [0]])
    value, grad = _value_and_grad(CLMLLoss(delta=0.0, global_weight=0.0), z, labels)
    assert float(value) == pytest.approx(float(z[1].norm()) / 4)
    expected = torch.zeros_like(z)
    expected[1] = z[1] / z[1].norm() / 4
    torch.testing.assert_close(grad, expected)


def test_duplicate_rows_use_the_documented_subgradient():
    g = torch.Generator().manual_seed(10)
    row = torch.randn(1, 7, generator=g, dtype=torch.float64)
    other = torch.randn(1, 7, generator=g, dtype=torch.float64)
    z = torch.cat([row, row, other])  # rank 2 with three rows
    labels = torch.ones(3, 1)
    value, grad = _value_and_grad(CLMLLoss(delta=0.0, global_weight=0.0), z, labels)
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    assert s[-1] < 1e-12  # rank deficient
    assert float(value) == pytest.approx(float(s[:2].sum()) / 3, rel=1e-10)
    # U_r V_r^T over the nonzero singular values, divided by B.
    torch.testing.assert_close(grad, (u[:, :2] @ vh[:2]) / 3, rtol=1e-7, atol=1e-9)


def test_batch_of_one():
    z = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1]])
    value, grad = _value_and_grad(CLMLLoss(delta=1.0), z, labels)
    # local: 5 + 1 (empty label) + 5; global: 5
    assert float(value) == pytest.approx(11.0 - 5.0)
    torch.testing.assert_close(grad, torch.tensor([[0.6, 0.8]], dtype=torch.float64))


def test_all_zero_embeddings_are_finite_with_zero_gradient():
    z = torch.zeros(8, 16)
    labels = torch.rand(8, 5, generator=torch.Generator().manual_seed(11)) < 0.5
    value, grad = _value_and_grad(CLMLLoss(delta=1.0), z, labels)
    assert float(value) == pytest.approx(5 * 1.0 / 8)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0
    assert float(nuclear_norm(z)) == 0.0


@pytest.mark.parametrize("scale", [2.0**16, 1.0 / 1024])
def test_gradient_scales_with_the_incoming_gradient(scale):
    z, labels = _draw(16, 24, 6, seed=12, dtype=torch.float32)
    _, grad = _value_and_grad(CLMLLoss(), z, labels)
    _, grad_scaled = _value_and_grad(lambda e, y: CLMLLoss()(e, y) * scale, z, labels)
    torch.testing.assert_close(grad_scaled, grad * scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_is_finite_and_close_to_float32(dtype):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(32, 20, generator=g)
    labels = torch.rand(32, 8, generator=g) < 0.3
    layer = torch.nn.Linear(20, 64)

    def run(autocast: bool):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            z = layer(x)
            loss = CLMLLoss()(z, labels)
        loss.backward()
        return z.dtype, loss.detach(), layer.weight.grad.clone()

    z_dtype, loss_low, grad_low = run(True)
    _, loss_fp32, grad_fp32 = run(False)
    assert z_dtype == dtype and loss_low.dtype == torch.float32
    assert torch.isfinite(grad_low).all()
    assert float(loss_low) == pytest.approx(float(loss_fp32), rel=2e-2)
    assert float((grad_low - grad_fp32).norm() / grad_fp32.norm()) < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eigh", ["device", "host"])
def test_cuda_matches_cpu(eigh):
    z, labels = _draw(32, 64, 20, seed=14, dtype=torch.float32)
    value, grad = _value_and_grad(CLMLLoss(), z, labels)
    value_cuda, grad_cuda = _value_and_grad(CLMLLoss(check_values=False, eigh=eigh), z.cuda(), labels.cuda())
    assert value_cuda.device.type == "cuda" and grad_cuda.device.type == "cuda"
    torch.testing.assert_close(value_cuda.cpu(), value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_cuda.cpu(), grad, rtol=1e-4, atol=1e-5)
    static = group_nuclear_norms(z.cuda(), labels.cuda(), group_size=32)  # one padded block, static shapes
    torch.testing.assert_close(static.cpu(), group_nuclear_norms(z, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ILL_CONDITIONED)
@pytest.mark.parametrize("eigh", ["device", "host"])
def test_cuda_float32_ill_conditioned_with_tf32_allowed(kind, eigh, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    z, labels = _ill_conditioned(kind, seed=0)
    z32 = z.float()
    value, grad = _value_and_grad(CLMLLoss(check_values=False, eigh=eigh), z32.cuda(), labels.cuda())
    _assert_float32_matches_float64_loop(z32, labels, value.cpu(), grad.cpu())


@pytest.mark.parametrize(
    "embeddings,labels,message",
    [
        (torch.randn(4, 3), torch.ones(5, 2), "batch size 4 but labels have 5"),
        (torch.randn(4), torch.ones(4, 2), "embeddings must be 2-D"),
        (torch.randn(4, 3), torch.ones(4), "labels must be 2-D"),
        (torch.randn(4, 3), torch.full((4, 2), 2.0), r"labels must be in \{0, 1\}"),
        (torch.randn(4, 3), -torch.ones(4, 2, dtype=torch.int64), r"labels must be in \{0, 1\}"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.ones(2, 2), "NaN or Inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), torch.ones(2, 2), "NaN or Inf"),
        (torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2), "floating point"),
        (torch.randn(0, 3), torch.ones(0, 2), "empty batch"),
    ],
)
def test_bad_input_raises_a_clear_value_error(embeddings, labels, message):
    with pytest.raises(ValueError, match=message):
        CLMLLoss()(embeddings, labels)


@pytest.mark.parametrize("field", ["lam", "delta", "local_weight", "global_weight"])
def test_negative_hyperparameters_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        CLMLLoss(**{field: -1.0})


@pytest.mark.parametrize("field", ["lam", "delta", "local_weight", "global_weight"])
@pytest.mark.parametrize("value,error", [("abc", TypeError), (True, TypeError), (float("nan"), ValueError)])
def test_hyperparameters_that_are_no_finite_number_are_rejected_by_name(field, value, error):
    with pytest.raises(error, match=f"CLMLLoss: {field} must be a"):
        CLMLLoss(**{field: value})


def test_unknown_eigh_placement_is_rejected():
    with pytest.raises(ValueError, match="eigh must be 'device' or 'host', got 'gpu'"):
        CLMLLoss(eigh="gpu")


def test_unchecked_non_finite_embeddings_give_nan_not_a_solver_error():
    z = torch.randn(6, 4)
    z[2, 1] = float("nan")
    terms = CLMLLoss(check_values=False).terms(z, torch.ones(6, 2))
    assert torch.isnan(terms.loss) and torch.isnan(terms.local) and torch.isnan(terms.global_)


def test_skewed_label_counts_across_size_buckets_match_the_loop():
    g = torch.Generator().manual_seed(15)
    z = torch.randn(40, 24, generator=g, dtype=torch.float64)
    frequency = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.12, 0.06, 0.03, 0.0])  # counts from 40 down to 0
    labels = torch.rand(40, 8, generator=g) < frequency
    labels[0, 6] = True  # at least one row
    value, grad = _value_and_grad(CLMLLoss(delta=0.5), z, labels)
    ref_value, ref_grad = _value_and_grad(lambda e, y: clml_loss_reference(e, y, delta=0.5), z, labels)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)
    static, static_grad = _value_and_grad(lambda e, y: group_nuclear_norms(e, y, group_size=40).sum(), z, labels)
    buckets, bucket_grad = _value_and_grad(lambda e, y: group_nuclear_norms(e, y).sum(), z, labels)
    torch.testing.assert_close(static, buckets, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(static_grad, bucket_grad, rtol=1e-10, atol=1e-12)


def test_float32_calls_that_share_the_cpu_workspace_keep_their_own_gradients():
    # The float64 copies of float32 embeddings live in a per-thread buffer on the CPU, reused by a backward when no
    # other call wrote it since: graphs built before one backward, a graph run backward twice, shapes that shrink and
    # grow, and gradients kept across later calls must not see each other's data.
    batches = [
        _draw(batch, dim, 6, seed=20 + batch, dtype=torch.float32) for batch, dim in ((24, 40), (8, 16), (24, 40))
    ]
    leaves = [z.clone().requires_grad_() for z, _ in batches]
    total = sum(CLMLLoss()(leaf, labels) for leaf, (_, labels) in zip(leaves, batches))
    total.backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    for leaf, (z, labels) in zip(leaves, batches):
        _, ref_grad = _value_and_grad(clml_loss_reference, z.double(), labels)
        torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    total.backward()  # a second backward of the same graph adds the same gradients
    assert all(torch.allclose(leaf.grad, 2 * grad, rtol=1e-6, atol=0) for leaf, grad in zip(leaves, first))
    kept = [leaf.grad.clone() for leaf in leaves]
    _value_and_grad(CLMLLoss(), *_draw(40, 64, 6, seed=30, dtype=torch.float32))  # a larger call reallocates
    assert all(torch.equal(leaf.grad, grad) for leaf, grad in zip(leaves, kept))


def test_threads_computing_at_once_get_their_own_results():
    from concurrent.futures import ThreadPoolExecutor

    batches = [_draw(32, 48, 8, seed=40 + i, dtype=torch.float32) for i in range(4)]
    alone = [_value_and_grad(CLMLLoss(), z, labels) for z, labels in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda batch: _value_and_grad(CLMLLoss(), *batch), batches * 5))
    for (value, grad), (ref_value, ref_grad) in zip(together, alone * 5):
        assert torch.equal(value, ref_value) and torch.equal(grad, ref_grad)
