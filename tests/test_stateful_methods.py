"""The methods with their own state (ROLE, LL-Ct, LL-Cp, EM + APL), BoostLU's head, GR-Loss's schedule in the
objective, the optimiser's groups and early stopping: each against a slow float64 loop restatement of its formula
(gradients included), its schedule, numbers worked by hand, and end to end (the command line trains it; a run killed
and resumed ends as an uninterrupted one)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clml_core.build import EarlyStop, build_objective, optimizer_groups
from clml_core.config import OptimConfig, apply_updates, resolve_config, validate_config
from clml_core.engine import train
from clml_core.losses import GRLoss, gr_schedule
from clml_core.losses.stateful import (
    EntropyMaximizationAPL,
    LargeLossCorrection,
    MethodContext,
    RoleLoss,
    apl_quota,
    apl_select,
    logit,
    make_stateful_loss,
    role_terms,
)
from clml_core.models import BoostLUClassifier, MultiLabelNet, SmallCNN, build_model, param_groups
from clml_core.objective import BaseLossInputs, Batch, CorrectionSchedule, TrainingObjective
from clml_core.paths import PROJ_ROOT

NO_CORRECTION = CorrectionSchedule(enabled=False, start_epoch=0, tau=0.5, quantile=None, feeds_base=False)


def _data(b=5, c=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=generator, dtype=torch.float64) * 2
    targets = torch.zeros(b, c, dtype=torch.bool)
    targets[torch.arange(b), torch.randint(c, (b,), generator=generator)] = True  # one positive per image
    return logits, targets


def _nlog(p):
    return -math.log(p)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _grads(fn, *tensors):
    """The value of fn and its gradients with respect to the tensors (float64 leaves)."""
    leaves = [t.detach().clone().double().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


# ---------------------------------------------------------------------------------------------------------- ROLE


def role_reference(logits, estimate, targets, k):
    """Cole et al.'s loss_role, entry by entry in float64 (mean reduction), with the detaches written out."""
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        for j in range(c):
            f, g = torch.sigmoid(logits[i, j]), torch.sigmoid(estimate[i, j])
            fd, gd = f.detach(), g.detach()
            pos = (-torch.log(f) - torch.log(g)) if targets[i, j] else 0.0
            cross_f = -(gd * torch.log(f) + (1 - gd) * torch.log(1 - f))
            cross_g = -(fd * torch.log(g) + (1 - fd) * torch.log(1 - g))
            total = total + 0.5 * pos + 0.5 * (cross_f + cross_g)
    f_count = sum(torch.sigmoid(logits[i]).sum() for i in range(b)) / b
    g_count = sum(torch.sigmoid(estimate[i]).sum() for i in range(b)) / b
    penalty = 0.5 * ((f_count - k) ** 2 / c**2 + (g_count - k) ** 2 / c**2)
    return total / (b * c) + penalty


def test_role_matches_the_loop_reference_with_gradients():
    logits, targets = _data()
    estimate = torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def ours(x, z):
        matrix, penalty = role_terms(x, z, targets, 1.5)
        return matrix.mean() + penalty

    value, grads = _grads(ours, logits, estimate)
    ref_value, ref_grads = _grads(lambda x, z: role_reference(x, z, targets, 1.5), logits, estimate)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_role_by_hand():
    # One image, two classes, every logit 0 (f = g = 1/2), the first class observed, k = 1 (so no penalty).
    # Positive entry: 0.5 (log 2 + log 2) + 0.5 (log 2 + log 2) = 2 log 2; the unknown: 0.5 (log 2 + log 2) = log 2.
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    estimate = torch.zeros(1, 2, dtype=torch.float64)
    matrix, penalty = role_terms(logits, estimate, torch.tensor([[True, False]]), 1.0)
    torch.testing.assert_close(matrix, torch.tensor([[2 * math.log(2), math.log(2)]], dtype=torch.float64))
    assert float(penalty.detach()) == 0.0
    (matrix.mean() + penalty).backward()
    # d/dx: 0.5 (f - 1) + 0.5 (f - g) = -1/4 on the positive, 0.5 (f - g) = 0 on the unknown, each / (B C = 2).
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.125, 0.0]], dtype=torch.float64))


