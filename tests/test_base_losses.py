"""Base losses against slow float64 loops written from the published formulas, gradients, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from clml_core.correction import correct_labels
from clml_core.losses.base import (
    BASE_LOSSES,
    AsymmetricLoss,
    BCELoss,
    FocalLoss,
    HillLoss,
    LargeLossRejection,
    MultiLabelLoss,
    SPLCLoss,
    make_base_loss,
    negative_focal_term,
    positive_focal_term,
)

# ---------------------------------------------------------------------------------------------------------------
# Slow references, one entry at a time. p = sigmoid(x) and q = 1 - p are computed separately, and so are
# log p = -log(1 + e^-x) and log q = -log(1 + e^x), so that the far tails carry no cancellation error.


def _p(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _q(x: float) -> float:
    return 1.0 / (1.0 + math.exp(x))


def _log_p(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _log_q(x: float) -> float:
    return -math.log1p(math.exp(x))


def _bce(x: float, y: int) -> float:
    return -_log_p(x) if y else -_log_q(x)


def _focal(x: float, y: int, gamma: float = 2.0, alpha: float | None = None) -> float:
    if y:
        return (1.0 if alpha is None else alpha) * -(_q(x) ** gamma) * _log_p(x)
    return (1.0 if alpha is None else 1.0 - alpha) * -(_p(x) ** gamma) * _log_q(x)


def _asl(x: float, y: int, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8) -> float:
    if y:
        return -(_q(x) ** gamma_pos) * math.log(max(_p(x), eps))
    xs_neg = min(_q(x) + clip, 1.0)
    return -(max(_p(x) - clip, 0.0) ** gamma_neg) * math.log(max(xs_neg, eps))


def _hill(x: float, y: int, lamb=1.5, margin=1.0, gamma=2.0) -> float:
    if y:
        return -(_q(x - margin) ** gamma) * _log_p(x - margin)
    return (lamb - _p(x)) * _p(x) ** 2


def _splc(x: float, y: int, active: bool, tau=0.6, margin=1.0, gamma=2.0) -> float:
    if y:
        return _focal(x - margin, 1, gamma)
    if active and _p(x) > tau:
        return _focal(x, 1, gamma)
    return _focal(x, 0, gamma)


def _llr(logits: torch.Tensor, targets: torch.Tensor, reject_rate: float) -> list[list[float]]:
    rows, cols = logits.shape
    x, y = logits.tolist(), targets.tolist()
    loss = [[_bce(x[i][j], y[i][j]) for j in range(cols)] for i in range(rows)]
    unobserved = [(loss[i][j], i, j) for i in range(rows) for j in range(cols) if y[i][j] == 0]
    k = min(math.ceil(round(reject_rate * rows * cols, 6)), len(unobserved))
    for _, i, j in sorted(unobserved, reverse=True)[:k]:
        loss[i][j] = 0.0
    return loss


def _matrix(fn, logits: torch.Tensor, targets: torch.Tensor, **kw) -> torch.Tensor:
    x, y = logits.tolist(), targets.long().tolist()
    return torch.tensor([[fn(a, b, **kw) for a, b in zip(rx, ry)] for rx, ry in zip(x, y)], dtype=torch.float64)


def _case(seed: int, rows: int = 6, cols: int = 9, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    logits[0, :4] = torch.tensor([-30.0, 30.0, -19.0, 25.0], dtype=torch.float64)  # far tails
    targets = (torch.rand(rows, cols, generator=gen) < 0.35).long()
    targets[0, :4] = torch.tensor([1, 0, 0, 1])
    return logits, targets


# (loss built with these kwargs, reference per entry, its kwargs)
CASES = {
    "bce": ({}, _bce, {}),
    "focal": ({}, _focal, {}),
    "focal_alpha_gamma1": ({"alpha": 0.25, "gamma": 1.0}, _focal, {"alpha": 0.25, "gamma": 1.0}),
    "asl": ({}, _asl, {}),
    "asl_noclip": (
        {"clip": 0.0, "gamma_pos": 1.0, "gamma_neg": 2.0},
        _asl,
        {"clip": 0.0, "gamma_pos": 1.0, "gamma_neg": 2.0},
    ),
    "hill": ({}, _hill, {}),
    "hill_custom": ({"lamb": 2.0, "margin": 0.5, "gamma": 1.0}, _hill, {"lamb": 2.0, "margin": 0.5, "gamma": 1.0}),
}


def _name(case: str) -> str:
    return case.split("_")[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", range(3))
def test_loss_matches_loop_reference(case: str, seed: int) -> None:
    kwargs, ref_fn, ref_kw = CASES[case]
    logits, targets = _case(seed)
    ref = _matrix(ref_fn, logits, targets, **ref_kw)
    loss = make_base_loss(_name(case), **kwargs)
    torch.testing.assert_close(loss.loss_matrix(logits, targets), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss(logits, targets), ref.sum(), rtol=1e-10, atol=1e-12)
    mean = make_base_loss(_name(case), reduction="mean", **kwargs)
    torch.testing.assert_close(mean(logits, targets), ref.mean(), rtol=1e-10, atol=1e-12)
    # float32: same numbers to float32 precision, and correction_active changes nothing for these losses.
    out32 = loss(logits.float(), targets.bool(), correction_active=True)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, ref.sum().float(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_splc_matches_loop_reference(active: bool, seed: int) -> None:
    logits, targets = _case(seed)
    ref = _matrix(_splc, logits, targets, active=active)
    loss = SPLCLoss()
    matrix = loss.loss_matrix(logits, targets, correction_active=active)
    torch.testing.assert_close(matrix, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss(logits, targets, correction_active=active), ref.sum(), rtol=1e-10, atol=1e-12)
    out32 = loss(logits.float(), targets, correction_active=active)
    torch.testing.assert_close(out32, ref.sum().float(), rtol=2e-5, atol=1e-5)


def test_splc_correction_switches_exactly_the_confident_unobserved_entries() -> None:
    logits, targets = _case(7, rows=20, cols=10)
    loss = SPLCLoss(tau=0.6)
    off = loss.loss_matrix(logits, targets)
    on = loss.loss_matrix(logits, targets, correction_active=True)
    switched = (correct_labels(targets, logits, 0.6) == 1) & (targets == 0)
    assert switched.any() and (~switched).any()
    torch.testing.assert_close(on[~switched], off[~switched], rtol=0, atol=0)
    # A switched entry gets the positive focal term without margin.
    torch.testing.assert_close(on[switched], positive_focal_term(logits[switched], 2.0), rtol=1e-12, atol=0)
    # Without correction SPLC is the focal margin loss: Hill's positive term, focal negative term.
    focal = FocalLoss().loss_matrix(logits, targets)
    hill = HillLoss().loss_matrix(logits, targets)
    torch.testing.assert_close(off, torch.where(targets.bool(), hill, focal), rtol=1e-12, atol=0)


def test_llr_rejects_exactly_the_largest_unobserved_losses() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0], [0.0, 5.0, 1.0]])
    targets = torch.tensor([[0, 0, 0], [0, 1, 0]])
    loss = LargeLossRejection()
    # k = ceil(2/6 * 6) = 2: the unobserved entries with logits 3 and 2; the observed 5 never competes.
    mask = loss.rejection_mask(logits, targets, reject_rate=2 / 6)
    assert mask.tolist() == [[True, True, False], [False, False, False]]
    # k = ceil(0.1 * 6) = 1.
    assert loss.rejection_mask(logits, targets, 0.1).tolist() == [[True, False, False], [False, False, False]]
    # k larger than the number of unobserved entries: all unobserved, never the observed positive.
    assert loss.rejection_mask(logits, targets, 1.0).tolist() == (targets == 0).tolist()
    assert not loss.rejection_mask(logits, targets, 0.0).any()
    bce = BCELoss().loss_matrix(logits, targets)
    torch.testing.assert_close(loss(logits, targets, reject_rate=2 / 6), bce[~mask].sum())
    torch.testing.assert_close(loss(logits, targets), bce.sum())  # reject_rate 0 is AN
    mean = LargeLossRejection(reduction="mean")(logits, targets, reject_rate=2 / 6)
    torch.testing.assert_close(mean, bce[~mask].sum() / 6)  # rejected entries stay in the denominator


def test_llr_k_is_robust_to_float_rounding() -> None:
    logits = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    targets = torch.zeros(10, 10)
    assert 0.07 * 100 > 7  # a plain ceil would reject 8
    assert int(LargeLossRejection().rejection_mask(logits, targets, 0.07).sum()) == 7


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_llr_matches_loop_reference(rate: float, seed: int) -> None:
    logits, targets = _case(seed)
    ref = torch.tensor(_llr(logits, targets, rate), dtype=torch.float64)
    out = LargeLossRejection().loss_matrix(logits, targets, reject_rate=rate)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


GRAD_LOSSES = {
    "bce": lambda: BCELoss(),
    "focal": lambda: FocalLoss(alpha=0.3),
    "focal_gamma_half": lambda: FocalLoss(gamma=0.5),
    "asl_attached": lambda: AsymmetricLoss(detach_focal_weight=False),
    "asl_gamma_pos": lambda: AsymmetricLoss(gamma_pos=1.0, detach_focal_weight=False),
    "hill": lambda: HillLoss(),
    "splc": lambda: SPLCLoss(),
    "llr": lambda: LargeLossRejection(reduction="mean"),
}


@pytest.mark.parametrize("name", list(GRAD_LOSSES))
def test_gradcheck(name: str) -> None:
    logits, targets = _case(11, rows=3, cols=5, scale=2.0)
    logits.requires_grad_(True)
    loss = GRAD_LOSSES[name]()
    kwargs = {"reject_rate": 0.2} if name == "llr" else {"correction_active": True}
    assert torch.autograd.gradcheck(lambda x: loss(x, targets, **kwargs), (logits,))


def test_detached_focusing_weights_give_weighted_log_gradients() -> None:
    logits, targets = _case(2, scale=2.0)
    logits.requires_grad_(True)
    p, q, y = torch.sigmoid(logits.detach()), torch.sigmoid(-logits.detach()), targets.bool()
    # ASL: d/dx [-log max(p, eps)] = -q while p > eps, else 0;
    # d/dx [-log(q + clip)] = p q / (q + clip) while q + clip < 1, else 0.
    AsymmetricLoss()(logits, targets).backward()
    clip = 0.05
    grad_pos = torch.where(p > 1e-8, -q, torch.zeros_like(p))
    grad_neg = torch.where(q + clip < 1, p * q / (q + clip), torch.zeros_like(p))
    assert (y & (p < 1e-8)).any()  # the eps floor is exercised
    expected = torch.where(y, grad_pos, (p - clip).clamp(min=0) ** 4 * grad_neg)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-14)
    # Focal with a detached weight: weight times the BCE gradient p - y.
    logits.grad = None
    FocalLoss(detach_focal_weight=True)(logits, targets).backward()
    weight = torch.where(y, q, p) ** 2
    torch.testing.assert_close(logits.grad, weight * (p - y.double()), rtol=1e-10, atol=1e-14)


def test_focal_terms_are_mirror_images_and_gamma_zero_is_bce() -> None:
    x = torch.linspace(-40, 40, 81, dtype=torch.float64).reshape(9, 9)
    torch.testing.assert_close(negative_focal_term(x, 2.0), positive_focal_term(-x, 2.0))
    ones = torch.ones_like(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, ones, reduction="none")
    torch.testing.assert_close(positive_focal_term(x, 0.0), bce)


#: Arguments without a default (EPR's expected label count is privileged information, never defaulted).
REQUIRED_KWARGS = {"epr": {"expected_positives": 1.5}}


def _make(name: str, **kwargs) -> MultiLabelLoss:
    return make_base_loss(name, **REQUIRED_KWARGS.get(name, {}), **kwargs)


@pytest.mark.parametrize("name", list(BASE_LOSSES))
def test_extreme_logits_give_finite_losses_and_gradients(name: str) -> None:
    logits = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]] * 2, requires_grad=True)
    targets = torch.tensor([[0] * 7, [1] * 7])
    out = _make(name)(logits, targets, correction_active=True)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", list(BASE_LOSSES))
def test_low_precision_and_autocast_compute_in_float32(name: str) -> None:
    logits, targets = _case(4)
    low = logits.to(torch.bfloat16)
    loss = _make(name)
    ref = loss(low.float(), targets, correction_active=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(low, targets, correction_active=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert loss(logits.half(), targets).dtype == torch.float32
    assert loss(logits, targets).dtype == torch.float64


@pytest.mark.parametrize("name", list(BASE_LOSSES))
def test_degenerate_batches_are_finite(name: str) -> None:
    loss = _make(name)
    logits = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    for targets in (torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]])):
        assert torch.isfinite(loss(logits, targets, correction_active=True))


def test_factory_names_defaults_and_overrides() -> None:
    assert set(BASE_LOSSES) == {"bce", "an", "focal", "asl", "hill", "splc", "ll-r", "an-ls", "wan", "epr", "em", "gr"}
    for name, cls in BASE_LOSSES.items():
        loss = _make(name)
        assert type(loss) is cls and isinstance(loss, MultiLabelLoss) and loss.reduction == "sum"
    assert BASE_LOSSES["an"] is BCELoss
    focal = make_base_loss("focal")
    assert (focal.gamma, focal.alpha, focal.detach_focal_weight) == (2.0, None, False)
    asl = make_base_loss("asl")
    assert (asl.gamma_neg, asl.gamma_pos, asl.clip, asl.eps, asl.detach_focal_weight) == (4, 0, 0.05, 1e-8, True)
    hill = make_base_loss("hill")
    assert (hill.lamb, hill.margin, hill.gamma) == (1.5, 1.0, 2.0)
    splc = make_base_loss("splc")
    assert (splc.tau, splc.margin, splc.gamma) == (0.6, 1.0, 2.0)
    custom = make_base_loss("hill", lamb=2.0, reduction="mean")
    assert (custom.lamb, custom.reduction) == (2.0, "mean")
    assert "lamb=2.0" in repr(custom)


def test_factory_bad_input() -> None:
    with pytest.raises(ValueError, match="valid names: bce, an, focal, asl, hill, splc, ll-r"):
        make_base_loss("BCE")
    with pytest.raises(ValueError, match="unknown argument.*'tau'.*accepts"):
        make_base_loss("focal", tau=0.5)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("bce", {"reduction": "none"}, "reduction"),
        ("focal", {"gamma": -1.0}, "gamma"),
        ("focal", {"gamma": math.nan}, "gamma"),
        ("focal", {"gamma": True}, "gamma"),
        ("focal", {"alpha": 1.5}, "alpha"),
        ("asl", {"clip": 1.0}, "clip"),
        ("asl", {"clip": -0.1}, "clip"),
        ("asl", {"eps": 0.0}, "eps"),
        ("asl", {"eps": 1.0}, "eps"),
        ("asl", {"gamma_neg": "4"}, "gamma_neg"),
        ("hill", {"lamb": 0.0}, "lamb"),
        ("hill", {"margin": -1.0}, "margin"),
        ("splc", {"tau": 1.0}, "tau"),
        ("splc", {"tau": 0.0}, "tau"),
        ("splc", {"gamma": math.inf}, "gamma"),
    ],
)
def test_bad_hyperparameters(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_base_loss(name, **kwargs)


@pytest.mark.parametrize("name", list(BASE_LOSSES))
def test_bad_tensors(name: str) -> None:
    loss = _make(name)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same 2-D shape"):
        loss(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same 2-D shape"):
        loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        loss(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="floating point"):
        loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets must be in"):
        loss(x, torch.full((2, 3), 0.5))
    with pytest.raises(TypeError):
        loss(x.numpy(), torch.zeros(2, 3))
    unchecked = _make(name, check_values=False)
    assert torch.isfinite(unchecked(x, torch.full((2, 3), 2.0)))


def test_llr_bad_reject_rate() -> None:
    x, y = torch.zeros(2, 3), torch.zeros(2, 3)
    for rate in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="reject_rate"):
            LargeLossRejection()(x, y, reject_rate=rate)
