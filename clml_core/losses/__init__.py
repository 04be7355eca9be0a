"""Losses: the CLML term and the base multi-label losses it is added to, the single-positive ones included."""

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

__all__ = [
    "BASE_LOSSES",
    "ANLabelSmoothingLoss",
    "AsymmetricLoss",
    "BCELoss",
    "CLMLLoss",
    "CLMLTerms",
    "EPRLoss",
    "EntropyMaximizationLoss",
    "FocalLoss",
    "GRLoss",
    "GRSchedule",
    "HillLoss",
    "LargeLossRejection",
    "MultiLabelLoss",
    "SPLCLoss",
    "WeightedANLoss",
    "binary_entropy",
    "clml_loss_reference",
    "expected_positive_penalty",
    "gr_schedule",
    "group_nuclear_norms",
    "make_base_loss",
    "nuclear_norm",
]