def test_role_estimate_starts_as_cole_and_trains_only_the_batch_rows():
    observed = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    before = torch.random.get_rng_state()
    role = RoleLoss(observed, expected_positives=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)  # its own generator, not the global one
    start = role.estimate_logits.detach()
    assert torch.allclose(start[observed.bool()], torch.tensor(logit(0.995)))
    unknown = start[~observed.bool()]
    assert ((unknown >= logit(0.4)) & (unknown <= logit(0.6))).all() and unknown.std() > 0.05
    assert torch.equal(RoleLoss(observed, 1.0, seed=7).estimate_logits, role.estimate_logits)
    assert not torch.equal(RoleLoss(observed, 1.0, seed=8).estimate_logits, role.estimate_logits)
    logits = torch.randn(2, 3, requires_grad=True)
    loss = role(logits, observed[[2, 0]].float(), torch.tensor([2, 0]), epoch=0)
    loss.backward()
    rows_with_gradient = role.estimate_logits.grad.abs().sum(1) > 0
    assert rows_with_gradient.tolist() == [True, False, True, False]
    # "sum" is B * C times "mean", regulariser included.
    mean = RoleLoss(observed, 1.0, seed=7, reduction="mean")
    summed = RoleLoss(observed, 1.0, seed=7, reduction="sum")
    args = (logits.detach(), observed[[2, 0]], torch.tensor([2, 0]), 0)
    torch.testing.assert_close(summed(*args), 6 * mean(*args))


# ------------------------------------------------------------------------------------------------------- LL-Ct/Cp


def ll_reference(logits, targets, k):
    """BCE against the targets with the k unknown entries of largest BCE (loop over sorted entries) made positive;
    float64, mean over B * C."""
    b, c = logits.shape
    unknown = sorted(
        ((float(F.softplus(logits[i, j].detach())), i, j) for i in range(b) for j in range(c) if not targets[i, j]),
        reverse=True,
    )
    chosen = {(i, j) for _, i, j in unknown[:k]}
    total = 0.0
    for i in range(b):
        for j in range(c):
            p = torch.sigmoid(logits[i, j])
            positive = bool(targets[i, j]) or (i, j) in chosen
            total = total + (-torch.log(p) if positive else -torch.log(1 - p))
    return total / (b * c), chosen


@pytest.mark.parametrize("permanent", [False, True], ids=["ct", "cp"])
@pytest.mark.parametrize("epoch", [0, 1, 3])
def test_ll_correction_matches_the_loop_reference_with_gradients(permanent, epoch):
    logits, targets = _data(b=6, c=5)
    rate = 0.1
    method = LargeLossCorrection(torch.zeros(6, 5), rate, permanent=permanent, reduction="mean")
    index = torch.arange(6)
    # Cp's k is constant, Ct's grows: ceil(B C rate t) at 0-based epoch t; none in the first epoch.
    k = 0 if epoch == 0 else math.ceil(30 * rate) if permanent else math.ceil(round(30 * rate * epoch, 6))
    value, (grad,) = _grads(lambda x: method(x, targets, index, epoch), logits)
    ref_value, (ref_grad,) = _grads(lambda x: ll_reference(x, targets, k)[0], logits)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_ll_schedule():
    observed = torch.zeros(4, 3)
    ct = LargeLossCorrection(observed, 0.002, permanent=False)
    cp = LargeLossCorrection(observed, 0.002, permanent=True)
    assert [ct.correction_rate(t) for t in range(4)] == [0.0, 0.002, 0.004, 0.006]
    assert [cp.correction_rate(t) for t in range(4)] == [0.0, 0.002, 0.002, 0.002]
    assert LargeLossCorrection(observed, 0.4).correction_rate(5) == 1.0  # capped at every entry


def test_ll_by_hand():
    # Logits (0, 2, -1, 1), the first observed, k = ceil(4 * 0.25) = 1: the unknown with the largest BCE is logit 2
    # (softplus 2.127 > 1.313 > 0.313), now a positive: softplus(-2) = 0.1269; the others keep theirs.
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]], dtype=torch.float64)
    ct = LargeLossCorrection(torch.zeros(1, 4), 0.25, reduction="mean")
    expected = (math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 4
    value = ct(logits, torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0]), epoch=1)
    assert float(value) == pytest.approx(expected, rel=1e-12)
    assert float(value) == pytest.approx(0.61165, abs=1e-5)


