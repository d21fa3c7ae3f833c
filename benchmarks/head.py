"""`xcent.SparseSoftmaxHead` step time at Glint360K shape, against dense heads.

    python benchmarks/head.py --threads 1 --clock cpu          # a few minutes on 2 cores

For B = 128 and 1,024 (C = 360,232, D = 512, uniform labels so K ~ B, every dual set), the
median ms per step of:

* ``head``: :class:`xcent.SparseSoftmaxHead` (scent), forward + backward (the
  embeddings' gradient and the head's own sparse step);
* ``train_step``: :func:`xcent.step.train_step` on the same batches (the linear
  trainer's step, which computes no embeddings' gradient): the head must stay
  within 1.3x of it;
* ``dense CE``: ``nn.Linear`` + ``F.cross_entropy`` over all C classes, autograd and
  ``torch.optim.SGD`` over the whole (C, D) weight (what a backbone is usually
  trained with): the head must be >= 500x faster at this C;
* ``dense-gradient SCENT``: the design of LibAUC's SCENT loss, re-implemented here
  (no dependency): full (B, C) scores from ``nn.Linear``, in-batch logits by
  indexing, the SCENT surrogate, autograd to a dense (C, D) gradient, and
  ``torch.optim.SGD`` stepping all C rows;

each alone and behind a small backbone (a 2-layer MLP, 512 -> 1024 -> 512, over
512-d inputs; the backbone's own forward, backward and SGD step included). The dense
variants are slow at this C, so only a few of their steps are timed (``--dense-steps``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as cm

from xcent.classifier import init_weight
from xcent.head import SparseSoftmaxHead
from xcent.losses import build
from xcent.step import train_step


def make_batches(n: int, B: int, C: int, D: int, N: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen),
             torch.randperm(N, generator=gen)[:B]) for _ in range(n)]


def backbone(D: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.ReLU(), torch.nn.Linear(2 * D, D))


def runners(C: int, D: int, N: int, with_backbone: bool, which: list[str]):
    """name -> step(x, y, idx)."""
    out = {}
    net = backbone(D) if with_backbone else None
    net_opt = torch.optim.SGD(net.parameters(), lr=1e-3) if net is not None else None

    def through_backbone(head_step):
        if net is None:
            return lambda x, y, idx: head_step(x.requires_grad_(True), y, idx)

        def step(x, y, idx):
            net_opt.zero_grad()
            head_step(net(x), y, idx)
            net_opt.step()
        return step

    if "head" in which:
        head = SparseSoftmaxHead(C, D, N, algorithm="scent", lr=5e-3, epochs=50)
        head.loss_fn.nu.zero_()
        head.loss_fn.nu_set.fill_(True)
        head.set_epoch(2)

        def head_step(emb, y, idx):
            loss = head(emb, y, idx)
            loss.backward()
            float(loss.detach())
        out["head"] = through_backbone(head_step)
    if "train_step" in which and net is None:
        weight = init_weight(C, D, seed=0)
        loss_fn = build("scent", N)
        loss_fn.nu.zero_()
        loss_fn.nu_set.fill_(True)
        loss_fn.set_epoch(2, 50)

        def linear_step(x, y, idx):
            float(train_step(weight, loss_fn, x, y, idx, 5e-3).loss)
        out["train_step"] = linear_step
    if "dense CE" in which:
        linear = torch.nn.Linear(D, C, bias=False)
        opt = torch.optim.SGD(linear.parameters(), lr=1e-3)

        def dense_step(emb, y, idx):
            opt.zero_grad()
            loss = F.cross_entropy(linear(emb), y)
            loss.backward()
            opt.step()
            float(loss.detach())
        out["dense CE"] = through_backbone(dense_step)
    if "dense-gradient SCENT" in which:
        linear = torch.nn.Linear(D, C, bias=False)
        opt2 = torch.optim.SGD(linear.parameters(), lr=1e-3)
        scent = build("scent", N)
        scent.nu.zero_()
        scent.nu_set.fill_(True)

        def libauc_step(emb, y, idx):
            opt2.zero_grad()
            scores = linear(emb)
            U = torch.unique(y)
            z = scores[:, U] - scores.gather(1, y[:, None])
            z = z.masked_fill(U[None, :] == y[:, None], float("-inf"))
            loss = scent(z, idx)
            loss.backward()
            opt2.step()
            float(loss.detach())
        out["dense-gradient SCENT"] = through_backbone(libauc_step)
    return out


def time_steps(fn, batches, steps: int, warmup: int = 1) -> list[float]:
    for b in batches[:warmup]:
        fn(*[t.clone() for t in b])
    times = []
    for i in range(steps):
        x, y, idx = batches[(warmup + i) % len(batches)]
        x = x.clone()
        t = cm.clock()
        fn(x, y, idx)
        times.append(cm.clock() - t)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=cm.GLINT_CLASSES)
    p.add_argument("--dim", type=int, default=cm.FEATURE_DIM)
    p.add_argument("--samples", type=int, default=1 << 20, help="training rows (duals)")
    p.add_argument("--batches", default="128,1024")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the sparse variants, per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, head and train_step interleaved")
    p.add_argument("--dense-steps", type=int, default=2, help="timed steps of each dense variant")
    cm.add_common_args(p)
    a = p.parse_args(argv)
    cm.setup(a)
    C, D, N = a.classes, a.dim, a.samples
    print(f"machine: {cm.machine()}")
    print(f"command: python benchmarks/head.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    for B in [int(b) for b in a.batches.split(",") if b]:
        batches = make_batches(8, B, C, D, N, seed=B)
        K = sum(int(torch.unique(y).numel()) for _, y, _ in batches) / len(batches)
        rows, med = [], {}
        for with_backbone in (False, True):
            tag = "backbone + " if with_backbone else ""
            sparse = runners(C, D, N, with_backbone, ["head", "train_step"])
            times = {k: [] for k in sparse}
            for _ in range(a.rounds):
                for k, fn in sparse.items():
                    times[k] += time_steps(fn, batches, a.steps)
            del sparse
            for k, v in times.items():
                med[tag + k] = cm.median(v)
            for k in ("dense CE", "dense-gradient SCENT"):
                fn = runners(C, D, N, with_backbone, [k])[k]
                med[tag + k] = cm.median(time_steps(fn, batches, a.dense_steps))
                del fn
        for k, t in med.items():
            base = med["backbone + head"] if k.startswith("backbone") else med["head"]
            rows.append([k, t * 1e3, B / t, t / base])
        print(f"\nC = {C:,}, D = {D}, B = {B} (mean K = {K:.0f}), scent, duals set")
        print(cm.table(["variant", "ms/step", "samples/s", "x head"], rows))
        ratio = med["head"] / med["train_step"]
        print(f"ratio: head / train_step = {ratio:.2f} (target <= 1.3: {cm.verdict(ratio <= 1.3)})")
        for k in ("dense CE", "dense-gradient SCENT"):
            r = med[k] / med["head"]
            print(f"ratio: {k} / head = {r:,.0f}x (target >= 500x: {cm.verdict(r >= 500)}); "
                  f"with the backbone {med['backbone + ' + k] / med['backbone + head']:,.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
