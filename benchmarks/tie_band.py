"""What the tie band costs: top-1 / top-5 under the evaluation's rule (a class counts
when its float32 score is within the rounding bound 2 gamma_D |x| max|w| of the true
class's, :func:`xcent.classifier.tie_threshold`) against the exact count (float64
scores of the same float32 operands), on synthetic data (``xcent synth``) with the
class-mean weight, at a few feature dimensions and noise levels.

    python benchmarks/tie_band.py

The rule never counts a true tie for the model and never counts a class more than
2 tau below the true one; between the two it counts against the model. The difference
printed is the rows it decides against the model that exact arithmetic would call
right: it grows with D (tau is linear in D) and with how crowded the scores are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from xcent.classifier import full_softmax_stats
from xcent.data import load_dataset, synthesize
from xcent.init import class_means_init

CASES = ((512, 4.0), (512, 8.0), (4096, 12.0), (4096, 25.0))


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'D':>5} {'noise':>6} {'rows':>6} {'top1 rule':>10} {'top1 exact':>11} {'top5 rule':>10} "
          f"{'top5 exact':>11}")
    for dim, noise in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            synthesize(Path(tmp) / "d", num_classes=1000, feature_dim=dim, num_samples=20000, seed=0, noise=noise,
                       val_fraction=0.2)
            data = load_dataset(Path(tmp) / "d")
            weight = class_means_init(data.train, data.num_classes, None).weight
            val = data.splits["val"]
            x, y = torch.from_numpy(np.array(val.features)), val.labels
            _, _, rank = full_softmax_stats(x, y, weight)
            scores = x.double() @ weight.double().T
            exact = (scores >= scores.gather(1, y[:, None])).sum(1) - 1
            print(f"{dim:>5} {noise:>6.1f} {len(y):>6} {float((rank < 1).double().mean()):>10.4f} "
                  f"{float((exact < 1).double().mean()):>11.4f} {float((rank < 5).double().mean()):>10.4f} "
                  f"{float((exact < 5).double().mean()):>11.4f}")


if __name__ == "__main__":
    main()