def test_ll_cp_really_flips_into_its_label_matrix():
    # The LL repository tests `mod_scheme is 'LL-Cp'`, always False, so its Cp never writes a label; ours does.
    logits, targets = _data(b=6, c=5)
    observed = targets.clone()
    cp = LargeLossCorrection(observed, 0.1, permanent=True)
    ct = LargeLossCorrection(observed, 0.1, permanent=False)
    assert "labels" in cp.state_dict() and not ct.state_dict()  # Ct keeps no state
    index = torch.arange(6)
    cp(logits, targets, index, epoch=0)
    assert torch.equal(cp.labels, observed)  # nothing in the first epoch
    cp(logits, targets, index, epoch=1)
    _, chosen = ll_reference(logits, targets, 3)  # k = ceil(30 * 0.1) = 3
    flipped = cp.labels & ~observed
    assert {tuple(e) for e in flipped.nonzero().tolist()} == chosen
    # Next epoch the flipped entries are positives: they do not compete again, three new ones are flipped.
    cp(logits, targets, index, epoch=2)
    assert int((cp.labels & ~observed).sum()) == 6
    # The loss at epoch 2 is BCE against observed + the 3 old flips + the 3 new ones.
    matrix_targets = cp.labels.clone()
    cp_again = LargeLossCorrection(observed, 0.1, permanent=True, reduction="mean")
    cp_again.load_state_dict({"labels": observed | flipped})
    value = cp_again(logits, targets, index, epoch=2)
    expected = F.binary_cross_entropy_with_logits(logits, matrix_targets.double())
    torch.testing.assert_close(value, expected)


# ------------------------------------------------------------------------------------------------------- EM + APL


def em_apl_reference(logits, targets, pseudo, soft, alpha, beta):
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        for j in range(c):
            p = torch.sigmoid(logits[i, j])
            if targets[i, j]:
                total = total - torch.log(p)
            elif pseudo[i, j]:
                s = soft[i, j]
                total = total + beta * -(s * torch.log(p) + (1 - s) * torch.log(1 - p))
            else:
                total = total + alpha * (p * torch.log(p) + (1 - p) * torch.log(1 - p))
    return total / (b * c)


def test_em_apl_loss_matches_the_loop_reference_with_gradients():
    logits, targets = _data(b=6, c=4)
    method = EntropyMaximizationAPL(targets, num_epochs=4, alpha=0.2, beta=0.5, warmup=1, reduction="mean")
    pseudo = torch.zeros(6, 4, dtype=torch.bool)
    pseudo[[0, 2, 3], [1, 2, 0]] = True
    pseudo &= ~targets
    soft = torch.rand(6, 4, generator=torch.Generator().manual_seed(1))
    method.load_state_dict({"pseudo": pseudo, "soft": soft, "refreshed": torch.tensor(1)})
    value, (grad,) = _grads(lambda x: method(x, targets, torch.arange(6), 2), logits)
    ref_value, (ref_grad,) = _grads(lambda x: em_apl_reference(x, targets, pseudo, soft.double(), 0.2, 0.5), logits)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)  # soft targets are stored in float32
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)


def apl_select_reference(scores, candidates, quota):
    chosen = torch.zeros_like(candidates)
    for c in range(scores.shape[1]):
        rows = sorted((float(scores[n, c]), n) for n in range(scores.shape[0]) if candidates[n, c])
        for _, n in rows[: int(quota[c])]:
            chosen[n, c] = True
    return chosen


def test_apl_selection_and_quota():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 5, generator=generator).round(decimals=1)  # many ties: broken by row
    candidates = torch.rand(40, 5, generator=generator) > 0.3
    quota = torch.tensor([0, 3, 7, 100, 1])
    assert torch.equal(apl_select(scores, candidates, quota), apl_select_reference(scores, candidates, quota))
    # floor(0.9 U / (E - W)): 10 -> 1.8 -> 1, 7 -> 1.26 -> 1, 0 -> 0; 0.7 * 90 / 7 is 8.999999999999998 in floats.
    assert apl_quota(torch.tensor([10, 7, 0]), 0.9, 10, 5).tolist() == [1, 1, 0]
    assert apl_quota(torch.tensor([90]), 0.7, 8, 1).tolist() == [9]


