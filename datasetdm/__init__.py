"""datasetdm: a synthetic dataset factory after DatasetDM (Wu et al., NeurIPS 2023)."""

__version__ = "0.1.0"
