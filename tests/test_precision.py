"""``precision="bf16"``: the score GEMMs read bfloat16 operands and accumulate in
float32 (:func:`xcent.classifier.matmul_nt`); the step and the evaluation agree with
float32 within bf16's rounding, and a wrong formula would not."""

import pytest
import torch
from conftest import gamma

from xcent import losses
from xcent.classifier import PRECISIONS, full_softmax_stats, matmul_nt
from xcent.step import train_step


def test_matmul_nt_bf16_is_the_product_of_rounded_operands(device):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 64, generator=gen).to(device)
    b = torch.randn(29, 64, generator=gen).to(device)
    exact = (a.double() @ b.double().T)
    rounded = a.bfloat16().double() @ b.bfloat16().double().T  # what bf16 inputs make exact
    got = matmul_nt(a, b, "bf16")
    assert got.dtype == torch.float32 and got.shape == (37, 29)
    scale = (a.double().norm(dim=1)[:, None] * b.double().norm(dim=1)[None, :])
    # output rounded at most to bf16 (CPU) or float32 (CUDA out_dtype): 2^-8 relative,
    # after a float32 accumulation of 64 products (gamma_64 of the magnitudes, which
    # Cauchy-Schwarz bounds by the norms of the rounded operands, at most (1 + 2^-8)^2 up)
    bound = rounded.abs() * 2.0 ** -8 + gamma(64) * (1 + 2.0 ** -8) ** 3 * scale
    assert ((got.double() - rounded).abs() <= bound).all()
    # and really rounded operands: it differs from float32 by bf16's input rounding
    assert (got.double() - exact).abs().max() > 1e-4
    assert (got.double() - exact).abs().max() < 0.02 * scale.max()
    assert torch.equal(matmul_nt(a, b, "fp32"), a @ b.T)
    with pytest.raises(ValueError, match="precision"):
        matmul_nt(a, b, "fp16")
    assert PRECISIONS == ("fp32", "bf16")


@pytest.mark.parametrize("algorithm", ["scent", "sox", "bsgd"])
def test_bf16_step_agrees_with_fp32(device, algorithm):
    gen = torch.Generator().manual_seed(1)
    num_classes, dim, batch, num_samples = 50, 32, 64, 200
    weight0 = (torch.randn(num_classes, dim, generator=gen) * 0.3).to(device)
    feats = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    index = torch.randperm(num_samples, generator=gen)[:batch].to(device)
    results = {}
    for precision in PRECISIONS:
        weight = weight0.clone()
        loss_fn = losses.build(algorithm, num_samples, epochs=1).to(device)
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(1, 1)
        out = train_step(weight, loss_fn, feats, labels, index, 0.5, precision=precision)
        assert weight.dtype == torch.float32 and loss_fn.nu.dtype == torch.float32
        results[precision] = (weight, loss_fn.nu[index].clone(), float(out.loss))
    (w32, nu32, l32), (w16, nu16, l16) = results["fp32"], results["bf16"]
    moved = (w32 - weight0).abs().max()
    assert moved > 1e-3
    # bf16 scores (~3 significant digits) change the update by a small fraction of itself
    assert (w16 - w32).abs().max() < 0.05 * moved
    if algorithm != "bsgd":  # bsgd keeps no duals
        assert torch.isfinite(nu32).all()
        assert (nu16 - nu32).abs().max() < 2e-2 * max(1.0, float(nu32.abs().max()))
    assert abs(l16 - l32) < 2e-2 * max(1.0, abs(l32))


def test_bf16_evaluation_agrees_with_fp32(device):
    gen = torch.Generator().manual_seed(2)
    num_classes, dim, n = 3000, 64, 300
    weight = (torch.randn(num_classes, dim, generator=gen) * 0.3).to(device)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    feats = weight[labels.to(device)] + 0.5 * torch.randn(n, dim, generator=gen).to(device)
    lse32, t32, r32 = full_softmax_stats(feats, labels, weight, class_chunk=700)
    lse16, t16, r16 = full_softmax_stats(feats, labels, weight, class_chunk=700, precision="bf16")
    ce32, ce16 = (lse32 - t32).double(), (lse16 - t16).double()
    assert ce32.mean() > 0.1  # not a trivially solved problem
    assert abs(float(ce16.mean() - ce32.mean())) < 1e-2
    assert (ce16 - ce32).abs().max() < 0.1
    # ranks move only where two classes score within rounding of each other: each rank
    # counts every class whose exact score (of the operands the GEMM multiplies) is at
    # least the true class's, and none more than 2 tau below it, tau = 2 eta |x| max|w|
    # with eta Higham's gamma_D, plus bf16's output rounding (2^-8, the CPU's kernel)
    # and the rounded operands' larger norms
    x, w, y = feats.cpu().double(), weight.cpu().double(), labels[:, None]
    norms = x.norm(dim=1, keepdim=True) * w.norm(dim=1).max()
    eta16 = ((1 + gamma(dim)) * (1 + 2.0 ** -8) - 1) * (1 + 2.0 ** -8) ** 2
    for rank, exact, eta in ((r32, x @ w.T, gamma(dim)),
                             (r16, x.bfloat16().double() @ w.bfloat16().double().T, eta16)):
        target = exact.gather(1, y)
        others = torch.ones_like(exact, dtype=torch.bool).scatter_(1, y, False)
        lower = ((exact >= target) & others).sum(1)
        upper = ((exact >= target - 4 * eta * norms) & others).sum(1)
        assert bool(((lower <= rank.cpu()) & (rank.cpu() <= upper)).all())
    assert ((r16 < 1) != (r32 < 1)).float().mean() < 0.05  # and they mostly agree
    # the log-sum-exp stays float32 and is not the bf16 rounding of the fp32 one alone
    assert lse16.dtype == torch.float32