def test_apl_refresh_schedule_by_hand():
    # One class; row 0 observed; E = 3 epochs, warm-up 1: refreshes at the start of epochs 1 and 2, each of
    # floor(0.9 * 3 / 2) = 1 entry, the lowest-scored unknown not yet taken, with its score as soft target.
    method = EntropyMaximizationAPL(torch.tensor([[1], [0], [0], [0]]), num_epochs=3, warmup=1, reduction="mean")
    scores = torch.tensor([[0.05], [0.3], [0.1], [0.2]])
    assert [method.wants_scores(t) for t in range(4)] == [False, True, True, False]
    method.refresh(0, scores)  # in the warm-up: nothing
    assert not method.pseudo.any()
    method.refresh(1, scores)
    assert method.pseudo[:, 0].tolist() == [False, False, True, False] and float(method.soft[2, 0]) == pytest.approx(
        0.1
    )
    assert not method.wants_scores(1)  # once per epoch: a second call changes nothing
    method.refresh(1, torch.zeros(4, 1))
    assert int(method.pseudo.sum()) == 1
    method.refresh(2, torch.tensor([[0.0], [0.3], [0.9], [0.25]]))
    assert method.pseudo[:, 0].tolist() == [False, False, True, True]
    assert method.soft[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.1, 0.25])  # the first soft target stays
    # Logits 0: -log(1/2) on the positive, -alpha log 2 on the unknown, beta log 2 on the pseudo-labelled ones.
    value = method(torch.zeros(4, 1), torch.tensor([[1.0], [0], [0], [0]]), torch.arange(4), 2)
    assert float(value) == pytest.approx((1 - 0.1 + 2 * 0.2) * math.log(2) / 4)


def test_apl_takes_at_most_its_share_over_the_run():
    observed = torch.zeros(50, 3)
    observed[:10, 0] = 1
    method = EntropyMaximizationAPL(observed, num_epochs=10, warmup=4)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(10):
        method.refresh(epoch, torch.rand(50, 3, generator=generator))
    unknown = (observed == 0).sum(0)
    assert method.pseudo.sum(0).tolist() == (6 * torch.floor(0.9 * unknown / 6)).long().tolist()
    assert not (method.pseudo & observed.bool()).any()


def test_stateful_losses_by_name_and_bad_arguments():
    context = MethodContext(torch.tensor([[1, 0], [0, 1]]), num_epochs=4, seed=1, rate_per_epoch=0.1)
    assert isinstance(make_stateful_loss("role", context), RoleLoss)  # k: the context's mean label count
    assert make_stateful_loss("ll-cp", context).permanent and not make_stateful_loss("ll-ct", context).permanent
    assert make_stateful_loss("em-apl", context).warmup == 2  # half the run by default
    with pytest.raises(ValueError, match="unknown argument.*gamma.*accepts"):
        make_stateful_loss("em-apl", context, gamma=1)
    with pytest.raises(ValueError, match="warmup .4. must be < the run's epochs .4."):
        make_stateful_loss("em-apl", context, warmup=4)
    with pytest.raises(ValueError, match="unknown stateful loss 'nope'"):
        make_stateful_loss("nope", context)
    with pytest.raises(ValueError, match="must be in \\{0, 1\\}"):
        RoleLoss(torch.tensor([[2, 0]]), 1.0)
    with pytest.raises(ValueError, match="index must be"):
        RoleLoss(torch.tensor([[1, 0]]), 1.0)(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0, 0]), 0)


# ------------------------------------------------------------------------------------- the objective and the build


