"""Losses: the CLML term and the base multi-label losses it is added to."""

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

__all__ = [
    "BASE_LOSSES",
    "AsymmetricLoss",
    "BCELoss",
    "CLMLLoss",
    "CLMLTerms",
    "FocalLoss",
    "HillLoss",
    "LargeLossRejection",
    "MultiLabelLoss",
    "SPLCLoss",
    "clml_loss_reference",
    "group_nuclear_norms",
    "make_base_loss",
    "nuclear_norm",
]
