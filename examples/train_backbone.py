"""Train a backbone end to end with `xcent.SparseSoftmaxHead`, against dense cross-entropy.

    PYTHONPATH=src python examples/train_backbone.py                 # ~1-3 minutes on 2 CPU cores
    PYTHONPATH=src python examples/train_backbone.py --epochs 20 --out curves.png

The data are generated on the fly (reproducible from ``--data-seed``): ``--classes``
classes with long-tailed frequencies (Zipf, exponent ``--zipf``), each a Gaussian
blob around its own centre in a ``--input-dim``-d input space, pushed through a fixed
random non-linear map so that the classes are not linearly separable in the input.
The backbone is a small MLP (input -> 256 -> ``--dim``, unit-length output); the same backbone (same
initial weights, same batches, same SGD + momentum) is trained with

* the head, for each of ``--algorithms`` (scent, sox, bsgd by default), at its
  algorithm's ``--head-lr``;
* the dense baseline: ``nn.Linear(dim, C)`` + ``F.cross_entropy`` over all classes,
  the linear layer trained by the backbone's optimizer.

``--head-init class-means`` starts each head from the class means of the initial
backbone's embeddings (``head.init_class_means_``) instead of random rows.

After every epoch it prints the full-softmax cross-entropy over all C classes on a
held-out validation set (the real objective; what the curves show) and top-1
accuracy, and at the end draws the curves into a PNG (matplotlib). A head whose own
divergence check stops it (``xcent.errors.DivergenceError``) is reported and its curve
ends at its last epoch.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import xcent
from xcent.errors import DivergenceError
from xcent.losses import REGISTRY


def make_data(num_classes: int, input_dim: int, num_train: int, num_val: int, zipf: float, seed: int):
    """``(x_train, y_train, x_val, y_val)``: long-tailed class frequencies, Gaussian
    blobs in a latent space mapped to the input by a fixed random tanh layer."""
    gen = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64) ** zipf
    centres = torch.randn(num_classes, input_dim, generator=gen)
    mix = torch.randn(input_dim, input_dim, generator=gen) / math.sqrt(input_dim)

    def draw(n):
        y = torch.multinomial(freq, n, replacement=True, generator=gen)
        z = centres[y] + 0.9 * torch.randn(n, input_dim, generator=gen)
        return torch.tanh(z @ mix) + 0.5 * z, y

    x_train, y_train = draw(num_train)
    x_val, y_val = draw(num_val)
    return x_train, y_train, x_val, y_val


class Normalize(nn.Module):
    """Unit-length embeddings, as face and species embedders produce (and as the
    features the algorithms were tuned on): keeps the head's logits bounded by its
    rows' norms, so the head's lr and the backbone's cannot feed each other."""

    def forward(self, x):
        return F.normalize(x, dim=1)


def make_backbone(input_dim: int, dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(input_dim, 256), nn.ReLU(), nn.Linear(256, dim), Normalize())