def test_objective_hands_a_stateful_method_its_rows_epoch_and_scores():
    observed = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0]])
    calls = []

    def scorer(net):
        calls.append(net)
        return torch.tensor([[0.9, 0.1], [0.2, 0.4], [0.3, 0.8], [0.1, 0.3]])

    method = EntropyMaximizationAPL(observed, num_epochs=2, warmup=1, neg_proportion=1.0)
    objective = TrainingObjective(method, None, NO_CORRECTION, BaseLossInputs(1), scorer=scorer)
    net = nn.Identity()
    objective.epoch_start(0, net)
    assert calls == []  # warm-up: the images are not scored
    objective.epoch_start(1, net)
    assert calls == [net] and method.pseudo.tolist() == [[False, True], [True, True], [True, False], [True, True]]
    state = objective.state_dict()
    assert {"base_loss.pseudo", "base_loss.soft", "base_loss.refreshed"} <= set(state)
    logits = torch.randn(2, 2)
    outputs = type("Out", (), {"logits": logits, "embeddings": torch.zeros(2, 3)})()
    terms = objective(outputs, Batch(None, observed[[3, 1]].float(), torch.tensor([3, 1])), 1)
    torch.testing.assert_close(terms["loss"], method(logits, observed[[3, 1]], torch.tensor([3, 1]), 1))
    fresh = TrainingObjective(
        EntropyMaximizationAPL(observed, num_epochs=2, warmup=1, neg_proportion=1.0), None, NO_CORRECTION,
        BaseLossInputs(1),
    )  # fmt: skip
    fresh.load_state_dict(state)
    fresh.epoch_start(1, net)  # resumed at the start of epoch 1 after its refresh: no scorer needed, no change
    assert torch.equal(fresh.base_loss.pseudo, method.pseudo)


def test_gr_loss_follows_its_schedule_through_the_objective():
    config = resolve_config("smoke", overrides=["loss.base=gr", "optim.epochs=4", "clml.enabled=false"])
    objective = build_objective(config)
    logits, targets = _data(b=4, c=3)
    outputs = type("Out", (), {"logits": logits, "embeddings": torch.zeros(4, 2)})()
    for epoch in range(4):
        got = objective(outputs, Batch(None, targets.double(), torch.arange(4)), epoch)["loss"]
        want = GRLoss()(logits.float(), targets, **gr_schedule(epoch, 4).loss_kwargs())
        torch.testing.assert_close(got, want)
    assert objective.base_inputs.at(3)["k"] == (2.0 * 3 / 4, -2.0)  # w moves one epoch later than (mu, sigma)
    with pytest.raises(ValueError, match="loss.kwargs.*schedule"):
        resolve_config("smoke", overrides=["loss.base=gr", "loss.kwargs={k: [1, 1]}"])


def test_optimizer_groups():
    model = build_model("smallcnn", 3, widths=[4, 8])
    role = RoleLoss(torch.tensor([[1, 0, 0], [0, 1, 0]]), 1.0)
    plain = OptimConfig(lr=0.1, weight_decay=0.01)
    groups = optimizer_groups(model, nn.Module(), plain, 10.0)
    assert groups == param_groups(model, 0.01)  # without extras, exactly the model's groups
    with_role = optimizer_groups(model, role, plain, 10.0)
    assert with_role[-1]["params"] == [role.estimate_logits] and with_role[-1]["lr"] == pytest.approx(1.0)
    assert with_role[-1]["weight_decay"] == 0.0
    boosted = optimizer_groups(model, nn.Module(), OptimConfig(lr=0.1, classifier_lr_mult=10), 1.0)
    classifier = {id(p) for p in model.classifier.parameters()}
    for group in boosted:
        ids = {id(p) for p in group["params"]}
        assert ids <= classifier if group.get("lr") == pytest.approx(1.0) else not ids & classifier
    assert sum(len(g["params"]) for g in boosted) == sum(len(g["params"]) for g in groups)
    optimizer = torch.optim.Adam(boosted, lr=0.1)
    assert sorted({round(g["lr"], 9) for g in optimizer.param_groups}) == [0.1, 1.0]


def test_early_stop_rules():
    rows = [{"val_map": v} for v in (10.0, 12.0, 12.0, 8.5, 9.5)]
    never = EarlyStop()
    assert not any(never.stops(rows[:n]) for n in range(6))
    first = EarlyStop("no_improvement")
    assert [first.stops(rows[:n]) for n in range(1, 6)] == [False, False, True, True, True]  # a tie is no new best
    below = EarlyStop("below_best", 3.0)
    assert [below.stops(rows[:n]) for n in range(1, 6)] == [False, False, False, True, False]  # 3.5 > 3, 2.5 not
    assert EarlyStop("below_best", 3.5).stops(rows[:4]) is False  # more than 3.5 below, not 3.5


