"""xcent: extreme classification with compositional entropic risk.

Linear classifiers over precomputed features with up to millions of classes,
trained with SCENT (Wei et al., 2026, "A Geometry-Aware Efficient Algorithm for
Compositional Entropic Risk Minimization") or one of five baselines (SOX, ASGD,
ASGD-softplus, U-max, BSGD). Each step touches only the classes of its minibatch.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # `xcent.Classifier` is imported on first use, so `import xcent` does not load torch
    if name == "Classifier":
        from .predict import Classifier

        return Classifier
    if name == "SparseSoftmaxHead":
        from .head import SparseSoftmaxHead

        return SparseSoftmaxHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
