"""Single-positive losses (AN-LS, WAN, EPR, EM, GR-Loss) and GR-Loss's schedule against slow float64 loops written
from the published formulas, numbers worked by hand, gradients, extreme logits and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from clml_core.losses import BASE_LOSSES, make_base_loss
from clml_core.losses.single_positive import (
    GR_K_END,
    GR_K_START,
    GR_Q,
    GR_V_END,
    GR_V_START,
    ANLabelSmoothingLoss,
    EntropyMaximizationLoss,
    EPRLoss,
    GRLoss,
    GRSchedule,
    WeightedANLoss,
    binary_entropy,
    expected_positive_penalty,
    gr_schedule,
)

NAMES = ("an-ls", "wan", "epr", "em", "gr")
#: Arguments each loss needs (EPR's k has no default).
REQUIRED = {"epr": {"expected_positives": 1.5}}

# ---------------------------------------------------------------------------------------------------------------
# Slow references: one entry at a time, with 0-dim float64 tensors so that autograd gives the reference gradient.
# p = 1 / (1 + e^-x); -log p = log(1 + e^-x); -log(1 - p) = log(1 + e^x). Fine for the |x| < 30 used here.


def _p(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def _nlp(x: torch.Tensor) -> torch.Tensor:
    return torch.log(1.0 + torch.exp(-x))


def _nlq(x: torch.Tensor) -> torch.Tensor:
    return torch.log(1.0 + torch.exp(x))


def _an_ls(x, y, num_classes, epsilon=0.1):
    if y:
        return (1 - epsilon) * _nlp(x) + epsilon * _nlq(x)
    return (1 - epsilon) * _nlq(x) + epsilon * _nlp(x)


def _wan(x, y, num_classes):
    return _nlp(x) if y else _nlq(x) / (num_classes - 1)


def _epr(x, y, num_classes, expected_positives=1.5):
    return _nlp(x) if y else 0.0 * x


def _em(x, y, num_classes, alpha=0.1):
    if y:
        return _nlp(x)
    p = _p(x)
    entropy = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    return -alpha * entropy


def _gr(x, y, num_classes, k=GR_K_START, v=GR_V_START, q=GR_Q):
    if y:
        return _nlp(x)
    (w, b), (mu, sigma), (q2, q3) = k, v, q
    p_detached = 1.0 / (1.0 + math.exp(-float(x.detach())))
    weight_k = 1.0 / (1.0 + math.exp(-(w * p_detached + b)))
    weight_v = math.exp(-((p_detached - mu) ** 2) / (2 * sigma**2))
    p = _p(x)
    return weight_v * (weight_k * (1 - p**q2) / q2 + (1 - weight_k) * (1 - (1 - p) ** q3) / q3)


def _epr_penalty(logits: torch.Tensor, expected_positives: float) -> torch.Tensor:
    rows, cols = logits.shape
    total = 0.0
    for i in range(rows):
        for j in range(cols):
            total = total + _p(logits[i, j])
    return (total / rows - expected_positives) ** 2 / cols**2


REFERENCES = {"an-ls": _an_ls, "wan": _wan, "epr": _epr, "em": _em, "gr": _gr}


def _ref_matrix(name: str, logits: torch.Tensor, targets: torch.Tensor, **kw) -> torch.Tensor:
    rows, cols = logits.shape
    fn = REFERENCES[name]
    ref_kw = {key: value for key, value in kw.items() if key != "reduction"}
    return torch.stack(
        [torch.stack([fn(logits[i, j], int(targets[i, j]), cols, **ref_kw) for j in range(cols)]) for i in range(rows)]
    )


def _ref_loss(name: str, logits: torch.Tensor, targets: torch.Tensor, reduction: str, **kw) -> torch.Tensor:
    matrix = _ref_matrix(name, logits, targets, **kw)
    rows, cols = logits.shape
    penalty = _epr_penalty(logits, kw.get("expected_positives", 1.5)) if name == "epr" else 0.0
    mean = matrix.sum() / (rows * cols) + penalty  # the harness: sum(matrix / (B C)) + regulariser
    return mean if reduction == "mean" else rows * cols * mean


def _case(seed: int, rows: int = 5, cols: int = 7, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    logits[0, :4] = torch.tensor([-25.0, 25.0, -12.0, 14.0], dtype=torch.float64)  # tails
    targets = torch.zeros(rows, cols, dtype=torch.long)
    targets[torch.arange(rows), torch.randint(cols, (rows,), generator=gen)] = 1  # one positive per image
    targets[0, :4] = torch.tensor([1, 0, 0, 1])
    targets[-1] = 0  # an image without a positive
    return logits, targets


# (name, constructor kwargs, reference kwargs)
CASES = [
    ("an-ls", {}, {}),
    ("an-ls", {"epsilon": 0.25}, {"epsilon": 0.25}),
    ("an-ls", {"epsilon": 0.0}, {"epsilon": 0.0}),
    ("wan", {}, {}),
    ("epr", {"expected_positives": 1.5}, {"expected_positives": 1.5}),
    ("epr", {"expected_positives": 2.9}, {"expected_positives": 2.9}),
    ("em", {}, {}),
    ("em", {"alpha": 0.2}, {"alpha": 0.2}),
    ("gr", {}, {}),
    ("gr", {"k": (1.8, -2.0), "v": (0.8, 0.5)}, {"k": (1.8, -2.0), "v": (0.8, 0.5)}),
    ("gr", {"k": (-1.0, 0.5), "v": (0.3, 0.1), "q": (0.5, 2.0)}, {"k": (-1.0, 0.5), "v": (0.3, 0.1), "q": (0.5, 2.0)}),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


@pytest.mark.parametrize(("name", "kwargs", "ref_kw"), CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matrix_and_reductions_match_the_slow_reference(name, kwargs, ref_kw, seed) -> None:
    logits, targets = _case(seed)
    expected_matrix = _ref_matrix(name, logits, targets, **ref_kw)
    for reduction in ("sum", "mean"):
        loss = make_base_loss(name, reduction=reduction, **kwargs)
        torch.testing.assert_close(loss.loss_matrix(logits, targets), expected_matrix, rtol=1e-10, atol=1e-12)
        expected = _ref_loss(name, logits, targets, reduction, **ref_kw)
        torch.testing.assert_close(loss(logits, targets), expected, rtol=1e-10, atol=1e-12)
        # float32 logits compute in float32 and agree to float32 precision.
        out32 = loss(logits.float(), targets)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), expected, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "kwargs", "ref_kw"), CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients_match_the_reference_autograd(name, kwargs, ref_kw, reduction) -> None:
    base, targets = _case(2)
    logits = base.clone().requires_grad_(True)
    make_base_loss(name, reduction=reduction, **kwargs)(logits, targets).backward()
    ref_logits = base.clone().requires_grad_(True)
    _ref_loss(name, ref_logits, targets, reduction, **ref_kw).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["an-ls", "wan", "epr", "em"])
def test_gradcheck_float64(name: str) -> None:
    # GR-Loss is left out: its K and V are detached on purpose, so its gradient is not the derivative of its value
    # (see test_gr_gradient_treats_k_and_v_as_constants).
    logits, targets = _case(3, rows=3, cols=4, scale=2.0)
    logits.requires_grad_(True)
    loss = make_base_loss(name, reduction="mean", **REQUIRED.get(name, {}))
    assert torch.autograd.gradcheck(lambda x: loss(x, targets), (logits,))


def test_gr_gradient_treats_k_and_v_as_constants() -> None:
    # d/dx of V [K (1 - p^q2)/q2 + (1 - K)(1 - (1 - p)^q3)/q3] with K, V held fixed and dp/dx = p (1 - p):
    # V [-K p^q2 (1 - p) + (1 - K) p (1 - p)^q3]; a positive's d(-log p)/dx = p - 1.
    logits, targets = _case(4, rows=3, cols=5, scale=2.0)
    logits.requires_grad_(True)
    (w, b), (mu, sigma), (q2, q3) = (1.2, -2.0), (0.6, 0.7), (0.3, 1.5)
    GRLoss(k=(w, b), v=(mu, sigma), q=(q2, q3))(logits, targets).backward()
    p = torch.sigmoid(logits.detach())
    weight_k, weight_v = torch.sigmoid(w * p + b), torch.exp(-((p - mu) ** 2) / (2 * sigma**2))
    unknown = weight_v * (-weight_k * p**q2 * (1 - p) + (1 - weight_k) * p * (1 - p) ** q3)
    torch.testing.assert_close(logits.grad, torch.where(targets.bool(), p - 1, unknown), rtol=1e-10, atol=1e-12)


# --- numbers worked by hand --------------------------------------------------------------------------------------
# Logits 0, ln 3, -ln 3 give p = 1/2, 3/4, 1/4, so -log p is ln 2, ln(4/3), ln 4 and -log(1 - p) is ln 2, ln 4,
# ln(4/3). Two images, three classes, one observed positive each:
#   p       = [[1/2, 3/4, 1/4], [3/4, 1/2, 1/4]]
#   targets = [[1,   0,   0  ], [0,   0,   1  ]]
LN3 = math.log(3.0)
HAND_LOGITS = torch.tensor([[0.0, LN3, -LN3], [LN3, 0.0, -LN3]], dtype=torch.float64)
HAND_TARGETS = torch.tensor([[1, 0, 0], [0, 0, 1]])
L2, L43, L4 = math.log(2.0), math.log(4.0 / 3.0), math.log(4.0)
H34 = 0.75 * L43 + 0.25 * L4  # entropy of p = 3/4 (and of 1/4)


def _hand_gr_unknown(p: float, w: float, b: float, mu: float, sigma: float) -> float:
    # q = (1/2, 1): (1 - p^(1/2)) / (1/2) = 2 (1 - sqrt p) and (1 - (1 - p)^1) / 1 = p.
    weight_k = 1.0 / (1.0 + math.exp(-(w * p + b)))
    weight_v = math.exp(-((p - mu) ** 2) / (2 * sigma**2))
    return weight_v * (weight_k * 2 * (1 - math.sqrt(p)) + (1 - weight_k) * p)


HAND = {
    # (1-e)(-log p) + e(-log(1-p)) for positives, (1-e)(-log(1-p)) + e(-log p) for unknowns, e = 0.1.
    "an-ls": (
        {},
        [[L2, 0.9 * L4 + 0.1 * L43, 0.9 * L43 + 0.1 * L4], [0.9 * L4 + 0.1 * L43, L2, 0.9 * L4 + 0.1 * L43]],
        0.0,
    ),
    # Unknowns' -log(1 - p) / (C - 1) = / 2.
    "wan": ({}, [[L2, L4 / 2, L43 / 2], [L4 / 2, L2 / 2, L4]], 0.0),
    # Positives only; both images predict 1/2 + 3/4 + 1/4 = 3/2 labels, k = 1: (3/2 - 1)^2 / 3^2 = 1/36.
    "epr": ({"expected_positives": 1.0}, [[L2, 0.0, 0.0], [0.0, 0.0, L4]], 1.0 / 36.0),
    # Unknowns: -0.2 H(p), H(1/2) = ln 2, H(3/4) = H(1/4) = 3/4 ln(4/3) + 1/4 ln 4.
    "em": ({"alpha": 0.2}, [[L2, -0.2 * H34, -0.2 * H34], [-0.2 * H34, -0.2 * L2, L4]], 0.0),
    "gr": (
        {"k": (2.0, -2.0), "v": (0.5, 1.0), "q": (0.5, 1.0)},
        [
            [L2, _hand_gr_unknown(0.75, 2, -2, 0.5, 1), _hand_gr_unknown(0.25, 2, -2, 0.5, 1)],
            [_hand_gr_unknown(0.75, 2, -2, 0.5, 1), _hand_gr_unknown(0.5, 2, -2, 0.5, 1), L4],
        ],
        0.0,
    ),
}


@pytest.mark.parametrize("name", NAMES)
def test_hand_worked_values(name: str) -> None:
    kwargs, matrix, penalty = HAND[name]
    expected = torch.tensor(matrix, dtype=torch.float64)
    for reduction in ("sum", "mean"):
        loss = make_base_loss(name, reduction=reduction, **kwargs)
        torch.testing.assert_close(loss.loss_matrix(HAND_LOGITS, HAND_TARGETS), expected, rtol=1e-12, atol=1e-14)
        value = loss(HAND_LOGITS, HAND_TARGETS).item()
        mean = sum(map(sum, matrix)) / 6 + penalty  # B * C = 6; the regulariser once
        assert value == pytest.approx(mean if reduction == "mean" else 6 * mean, rel=1e-12)


def test_hand_worked_gr_with_the_default_exponents() -> None:
    # q = (0.01, 1), k = (0, -2): K = sigmoid(-2) everywhere; v = (0.5, 2): V(1/2) = 1, V(3/4) = exp(-1/128).
    k_const = 1.0 / (1.0 + math.exp(2.0))
    v_34 = math.exp(-(0.25**2) / 8)
    expected = v_34 * (k_const * (1 - 0.75**0.01) / 0.01 + (1 - k_const) * 0.75)
    out = GRLoss().loss_matrix(HAND_LOGITS, HAND_TARGETS)
    assert out[0, 1].item() == pytest.approx(expected, rel=1e-12)
    assert out[1, 1].item() == pytest.approx(k_const * (1 - 0.5**0.01) / 0.01 + (1 - k_const) * 0.5, rel=1e-12)


def test_hand_worked_pure_functions() -> None:
    p = torch.tensor([[0.5, 0.75, 0.25], [0.75, 0.5, 0.25]], dtype=torch.float64)
    assert expected_positive_penalty(p, 1.0).item() == pytest.approx(1.0 / 36.0, rel=1e-14)
    assert expected_positive_penalty(p, 1.5).item() == 0.0
    entropy = binary_entropy(HAND_LOGITS)
    torch.testing.assert_close(entropy, torch.tensor([[L2, H34, H34], [H34, L2, H34]], dtype=torch.float64))


def test_special_cases_reduce_to_simpler_losses() -> None:
    logits, targets = _case(5)
    an = make_base_loss("an")(logits, targets)
    torch.testing.assert_close(ANLabelSmoothingLoss(epsilon=0.0)(logits, targets), an)
    positives_only = EPRLoss(expected_positives=1.0).loss_matrix(logits, targets)
    torch.testing.assert_close(EntropyMaximizationLoss(alpha=0.0).loss_matrix(logits, targets), positives_only)
    # WAN with two classes weights unknowns by 1: AN.
    torch.testing.assert_close(
        WeightedANLoss()(logits[:, :2], targets[:, :2]), make_base_loss("an")(logits[:, :2], targets[:, :2])
    )


@pytest.mark.parametrize("name", NAMES)
def test_sum_is_b_times_c_times_mean(name: str) -> None:
    logits, targets = _case(6)
    kwargs = REQUIRED.get(name, {})
    total = make_base_loss(name, reduction="sum", **kwargs)(logits, targets)
    mean = make_base_loss(name, reduction="mean", **kwargs)(logits, targets)
    torch.testing.assert_close(total, logits.numel() * mean, rtol=1e-12, atol=1e-12)


def test_epr_adds_its_regulariser_once_per_batch() -> None:
    logits, targets = _case(7)
    loss = EPRLoss(expected_positives=2.0, reduction="mean")
    matrix = loss.loss_matrix(logits, targets)
    penalty = loss.penalty(logits)
    torch.testing.assert_close(penalty, _epr_penalty(logits, 2.0), rtol=1e-12, atol=1e-15)
    assert penalty.item() > 0
    torch.testing.assert_close(loss(logits, targets), matrix.mean() + penalty)


def test_an_ls_wan_epr_em_are_the_authors_formulas_up_to_their_log_epsilon() -> None:
    # Cole et al. and Zhou et al. compute -log(x + 1e-5) from probabilities; ours differs by log(1 + 1e-5 / x) per
    # term, under 2.1e-4 where every p and 1 - p is at least sigmoid(-3) = 0.047.
    gen = torch.Generator().manual_seed(8)
    logits = 6 * torch.rand(6, 5, generator=gen, dtype=torch.float64) - 3
    targets = torch.zeros(6, 5, dtype=torch.long)
    targets[torch.arange(6), torch.arange(6) % 5] = 1
    y, p = targets.double(), torch.sigmoid(logits)

    def neg_log(x):
        return -torch.log(x + 1e-5)

    theirs = {
        "an-ls": y * (0.9 * neg_log(p) + 0.1 * neg_log(1 - p)) + (1 - y) * (0.9 * neg_log(1 - p) + 0.1 * neg_log(p)),
        "wan": y * neg_log(p) + (1 - y) * neg_log(1 - p) / 4,
        "epr": y * neg_log(p),
        "em": y * neg_log(p) - (1 - y) * 0.1 * (p * neg_log(p) + (1 - p) * neg_log(1 - p)),
    }
    for name, matrix in theirs.items():
        ours = make_base_loss(name, **REQUIRED.get(name, {})).loss_matrix(logits, targets)
        torch.testing.assert_close(ours, matrix, rtol=0, atol=2.5e-4)


# --- extremes, precision, degenerate batches ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_extreme_logits_give_finite_losses_and_gradients(name: str, dtype: torch.dtype, reduction: str) -> None:
    row = [-1e4, -200.0, -100.0, -20.0, 0.0, 20.0, 100.0, 200.0, 1e4]
    logits = torch.tensor([row, row], dtype=dtype, requires_grad=True)
    targets = torch.tensor([[0] * 9, [1] * 9])
    kwarg_sets = [REQUIRED.get(name, {})]
    if name == "gr":
        kwarg_sets += [{"k": GR_K_END, "v": GR_V_END}, {"q": (0.001, 3.0), "v": (0.5, 0.01)}]
    for kwargs in kwarg_sets:
        logits.grad = None
        out = make_base_loss(name, reduction=reduction, **kwargs)(logits, targets)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(logits.grad).all(), kwargs


def test_binary_entropy_tails() -> None:
    x = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4], requires_grad=True)
    h = binary_entropy(x)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(x.grad).all()
    assert h[0].item() == 0.0 and h[-1].item() == 0.0 and h[2].item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_and_autocast_compute_in_float32(name: str) -> None:
    logits, targets = _case(9)
    low = logits.to(torch.bfloat16)
    loss = make_base_loss(name, **REQUIRED.get(name, {}))
    ref = loss(low.float(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(low, targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert loss(logits.half(), targets).dtype == torch.float32
    assert loss(logits, targets).dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_batches_are_finite(name: str) -> None:
    loss = make_base_loss(name, **REQUIRED.get(name, {}))
    logits = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    for targets in (torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]])):
        assert torch.isfinite(loss(logits, targets))


def test_wan_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="C >= 2"):
        WeightedANLoss()(torch.zeros(3, 1), torch.ones(3, 1))


# --- GR-Loss's schedule and its per-call scalars -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, (0.0, -2.0, 0.53, 1.85)),  # first: (w, b) at the start, (mu, sigma) one step of 1/10 along
        (4, (0.8, -2.0, 0.65, 1.25)),  # middle: w = 2 * 4/10, mu = 0.5 + 0.3 * 5/10, sigma = 2 - 1.5 * 5/10
        (9, (1.8, -2.0, 0.8, 0.5)),  # last: (mu, sigma) at the end, w one step short of 2
    ],
)
def test_gr_schedule_first_middle_last_epoch(epoch: int, expected: tuple[float, ...]) -> None:
    out = gr_schedule(epoch, 10)
    assert isinstance(out, GRSchedule)
    assert out == pytest.approx(expected, abs=1e-12)


def test_gr_schedule_with_linear_initialisation_and_other_lengths() -> None:
    # n = 2 of T = 10: both stay at the start for the two linear epochs, then move over T - n = 8 steps.
    assert gr_schedule(0, 10, linear_init_epochs=2) == pytest.approx((0.0, -2.0, 0.5, 2.0))
    assert gr_schedule(1, 10, linear_init_epochs=2) == pytest.approx((0.0, -2.0, 0.5, 2.0))
    assert gr_schedule(2, 10, linear_init_epochs=2) == pytest.approx((0.0, -2.0, 0.5375, 1.8125))
    assert gr_schedule(9, 10, linear_init_epochs=2) == pytest.approx((1.75, -2.0, 0.8, 0.5))
    # Their default run length, 8 epochs.
    assert gr_schedule(0, 8) == pytest.approx((0.0, -2.0, 0.5375, 1.8125))
    assert gr_schedule(7, 8) == pytest.approx((1.75, -2.0, 0.8, 0.5))
    assert gr_schedule(0, 1) == pytest.approx((0.0, -2.0, 0.8, 0.5))
    # Custom end points move b as well.
    assert gr_schedule(5, 6, k_start=(1.0, 0.0), k_end=(3.0, -6.0)) == pytest.approx((1 + 2 * 5 / 6, -5.0, 0.8, 0.5))


def test_gr_schedule_moves_k_one_epoch_after_v_and_linearly() -> None:
    total = 12
    rows = [gr_schedule(t, total) for t in range(total)]

    def k_share(row: GRSchedule) -> float:
        return (row.w - GR_K_START[0]) / (GR_K_END[0] - GR_K_START[0])

    def v_share(row: GRSchedule) -> float:
        return (row.mu - GR_V_START[0]) / (GR_V_END[0] - GR_V_START[0])

    for t in range(total):
        assert k_share(rows[t]) == pytest.approx(t / total)
        assert v_share(rows[t]) == pytest.approx((t + 1) / total)
        assert (rows[t].sigma - GR_V_START[1]) / (GR_V_END[1] - GR_V_START[1]) == pytest.approx((t + 1) / total)
        assert rows[t].b == GR_K_START[1]
        if t > 0:
            assert k_share(rows[t]) == pytest.approx(v_share(rows[t - 1]))


def test_gr_per_call_scalars_equal_a_loss_built_with_them() -> None:
    logits, targets = _case(10)
    schedule = gr_schedule(6, 10)
    built = GRLoss(k=(schedule.w, schedule.b), v=(schedule.mu, schedule.sigma), reduction="mean")
    per_call = GRLoss(reduction="mean")
    torch.testing.assert_close(per_call(logits, targets, **schedule.loss_kwargs()), built(logits, targets))
    torch.testing.assert_close(
        per_call.loss_matrix(logits, targets, k=(schedule.w, schedule.b)),
        GRLoss(k=(schedule.w, schedule.b)).loss_matrix(logits, targets),
    )
    assert not torch.allclose(per_call(logits, targets), built(logits, targets))  # the call did not stick
    assert schedule.loss_kwargs() == {"k": (schedule.w, schedule.b), "v": (schedule.mu, schedule.sigma)}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((10, 10), {}, r"epoch must be an integer in \[0, 10\)"),
        ((-1, 10), {}, "epoch must be"),
        ((1.0, 10), {}, "epoch must be"),
        ((0, 0), {}, "num_epochs must be an integer >= 1"),
        ((0, 5), {"linear_init_epochs": 5}, "linear_init_epochs .5. must be < num_epochs"),
        ((0, 5), {"linear_init_epochs": -1}, "linear_init_epochs must be an integer >= 0"),
        ((0, 5), {"v_end": (0.8, 0.0)}, "sigma must be > 0"),
        ((0, 5), {"k_start": (0.0,)}, "k_start must be a pair"),
        ((0, 5), {"k_end": (math.nan, 0.0)}, "k_end must be a pair"),
    ],
)
def test_gr_schedule_rejects_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        gr_schedule(*args, **kwargs)


def test_gr_rejects_bad_per_call_scalars() -> None:
    x, y = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma > 0"):
        GRLoss()(x, y, v=(0.5, 0.0))
    with pytest.raises(ValueError, match="k must be a pair"):
        GRLoss()(x, y, k=(1.0, 2.0, 3.0))


# --- factory and bad input ----------------------------------------------------------------------------------------


def test_factory_registers_the_single_positive_losses_with_their_defaults() -> None:
    expected = {
        "an-ls": ANLabelSmoothingLoss,
        "wan": WeightedANLoss,
        "epr": EPRLoss,
        "em": EntropyMaximizationLoss,
        "gr": GRLoss,
    }
    for name, cls in expected.items():
        assert BASE_LOSSES[name] is cls
        loss = make_base_loss(name, **REQUIRED.get(name, {}))
        assert type(loss) is cls and loss.reduction == "sum"
    assert make_base_loss("an-ls").epsilon == 0.1
    assert make_base_loss("em").alpha == 0.1
    gr = make_base_loss("gr")
    assert (gr.k, gr.v, gr.q) == ((0.0, -2.0), (0.5, 2.0), (0.01, 1.0))
    epr = make_base_loss("epr", expected_positives=2.9, reduction="mean")
    assert (epr.expected_positives, epr.reduction) == (2.9, "mean")
    assert "expected_positives=2.9" in repr(epr)
    with pytest.raises(ValueError, match=r"missing required argument\(s\) \['expected_positives'\] of EPRLoss"):
        make_base_loss("epr")
    with pytest.raises(ValueError, match="unknown argument.*'beta'"):
        make_base_loss("em", beta=0.5)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("an-ls", {"epsilon": -0.1}, "epsilon"),
        ("an-ls", {"epsilon": 0.6}, "epsilon"),
        ("epr", {"expected_positives": 0.0}, "expected_positives"),
        ("epr", {"expected_positives": math.inf}, "expected_positives"),
        ("epr", {"expected_positives": True}, "expected_positives"),
        ("em", {"alpha": -1.0}, "alpha"),
        ("em", {"alpha": math.nan}, "alpha"),
        ("gr", {"k": (1.0,)}, "k must be a pair"),
        ("gr", {"k": "ab"}, "k must be a pair"),
        ("gr", {"v": (0.5, -1.0)}, "sigma > 0"),
        ("gr", {"q": (0.0, 1.0)}, r"q = \(q2, q3\) must both be > 0"),
        ("gr", {"q": (0.01, math.inf)}, "q must be a pair"),
        ("wan", {"reduction": "none"}, "reduction"),
    ],
)
def test_bad_hyperparameters(name: str, kwargs: dict, match: str) -> None:
    kwargs = {**REQUIRED.get(name, {}), **kwargs}
    with pytest.raises(ValueError, match=match):
        make_base_loss(name, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_bad_tensors(name: str) -> None:
    loss = make_base_loss(name, **REQUIRED.get(name, {}))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same 2-D shape"):
        loss(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="empty"):
        loss(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="floating point"):
        loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets must be in"):
        loss(x, torch.full((2, 3), 0.5))
    with pytest.raises(TypeError):
        loss(x.numpy(), torch.zeros(2, 3))
    unchecked = make_base_loss(name, check_values=False, **REQUIRED.get(name, {}))
    assert torch.isfinite(unchecked(x, torch.full((2, 3), 2.0)))