def test_config_rejects_contradictions():
    with pytest.raises(ValueError, match="'model.head'.*frozen caches pooled features"):
        resolve_config("cole_linear", overrides=["model.head=boostlu", "data.root=/x"])
    with pytest.raises(ValueError, match="'model.head'.*classify_embeddings"):
        resolve_config("smoke", overrides=["model.head=boostlu", "model.proj_dim=8", "model.classify_embeddings=true"])
    with pytest.raises(ValueError, match="'loss.kwargs'.*warmup .3. must be < the run's epochs .2."):
        resolve_config("smoke", overrides=["loss.base=em-apl", "loss.kwargs={warmup: 3}"])
    with pytest.raises(ValueError, match="'loss.base'.*valid names.*role"):
        resolve_config("smoke", overrides=["loss.base=rol"])
    with pytest.raises(ValueError, match="'optim.early_stop_points'"):
        resolve_config("smoke", overrides=["optim.early_stop_points=3"])
    with pytest.raises(ValueError, match="'loss.estimator_lr_mult'"):
        resolve_config("smoke", overrides=["loss.estimator_lr_mult=0"])


def test_cole_presets_name_each_deviation():
    e2e = resolve_config("cole_e2e", overrides=["data.root=/x"])
    assert (e2e.data.protocol, e2e.data.protocol_seed, e2e.data.val_fraction, e2e.data.val_labels) == (
        "cole", 1200, 0.2, "full"
    )  # fmt: skip
    assert (e2e.optim.weight_decay, e2e.optim.schedule, e2e.optim.epochs, e2e.loss.reduction) == (
        0.0, "constant", 10, "mean"
    )  # fmt: skip
    assert resolve_config("cole_linear", overrides=["data.root=/x"]).model.train_mode == "frozen"
    ll = resolve_config("cole_e2e_ll", overrides=["data.root=/x", "optim.lr=1e-4", "optim.batch_size=8"])
    assert (ll.optim.classifier_lr_mult, ll.optim.early_stop, ll.optim.early_stop_points) == (10, "below_best", 3)
    assert (ll.optim.lr, ll.optim.batch_size) == (1e-4, 8)  # the grid overrides them
    gr = resolve_config("cole_e2e_gr", overrides=["data.root=/x"])
    assert (gr.loss.base, gr.optim.epochs, gr.optim.early_stop_points) == ("gr", 8, 2)
    assert resolve_config("cole_e2e_em", overrides=["data.root=/x"]).optim.early_stop == "no_improvement"
    assert resolve_config("cole_e2e_boostlu", overrides=["data.root=/x"]).model.head == "boostlu"


# --------------------------------------------------------------------------------------------------------- BoostLU


def boostlu_reference(feature_map, weight, bias, alpha):
    """Per image and class: the mean over positions of the CAM value, times alpha where it is positive."""
    b, _, h, w = feature_map.shape
    logits = []
    for i in range(b):
        row = []
        for c in range(weight.shape[0]):
            total = 0.0
            for y in range(h):
                for x in range(w):
                    cam = (weight[c, :, 0, 0] * feature_map[i, :, y, x]).sum() + bias[c]
                    total = total + (alpha * cam if cam > 0 else cam)
            row.append(total / (h * w))
        logits.append(torch.stack(row))
    return torch.stack(logits)


def test_boostlu_matches_the_loop_reference_with_gradients():
    head = BoostLUClassifier(3, 2).double()
    feature_map = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight, bias = head.conv.weight.detach(), head.conv.bias.detach()
    mix = torch.tensor([1.0, 2.0], dtype=torch.float64)  # a weighted sum of the logits, so every gradient counts
    fmap = feature_map.clone().requires_grad_(True)
    value = (head(fmap) * mix).sum()
    value.backward()
    ref_value, ref_grads = _grads(
        lambda f, w, b: (boostlu_reference(f, w, b, 5.0) * mix).sum(), feature_map, weight, bias
    )
    torch.testing.assert_close(value.detach(), ref_value)
    for got, want in zip((fmap.grad, head.conv.weight.grad, head.conv.bias.grad), ref_grads):
        torch.testing.assert_close(got, want)


