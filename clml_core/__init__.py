"""clml_core: CLML (label-structure-preserving contrastive embedding) for multi-label learning with missing labels."""

__version__ = "0.1.0"
