"""xcent: extreme classification with compositional entropic risk.

Linear classifiers over precomputed features with up to millions of classes,
trained with SCENT (Wei et al., 2026, "A Geometry-Aware Efficient Algorithm for
Compositional Entropic Risk Minimization") or one of five baselines (SOX, ASGD,
ASGD-softplus, U-max, BSGD). Each step touches only the classes of its minibatch.
"""

__version__ = "0.1.0"