def test_boostlu_by_hand_and_without_boost():
    head = BoostLUClassifier(1, 1)
    with torch.no_grad():
        head.conv.weight.fill_(1.0)
        head.conv.bias.fill_(0.0)
    # CAM (2, -1, 0, -3): (5 * 2 - 1 + 0 - 3) / 4 = 1.5 (a linear head on the mean would give -0.5).
    assert float(head(torch.tensor([2.0, -1.0, 0.0, -3.0]).view(1, 1, 2, 2)).detach()) == pytest.approx(1.5)
    plain = BoostLUClassifier(4, 3, alpha=1.0)
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(plain.conv.weight.view(3, 4))
        linear.bias.copy_(plain.conv.bias)
    fmap = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(plain(fmap), linear(fmap.mean(dim=(2, 3))))
    with pytest.raises(ValueError, match="alpha"):
        BoostLUClassifier(4, 3, alpha=0.5)


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18", "efficientnet_lite0"])
def test_boostlu_net_keeps_the_pooled_embeddings(arch):
    torch.manual_seed(0)
    linear = build_model(arch, 3, widths=[4, 8] if arch == "smallcnn" else None).eval()
    boosted = build_model(arch, 3, widths=[4, 8] if arch == "smallcnn" else None, classifier_head="boostlu").eval()
    boosted.backbone.load_state_dict(linear.backbone.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = boosted(images), linear(images)
    torch.testing.assert_close(ours.embeddings, theirs.embeddings)
    assert ours.logits.shape == (2, 3) and isinstance(boosted.classifier, BoostLUClassifier)
    with pytest.raises(ValueError, match="feature map"):
        boosted.forward_head(theirs.embeddings)


def test_boostlu_net_rejects_classify_embeddings():
    with pytest.raises(ValueError, match="boostlu"):
        MultiLabelNet(SmallCNN((4,)), 4, 2, proj_dim=3, classify_embeddings=True, classifier_head="boostlu")


# ----------------------------------------------------------------------------------------------------- end to end

FAST = ["progress=false", "threads=1", "data.limit_train=192", "data.protocol=single_positive"]
METHODS = {
    "role": [],
    "ll-ct": ["loss.llr_rate_per_epoch=0.05"],
    "ll-cp": ["loss.llr_rate_per_epoch=0.05"],
    "em-apl": ["loss.kwargs={warmup: 1}"],
}


@pytest.mark.parametrize("setting", [*METHODS, "boostlu"])
def test_the_command_line_trains_each_method(setting, tmp_path):
    extra = ["model.head=boostlu", "loss.base=ll-r"] if setting == "boostlu" else [f"loss.base={setting}"]
    command = [sys.executable, "-m", "clml_core.train", "--preset", "smoke", *FAST, *extra, "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=PROJ_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 < results["test_map"] <= 100 and results["epochs"] == 2 and results["stopped_early"] is False


def _config(method, **sections):
    overrides = [*FAST, f"loss.base={method}", "optim.epochs=3", "checkpoint_every=2", *METHODS[method]]
    config = apply_updates(resolve_config("smoke", overrides=overrides), sections)
    validate_config(config)
    return config


def _outcome(run):
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=["seconds"])
    results = json.loads((run / "results.json").read_text())
    results.pop("train_seconds")
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return metrics, results, last["model"], last["objective"]


def _assert_same(a, b):
    pd.testing.assert_frame_equal(a[0], b[0])
    assert a[1] == b[1]
    for one, other in ((a[2], b[2]), (a[3], b[3])):
        assert one.keys() == other.keys()
        assert all(torch.equal(one[key], other[key]) for key in one)


@pytest.mark.parametrize(
    "method, stop_at",
    [("role", 9), ("ll-ct", 9), ("ll-cp", 9), ("ll-cp", 12), ("em-apl", 9), ("em-apl", 12)],
    ids=["role-mid", "ll-ct-mid", "ll-cp-mid", "ll-cp-boundary", "em-apl-mid", "em-apl-boundary"],
)
def test_a_killed_and_resumed_run_ends_as_an_uninterrupted_one(method, stop_at, tmp_path):
    # 6 steps an epoch. Step 9 is epoch 1, step 3 (the last checkpoint at step 2, after the epoch's hook ran); step 12
    # is the start of epoch 2, whose hook runs before the stop and again on resumption (its checkpoint is older).
    config = _config(method)
    train(config, tmp_path / "whole")
    assert train(config, tmp_path / "cut", max_steps=stop_at) == {}
    train(config, tmp_path / "cut", resume=True)
    whole = _outcome(tmp_path / "whole")
    _assert_same(whole, _outcome(tmp_path / "cut"))
    state = whole[3]
    if method == "ll-cp":  # the stored labels took flips: more positives than observed
        with np.load(tmp_path / "whole" / "train_scores.npz") as seen:
            assert int(state["base_loss.labels"].sum()) > int(seen["observed"].sum())
    if method == "em-apl":
        assert int(state["base_loss.refreshed"]) == 2 and int(state["base_loss.pseudo"].sum()) > 0
    if method == "role":
        assert "base_loss.estimate_logits" in state


def test_early_stop_ends_the_run_and_resumes_where_it_stopped(tmp_path):
    config = resolve_config(
        "smoke", overrides=[*FAST[:3], "optim.epochs=6", "optim.schedule=constant", "optim.early_stop=no_improvement"]
    )
    whole = train(config, tmp_path / "whole")
    rows = pd.read_csv(tmp_path / "whole" / "metrics.csv").to_dict("records")
    assert whole["stopped_early"] and whole["epochs"] == len(rows) < 6
    rule = EarlyStop("no_improvement")
    assert rule.stops(rows) and not any(rule.stops(rows[:n]) for n in range(1, len(rows)))
    assert train(config, tmp_path / "cut", max_steps=6 * len(rows) - 1) == {}
    resumed = train(config, tmp_path / "cut", resume=True)
    assert {k: v for k, v in resumed.items() if k != "train_seconds"} == {
        k: v for k, v in whole.items() if k != "train_seconds"
    }
    assert np.isfinite(resumed["test_map"])


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    """VOCdevkit/VOC2007 with 48 small JPEGs of two colours ('car' red, 'cat' blue), some with a second label."""
    from PIL import Image

    from clml_core.data.voc import VOC_CLASSES

    root = tmp_path_factory.mktemp("voc")
    base = root / "VOCdevkit" / "VOC2007"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.zeros((48, len(VOC_CLASSES)), dtype=int)
    for i in range(48):
        labels[i, VOC_CLASSES.index("car" if i % 2 else "cat")] = 1
        labels[i, i % len(VOC_CLASSES)] |= i % 3 == 0
        colour = np.array((200, 40, 40) if i % 2 else (40, 40, 200)) // 2
        Image.fromarray((rng.integers(0, 60, size=(28, 36, 3)) + colour).astype(np.uint8)).save(
            base / "JPEGImages" / f"{i:06d}.jpg"
        )
    for k, name in enumerate(VOC_CLASSES):
        lines = [f"{i:06d} {1 if labels[i, k] else -1}" for i in range(48)]
        (base / "ImageSets" / "Main" / f"{name}_trainval.txt").write_text("\n".join(lines) + "\n")
    return root


def _voc_config(voc_root, cache, mode):
    data = {"dataset": "voc", "root": str(voc_root), "test_fraction": 0.25, "image_size": 32, "augment": "crop_flip"}
    data.update(cache_dir=str(cache), protocol="single_positive", limit_train=0)
    if mode == "frozen":
        data["feature_views"] = 2
    overrides = {
        "progress": False,
        "threads": 1,
        "data": data,
        "model": {"arch": "efficientnet_lite0", "widths": None, "train_mode": mode},
        "loss": {"base": "em-apl", "kwargs": {"warmup": 1}},
        "clml": {"enabled": False},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-2},
    }
    return resolve_config("smoke", overrides=overrides)


def test_apl_scores_the_training_images_without_augmentation(voc_root, tmp_path):
    from clml_core.build import build_run

    parts = build_run(_voc_config(voc_root, tmp_path, "end_to_end"))
    scorer = parts.objective.scorer
    assert scorer.dataset.transform is parts.splits.val.transform and parts.splits.train.transform is not None
    assert len(scorer.dataset) == len(parts.splits.train)
    first, second = scorer(parts.model), scorer(parts.model)
    assert parts.model.training and torch.equal(first, second)  # the augmentation would draw other crops


def test_apl_in_the_frozen_features_mode(voc_root, tmp_path):
    results = train(_voc_config(voc_root, tmp_path / "cache", "frozen"), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert results["epochs"] == 2 and int(state["base_loss.refreshed"]) == 1 and state["base_loss.pseudo"].any()
