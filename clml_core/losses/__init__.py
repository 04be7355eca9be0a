"""Losses: the CLML term and the base multi-label losses it is added to."""

from clml_core.losses.clml import CLMLLoss, CLMLTerms, clml_loss_reference, group_nuclear_norms, nuclear_norm

__all__ = ["CLMLLoss", "CLMLTerms", "clml_loss_reference", "group_nuclear_norms", "nuclear_norm"]
