"""Losses: the CLML term and the base multi-label losses it is added to, the single-positive ones included, and the
single-positive methods with state of their own (:mod:`clml_core.losses.stateful`)."""

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
)
from clml_core.losses.clml import CLMLLoss, CLMLTerms, clml_loss_reference, group_nuclear_norms, nuclear_norm
from clml_core.losses.single_positive import (
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
from clml_core.losses.stateful import (
    STATEFUL_LOSSES,
    EntropyMaximizationAPL,
    LargeLossCorrection,
    MethodContext,
    RoleLoss,
    StatefulLoss,
    make_stateful_loss,
)

__all__ = [
    "BASE_LOSSES",
    "STATEFUL_LOSSES",
    "ANLabelSmoothingLoss",
    "AsymmetricLoss",
    "BCELoss",
    "CLMLLoss",
    "CLMLTerms",
    "EPRLoss",
    "EntropyMaximizationAPL",
    "EntropyMaximizationLoss",
    "FocalLoss",
    "GRLoss",
    "GRSchedule",
    "HillLoss",
    "LargeLossCorrection",
    "LargeLossRejection",
    "MethodContext",
    "MultiLabelLoss",
    "RoleLoss",
    "SPLCLoss",
    "StatefulLoss",
    "WeightedANLoss",
    "binary_entropy",
    "clml_loss_reference",
    "expected_positive_penalty",
    "gr_schedule",
    "group_nuclear_norms",
    "make_base_loss",
    "make_stateful_loss",
    "nuclear_norm",
]