@torch.no_grad()
def full_ce(logits_fn, backbone, x, y) -> tuple[float, float]:
    """Full-softmax CE over all classes and top-1 accuracy."""
    logits = logits_fn(backbone(x))
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(variant: str, data, args) -> list[dict]:
    x_train, y_train, x_val, y_val = data
    num_samples, C = x_train.shape[0], args.classes
    backbone = make_backbone(x_train.shape[1], args.dim, args.init_seed)
    params = list(backbone.parameters())
    if variant == "dense CE":
        linear = nn.Linear(args.dim, C, bias=False)
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(args.init_seed))
        params += list(linear.parameters())

        def loss_of(emb, y, index):
            return F.cross_entropy(linear(emb), y)

        logits_fn = linear
    else:
        head = xcent.SparseSoftmaxHead(C, args.dim, num_samples, algorithm=variant, lr=args.head_lr.get(variant),
                                       epochs=args.epochs, init_seed=args.init_seed)
        if args.head_init == "class-means":  # the class means of the initial backbone's embeddings
            with torch.no_grad():
                init = head.init_class_means_((backbone(x_train[i]), y_train[i])
                                              for i in torch.arange(num_samples).split(1024))
            print(f"{variant:>9}  class means x {init.scale:.3g}: held-out CE {init.loss:.4f}  top-1 {init.top1:.3f}")
        loss_of, logits_fn = head, head.logits
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    history = [{"epoch": 0, **dict(zip(("val_ce", "val_acc"), full_ce(logits_fn, backbone, x_val, y_val)))}]
    order_gen = torch.Generator().manual_seed(args.data_seed + 1)
    for epoch in range(1, args.epochs + 1):
        for group in opt.param_groups:  # the same per-epoch cosine as the head's lr
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))
        if variant != "dense CE":
            head.set_epoch(epoch)
            head.train()
        start = time.perf_counter()
        order = torch.randperm(num_samples, generator=order_gen)
        try:
            for s in range(0, num_samples, args.batch_size):
                index = order[s:s + args.batch_size]
                loss = loss_of(backbone(x_train[index]), y_train[index], index)
                opt.zero_grad()
                loss.backward()
                opt.step()
        except DivergenceError as err:  # the head's own check: its rows are no longer usable
            print(f"{variant:>9}  epoch {epoch:2d}  stopped: {err}")
            break
        if variant != "dense CE":
            head.eval()
        ce, acc = full_ce(logits_fn, backbone, x_val, y_val)
        history.append({"epoch": epoch, "val_ce": ce, "val_acc": acc, "seconds": time.perf_counter() - start})
        print(f"{variant:>9}  epoch {epoch:2d}  val CE {ce:.4f}  top-1 {acc:.3f}  ({history[-1]['seconds']:.1f} s)")
    return history


def plot(histories: dict, path: str, log_c: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in histories.items():
        style = {"label": name, "color": "black", "marker": "x"}  # the dense baseline
        if name in REGISTRY:  # the algorithms' legend label, colour and marker
            spec = REGISTRY[name]
            style = {"label": f"head: {spec.label}", "color": spec.color, "marker": spec.marker}
        ax.plot([h["epoch"] for h in hist], [h["val_ce"] for h in hist], ms=4, **style)
    ax.axhline(log_c, color="grey", lw=0.8, ls=":", label="log C")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation CE (full softmax)")
    ax.set_title("backbone + head, trained end to end")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--input-dim", type=int, default=32)
    p.add_argument("--dim", type=int, default=64, help="embedding width")
    p.add_argument("--train", type=int, default=20000, help="training rows")
    p.add_argument("--val", type=int, default=5000, help="validation rows")
    p.add_argument("--zipf", type=float, default=0.8, help="class-frequency exponent (long tail)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="backbone (and dense head) lr, SGD momentum 0.9")
    p.add_argument("--algorithms", default="scent,sox,bsgd")
    p.add_argument("--scent-lr", type=float, default=1.0)
    p.add_argument("--sox-lr", type=float, default=1.0)
    p.add_argument("--bsgd-lr", type=float, default=1.0)
    p.add_argument("--head-init", choices=("random", "class-means"), default="random",
                   help="the head's start (the head variants only): random rows, or head.init_class_means_ "
                        "over the training rows through the initial backbone")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="train_backbone.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.head_lr = {"scent": args.scent_lr, "sox": args.sox_lr, "bsgd": args.bsgd_lr}
    data = make_data(args.classes, args.input_dim, args.train, args.val, args.zipf, args.data_seed)
    histories = {}
    for variant in [a for a in args.algorithms.split(",") if a] + ["dense CE"]:
        histories[variant] = train(variant, data, args)
    print("\nvalidation CE (full softmax over all classes) per epoch")
    print("epoch  " + "  ".join(f"{k:>9}" for k in histories))
    for e in range(args.epochs + 1):
        print(f"{e:5d}  " + "  ".join(f"{h[e]['val_ce']:9.4f}" if e < len(h) else f"{'stopped':>9}"
                                      for h in histories.values()))
    plot(histories, args.out, math.log(args.classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
