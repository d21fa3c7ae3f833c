"""xcent.SparseSoftmaxHead used wrongly: bad arguments are refused with an error naming
them (and change nothing), one process and two class-sharded gloo processes."""

import copy
import datetime
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_head import ALGOS, HP, dense_reference, spec_step

from xcent.classifier import init_weight
from xcent.divergence import batch_ce_lower_bound
from xcent.errors import ArgumentError, DivergenceError, UsageError
from xcent.head import SparseSoftmaxHead
from xcent.losses import build
from xcent.train import lr_at

C, D, N, B = 20, 4, 16, 6


def snapshot(head):
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in head.state_dict().items()}


def same_state(a, b):
    assert a.keys() == b.keys()
    for k, v in a.items():
        if torch.is_tensor(v):
            assert torch.equal(v, b[k]) or torch.allclose(v, b[k], rtol=0, atol=0, equal_nan=True), k
        else:
            assert v == b[k], k


def trained_head(**kw):
    """A head with some state (duals set, momentum), one step taken."""
    head = SparseSoftmaxHead(C, D, N, algorithm="sox", epochs=2, momentum=0.5, weight_decay=0.1, **kw)
    head.set_epoch(1)
    head(torch.randn(B, D), torch.tensor([0, 1, 1, 2, 5, 19]), torch.arange(B)).backward()
    return head


def good_batch():
    return torch.randn(B, D, requires_grad=True), torch.tensor([0, 3, 3, 7, 8, 19]), torch.tensor([15, 1, 2, 3, 4, 5])


BAD_IDS = {  # name: (labels, index, what the error must say)
    "negative index": (None, torch.tensor([-1, 1, 2, 3, 4, 5]),
                       r"index must be row ids in \[0, 16\), got 1 outside it, e.g. -1 at position 0"),
    "index past the rows": (None, torch.tensor([0, 1, 2, 3, 4, 16]), r"index must be row ids in \[0, 16\).*16"),
    "float index": (None, torch.tensor([0.0, 1.7, 2, 3, 4, 5]), r"index must be integer row ids, got torch.float32"),
    "bool index": (None, torch.ones(B, dtype=torch.bool), r"index must be integer row ids, got torch.bool"),
    "index of another shape": (None, torch.arange(B + 1), r"index must be \(6,\)"),
    "list index": (None, list(range(B)), r"index must be a \(6,\) tensor"),
    "label past the classes": (torch.tensor([0, 1, 2, 3, 20, 5]), None,
                               r"labels must be class ids in \[0, 20\), got 1 outside it, e.g. 20 at position 4"),
    "negative label": (torch.tensor([0, 1, -2, 3, 4, 5]), None, r"labels must be class ids in \[0, 20\).*-2"),
    "float labels": (torch.tensor([0.0, 1.9, 2, 3, 4, 5]), None,
                     r"labels must be integer class ids, got torch.float32"),
    "float64 labels": (torch.arange(B, dtype=torch.float64), None, r"labels must be integer class ids"),
}


@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_labels_or_index_are_refused_and_change_nothing(case):
    """A negative row id used to set the dual of row N - 1, float ids were truncated, a
    label out of range gave a bare IndexError (a device-side assert on CUDA): now one
    ValueError naming the argument, the range and an offending value; nothing changes."""
    head = trained_head()
    before = snapshot(head)
    x, labels, index = good_batch()
    bad_labels, bad_index, message = BAD_IDS[case]
    with pytest.raises(ArgumentError, match=message):
        head(x, labels if bad_labels is None else bad_labels, index if bad_index is None else bad_index)
    with pytest.raises(ValueError):  # ArgumentError is a ValueError (and a library UsageError)
        head(x, labels if bad_labels is None else bad_labels, index if bad_index is None else bad_index)
    assert issubclass(ArgumentError, UsageError)
    same_state(before, snapshot(head))
    head(x, labels, index).backward()  # the head still works


@pytest.mark.parametrize("embeddings,message", [
    (torch.randn(B, D + 1), r"embeddings must be \(B, 4\) floats, got \(6, 5\)"),
    (torch.randn(B), r"embeddings must be \(B, 4\) floats"),
    (torch.ones(B, D, dtype=torch.long), r"embeddings must be \(B, 4\) floats, got \(6, 4\) torch.int64"),
    (np.zeros((B, D), dtype=np.float32), r"embeddings must be a \(B, 4\) tensor, got ndarray"),
])
def test_bad_embeddings_are_refused(embeddings, message):
    head = trained_head()
    _, labels, index = good_batch()
    with pytest.raises(ArgumentError, match=message):
        head(embeddings, labels, index)
    with pytest.raises(ArgumentError, match=message):
        head.logits(embeddings)
    with pytest.raises(ArgumentError, match=message):
        head.topk(embeddings, 3)


@pytest.mark.parametrize("epoch", [1.7, 2.0, True, "2", 0, 3, None, torch.tensor(1.0)])
def test_set_epoch_refuses_anything_but_an_integer_epoch(epoch):
    """set_epoch(1.7) used to run epoch 1; an epoch is an integer in [1, epochs]."""
    head = trained_head()
    with pytest.raises(ArgumentError, match="epoch must be"):
        head.set_epoch(epoch)
    assert head.epoch == 1


def test_set_epoch_takes_integers_of_any_kind():
    head = trained_head()
    for epoch in (np.int64(2), torch.tensor(1), 2):
        head.set_epoch(epoch)
        assert head.epoch == int(epoch) and type(head.epoch) is int


@pytest.mark.parametrize("kwargs,message", [
    ({"num_classes": 10.5}, "num_classes must be an integer, got 10.5"),
    ({"num_classes": 1}, r"num_classes must be >= 2, got 1"),
    ({"dim": 0}, "dim must be >= 1"),
    ({"num_samples": 2.5}, "num_samples must be an integer"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"epochs": 1.5}, "epochs must be an integer"),
    ({"lr": 0.0}, r"lr must be > 0 and finite, got 0"),
    ({"lr": -1.0}, r"lr must be > 0 and finite"),
    ({"lr": math.nan}, r"lr must be > 0 and finite, got nan"),
    ({"lr": math.inf}, r"lr must be > 0 and finite"),
    ({"lr": "5"}, r"lr must be a number"),
    ({"lr": True}, r"lr must be a number"),
    ({"weight_decay": math.inf}, "weight_decay must be >= 0 and finite"),
    ({"weight_decay": math.nan}, "weight_decay must be >= 0 and finite"),
    ({"momentum": math.nan}, r"momentum must be in \[0, 1\)"),
    ({"dtype": torch.int64}, "dtype must be a floating-point torch.dtype"),
    ({"algorithm": None}, "algorithm must be a name"),
    ({"init_seed": 1.5}, "init_seed must be an integer"),
])
def test_constructor_refuses_bad_arguments(kwargs, message):
    args = {"num_classes": C, "dim": D, "num_samples": N} | kwargs
    with pytest.raises(ArgumentError, match=message):
        SparseSoftmaxHead(**args)


def test_topk_refuses_a_fractional_k():
    head = trained_head()
    with pytest.raises(ArgumentError, match="k must be an integer"):
        head.topk(torch.randn(2, D), 2.5)
    with pytest.raises(ArgumentError, match=r"k must be in \[1, 20\]"):
        head.topk(torch.randn(2, D), 21)


# --------------------------------------------------------------------------- saved states


@pytest.mark.parametrize("saved,loading,message", [
    ({"algorithm": "scent"}, {"algorithm": "sox"}, "the state was saved by a scent head, this head runs sox"),
    ({"algorithm": "scent", "gamma": 1.5}, {"algorithm": "scent"}, r"scent's hyper-parameters differ: gamma 1.5 "
                                                                   r"\(state\) vs 12.0 \(this head\)"),
    ({"algorithm": "softplus", "rho": 0.1}, {"algorithm": "softplus"}, "softplus_rho 0.1 .state. vs 0.001"),
    ({"algorithm": "sox", "epochs": 3}, {"algorithm": "sox", "epochs": 2},
     r"the state is at epoch 3, outside this head's \[1, 2\]"),
    ({"algorithm": "bsgd", "num_classes": 21}, {"algorithm": "bsgd"}, "the state holds rows 0..20 of 21 classes"),
])
def test_load_state_dict_refuses_another_algorithm_or_shape(saved, loading, message):
    """A scent head's state loaded into a sox head used to be accepted (the duals of one
    algorithm read as the other's). The algorithm, its hyper-parameters and the class
    rows are saved, a mismatch is refused before anything is copied (also inside a
    parent module's load), and the saved state loads with ``weights_only=True``."""
    import io

    def make(spec):
        spec = dict(spec)
        head = SparseSoftmaxHead(spec.pop("num_classes", C), D, N, algorithm=spec.pop("algorithm"),
                                 epochs=spec.pop("epochs", 3), momentum=0.5, **spec)
        head.set_epoch(head.epochs)
        head(torch.randn(B, D), torch.tensor([0, 1, 1, 2, 5, 19]), torch.arange(B)).backward()
        return head

    buffer = io.BytesIO()
    torch.save(make(saved).state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    head = make(loading)
    before = snapshot(head)
    with pytest.raises(ArgumentError, match="load_state_dict: .*" + message):
        head.load_state_dict(state)
    same_state(before, snapshot(head))
    parent = torch.nn.ModuleDict({"head": head})
    with pytest.raises(ArgumentError, match=message):
        parent.load_state_dict({f"head.{k}": v for k, v in state.items()})
    same_state(before, snapshot(head))
    same = make(loading)
    head.load_state_dict(same.state_dict())  # the same kind of head loads
    same_state(snapshot(same), snapshot(head))


# --------------------------------------------------------------------------- gradient accumulation


def _accumulation_batches(rng, Bs=(10, 8, 9)):
    """Batches sharing classes (3, 7, 11) and one row (id 4): the later steps see the
    earlier ones' rows and that row's dual."""
    out = []
    for b, start in zip(Bs, (0, 4, 12)):
        y = rng.choice([0, 3, 3, 7, 7, 11, 25, 29, 14, 5], size=b)
        out.append((rng.normal(size=(b, 6)), y, np.r_[4, np.arange(start + 20, start + 20 + b - 1)]))
    return out


@pytest.mark.parametrize("name", ALGOS)
def test_accumulated_forwards_equal_sequential_steps(name):
    """``(head(b1) + head(b2) + head(b3)).backward()``, the usual gradient accumulation:
    each batch's step is the algorithm's single step on it, applied in backward order
    (autograd runs the last forward's first) at the head as the previous steps left it,
    i.e. three sequential float64 steps of the spec; each batch's embeddings' gradient
    is the one at the head its forward saw. (Before, every step wrote
    ``row_at_forward - lr g``: the first batch's step overwrote the later ones' on the
    classes they share, and the shared row's dual kept only one update.)"""
    from xcent import sync

    C, E = 30, 3
    head = SparseSoftmaxHead(C, 6, 40, algorithm=name, lr=0.8, epochs=E, dtype=torch.float64, **HP[name])
    with torch.no_grad():
        head.weight.mul_(40)  # logits of order 1
    head.set_epoch(1)
    head(torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 5, torch.arange(8)).backward()  # duals to revisit
    head.set_epoch(2)
    rng = np.random.default_rng(3)
    batches = _accumulation_batches(rng)
    W0, nu0, set0 = head.weight.numpy().copy(), head.loss_fn.nu.numpy().copy(), head.loss_fn.nu_set.numpy().copy()
    lr = lr_at(2, E, 0.8)
    xs = [torch.tensor(x, requires_grad=True) for x, _, _ in batches]
    before = sync.read_count()
    loss = sum(head(x, torch.tensor(y), torch.tensor(i)) for x, (_, y, i) in zip(xs, batches))
    loss.backward()
    assert sync.read_count() == before  # host labels and index: no device read, redone steps included
    W, nu, nu_set = W0, nu0, set0
    for x, y, i in reversed(batches):  # the spec's single steps, in backward order
        _, W, nu, nu_set = spec_step(name, HP[name], W, nu, nu_set, x, y, i, 2, E, lr)
    np.testing.assert_allclose(head.weight.numpy(), W, rtol=1e-9, atol=1e-12)
    if name != "bsgd":
        np.testing.assert_allclose(head.loss_fn.nu.numpy(), nu, rtol=1e-9, atol=1e-12)
        assert np.array_equal(head.loss_fn.nu_set.numpy(), nu_set)
    for xt, (x, y, i) in zip(xs, batches):  # embeddings' gradients at the head the forwards saw
        dx = spec_step(name, HP[name], W0, nu0, set0, x, y, i, 2, E, lr)[0]
        np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_accumulation_with_momentum_equals_dense_sgd_in_backward_order(order):
    """Two forwards, then their backwards one by one in either order: the rows and the
    momentum buffer equal dense torch.optim.SGD taking the two batches' steps in that
    order (untouched rows decaying and coasting), each embeddings' gradient the one at
    the rows its forward saw."""
    C, N, lr = 30, 40, 0.5
    head = SparseSoftmaxHead(C, 6, N, algorithm="sox", lr=lr, epochs=3, momentum=0.9, weight_decay=0.05,
                             dtype=torch.float64, gamma=0.5)
    with torch.no_grad():
        head.weight.mul_(30)
    linear, opt, loss_fn, dense_step = dense_reference("sox", C, 6, N, lr, 0.9, 0.05, head.weight, gamma=0.5)
    head.set_epoch(1)
    loss_fn.set_epoch(1, 3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # some momentum history first
        idx = torch.randperm(N, generator=gen)[:8]
        y, x = torch.randint(0, 12, (8,), generator=gen), torch.randn(8, 6, generator=gen, dtype=torch.float64)
        head(x.clone().requires_grad_(True), y, idx).backward()
        dense_step(x, y, idx)
    batches = [(torch.randn(9, 6, generator=gen, dtype=torch.float64), torch.randint(0, 12, (9,), generator=gen),
                torch.arange(9) + 9 * k) for k in range(2)]
    linear_at_forward, duals_at_forward = copy.deepcopy(linear), copy.deepcopy(loss_fn.state_dict())
    xs = [x.clone().requires_grad_(True) for x, _, _ in batches]
    losses = [head(xt, y, i) for xt, (_, y, i) in zip(xs, batches)]
    for k in order:
        losses[k].backward()
        dense_step(*batches[k])
    head.flush()
    torch.testing.assert_close(head.weight, linear.weight.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(head.momentum_buffer, opt.state[linear.weight]["momentum_buffer"], rtol=1e-9,
                               atol=1e-12)
    for k in range(2):  # both at the forward's rows: the dense gradient at the state before either step
        x, y, i = batches[k]
        ref = x.clone().requires_grad_(True)
        scores = linear_at_forward(ref)
        U = torch.unique(y)
        z = scores[:, U] - scores[torch.arange(len(y)), y][:, None]
        z = z.masked_fill(U[None, :] == y[:, None], float("-inf"))
        dual = build("sox", N, dtype=torch.float64, gamma=0.5)
        dual.load_state_dict(duals_at_forward)
        dual.set_epoch(1, 3)
        dual(z, i).backward()
        torch.testing.assert_close(xs[k].grad, ref.grad, rtol=1e-9, atol=1e-12)


def test_a_new_epoch_between_forward_and_backward_redoes_the_step():
    """A forward's step that waits across ``set_epoch`` is taken at the new epoch's lr and
    dual schedule (the head as it is when the step is applied), as a forward after it."""
    kw = {"algorithm": "sox", "lr": 0.5, "epochs": 3, "dtype": torch.float64, "gamma": 0.5}
    a, b = SparseSoftmaxHead(C, D, N, **kw), SparseSoftmaxHead(C, D, N, **kw)
    x, y, idx = good_batch()
    x = x.detach().double()
    for head in (a, b):
        head.set_epoch(1)
        head(x.clone().requires_grad_(True), y, idx).backward()  # the duals, revisited below
    loss = a(x.clone().requires_grad_(True), y, idx)
    a.set_epoch(2)
    loss.backward()
    b.set_epoch(2)
    b(x.clone().requires_grad_(True), y, idx).backward()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    torch.testing.assert_close(a.loss_fn.nu, b.loss_fn.nu, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- divergence


def _blobs(C=50, Dim=8, N=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, Dim, generator=gen) * 2
    y = torch.randint(0, C, (N,), generator=gen)
    return centers[y] + torch.randn(N, Dim, generator=gen), y


def _train(head, x_all, y_all, epochs, B=32, nan_at=None, seed=0):
    """Epochs of shuffled batches; ``nan_at``: the 1-based step whose embeddings get a NaN."""
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(1, epochs + 1):
        head.set_epoch(epoch)
        for idx in torch.randperm(len(y_all), generator=gen).split(B):
            step += 1
            x = x_all[idx].clone()
            if step == nan_at:
                x[3, 1] = math.nan
            head(x.requires_grad_(True), y_all[idx], idx).backward()


@pytest.mark.parametrize("check_every", [1, 3, 100])
def test_nan_embeddings_stop_the_head_naming_their_step(check_every):
    """A NaN in one embedding used to turn the batch's rows and duals NaN silently. The
    step's health (finite surrogate and rows, from the device) is read every
    ``check_every`` steps, at ``set_epoch`` and before saving; the error names the step
    whichever the interval. Then the head refuses to train or be saved until a good
    state is loaded."""
    x_all, y_all = _blobs()
    head = SparseSoftmaxHead(50, 8, 400, algorithm="sox", lr=0.5, epochs=2, check_every=check_every)
    good = None
    head.set_epoch(1)
    gen = torch.Generator().manual_seed(0)
    batches = list(torch.randperm(400, generator=gen).split(32))
    with pytest.raises(DivergenceError) as raised:
        for step, idx in enumerate(batches, 1):
            if step == 4:
                good = snapshot(head)
            x = x_all[idx].clone()
            if step == 5:
                x[3, 1] = math.nan
            head(x, y_all[idx], idx).backward()
        head.set_epoch(2)  # check_every=100: the epoch's end reads the 8 unread steps
    message = str(raised.value)
    assert message.startswith("SparseSoftmaxHead diverged at step 5 (epoch 1, sox, lr 0.5): "
                              "non-finite in-batch logits (NaN or inf in the embeddings or the rows)"), message
    assert head.steps == (5 if check_every == 1 else 6 if check_every == 3 else 13)
    assert issubclass(DivergenceError, UsageError.__mro__[1])  # a library error (XcentError)
    with pytest.raises(DivergenceError, match="diverged at step 5"):
        head(x_all[:8], y_all[:8], torch.arange(8))
    with pytest.raises(DivergenceError, match="diverged at step 5"):
        head.state_dict()
    assert head.logits(x_all[:3]).shape == (3, 50)  # inspection still works
    head.load_state_dict(good)
    head(x_all[:8].clone().requires_grad_(True), y_all[:8], torch.arange(8)).backward()
    assert torch.isfinite(head.weight).all()


def test_saving_reads_the_unchecked_steps_first():
    """state_dict() never saves a head whose unread steps went non-finite (one read of
    this process's recorded values, no collective)."""
    x_all, y_all = _blobs()
    head = SparseSoftmaxHead(50, 8, 400, algorithm="scent", epochs=1, check_every=100)
    head.set_epoch(1)
    head(x_all[:32], y_all[:32], torch.arange(32)).backward()
    head.state_dict()  # healthy: saves
    x = x_all[32:64].clone()
    x[0, 0] = math.inf
    head(x.requires_grad_(True), y_all[32:64], torch.arange(32, 64)).backward()  # no read: not yet known
    with pytest.raises(DivergenceError, match="diverged at step 2 .epoch 1, scent, lr 5.: non-finite"):
        head.state_dict()


@pytest.mark.parametrize("name", ALGOS)
def test_finite_blow_up_stops_the_head(name):
    """An lr far too large blows the rows up while every number stays finite (it went
    on silently). The head applies the trainer's rule to a lower bound of the batch's
    full-softmax CE (each row's CE against its strongest in-batch rival): above
    10 x max(log C, 1) the head stops, naming the step and the lr; the rows are finite
    then, so it is this rule and not the non-finite check that stopped it."""
    x_all, y_all = _blobs()
    head = SparseSoftmaxHead(50, 8, 400, algorithm=name, lr=1e4, epochs=2, check_every=4)
    with pytest.raises(DivergenceError) as raised:
        _train(head, x_all, y_all, epochs=2)
    message = str(raised.value)
    prefix = f"SparseSoftmaxHead diverged at step 2 (epoch 1, {name}, lr 1e+04): the batch's CE is at least "
    assert message.startswith(prefix), message
    assert "> 39.1 (10 x max(log C, 1), log C = 3.91); lower the head's lr" in message
    assert torch.isfinite(head.weight).all()
    assert float(message[len(prefix):].split(" ")[0]) > 39.1


@pytest.mark.parametrize("start", ["random", "class-means"])
def test_healthy_heads_stay_far_below_the_rule(start, monkeypatch):
    """Every algorithm at its default lr, from a random start and from the class means,
    checked every step: no divergence, and the largest batch CE bound of any step
    stays below log C (a tenth of the bound)."""
    import xcent.head as head_module

    seen = []

    def recorded(logits):
        value = batch_ce_lower_bound(logits)
        seen.append(float(value))
        return value

    monkeypatch.setattr(head_module, "batch_ce_lower_bound", recorded)
    x_all, y_all = _blobs()
    x_all = torch.nn.functional.normalize(x_all, dim=1)  # unit-length embeddings, as a face or CLIP model's
    for name in ALGOS:
        head = SparseSoftmaxHead(50, 8, 400, algorithm=name, epochs=3, check_every=1)
        if start == "class-means":
            head.init_class_means_([(x_all, y_all)])
        _train(head, x_all, y_all, epochs=3)
    assert len(seen) == 6 * 3 * 13
    assert max(seen) < math.log(50), max(seen)


# --------------------------------------------------------------------------- two processes


def _init_group(rank, world, init_file):
    # a short timeout: a rank that raised alone would leave the other waiting in a collective
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)


def _misuse_worker(rank, world, init_file, out_dir):
    _init_group(rank, world, init_file)
    out = {}
    try:
        head = SparseSoftmaxHead(45, 6, 40, algorithm="scent", lr=0.7, epochs=2, process_group=dist.group.WORLD)
        head.set_epoch(1)
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 45, (5,), generator=gen)
        idx = torch.arange(5) + 5 * rank
        before = snapshot(head)
        errors = []
        cases = [  # each: (labels, index, embeddings) of this rank
            (y if rank == 0 else torch.tensor([0, 1, 45, 2, 3]), idx, x),   # rank 1: label out of range
            (y, idx if rank == 0 else idx.float(), x),                       # rank 1: float index
            (y, idx, x if rank == 1 else torch.randn(5, 7)),                 # rank 0: embeddings of width 7
        ]
        for labels, index, emb in cases:
            try:
                head(emb.requires_grad_(), labels, index).backward()
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        out["errors"] = errors
        out["unchanged"] = all(torch.equal(v, snapshot(head)[k]) or torch.allclose(v, snapshot(head)[k],
                                                                                  equal_nan=True)
                               for k, v in before.items() if torch.is_tensor(v))
        head(x.requires_grad_(), y, idx).backward()  # both ranks still in step
        out["after"] = head.weight.clone()
        out["accumulation"] = _accumulate(rank, dist.group.WORLD)
        out["nan"] = _nan_on_rank_1(rank, dist.group.WORLD)
    finally:
        torch.save(out, os.path.join(out_dir, f"misuse{rank}.pt"))
        dist.destroy_process_group()


def _global_batches():
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(12, 6, generator=gen, dtype=torch.float64) * 5, torch.randint(0, 45, (12,), generator=gen),
             torch.arange(12) + 9 * k) for k in range(3)]  # rows 9..11 in two batches


def _accumulate(rank, group):
    """Three forwards summed, one backward; rank r passes rows 6r..6r+5 of each batch."""
    head = SparseSoftmaxHead(45, 6, 40, algorithm="sox", lr=0.7, epochs=2, dtype=torch.float64,
                             process_group=group, init_seed=3, **HP["sox"])
    head.set_epoch(1)
    part = slice(6 * rank, 6 * rank + 6)
    xs = [x[part].clone().requires_grad_(True) for x, _, _ in _global_batches()]
    sum(head(x, y[part], i[part]) for x, (_, y, i) in zip(xs, _global_batches())).backward()
    head.flush()
    return {"weight": head.weight.clone(), "nu": head.loss_fn.nu.clone(), "grads": [x.grad for x in xs]}


def _nan_on_rank_1(rank, group):
    """Checked every 2 steps, rank 1's embeddings of step 3 hold a NaN: both ranks stop
    at step 4's check naming step 3. Returns (message, steps taken)."""
    head = SparseSoftmaxHead(45, 6, 40, algorithm="scent", epochs=1, process_group=group, check_every=2)
    head.set_epoch(1)
    gen = torch.Generator().manual_seed(5)
    try:
        for step in range(1, 6):
            x = torch.randn(4, 6, generator=gen)
            y, idx = torch.randint(0, 45, (4,), generator=gen), torch.arange(4) + 4 * rank
            if step == 3 and rank == 1:
                x[2, 0] = math.nan
            head(x.requires_grad_(True), y, idx).backward()
    except DivergenceError as e:
        return str(e), head.steps
    return None, head.steps


def test_two_processes_refuse_a_bad_batch_together(tmp_path):
    """Class-sharded, one rank's bad batch makes every rank raise (the bad rank says what,
    the other names it) instead of leaving it waiting in a collective; nothing changes,
    and the next good step runs on both. A NaN in one rank's embeddings stops both at
    the same check, naming the step. Gradient accumulation over two processes equals
    the spec's sequential steps in float64."""
    mp.spawn(_misuse_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"misuse{r}.pt", weights_only=False) for r in range(2)]
    label_error = r"labels must be class ids in [0, 45), got 1 outside it, e.g. 45 at position 2 of rank 1's batch"
    assert ranks[0]["errors"][0] == ranks[1]["errors"][0] == label_error
    assert "index must be integer row ids, got torch.float32" in ranks[1]["errors"][1]
    assert ranks[1]["errors"][1].endswith("(rank 1)")
    assert ranks[0]["errors"][1] == "rank 1 passed a bad batch (its error says what)"
    assert ranks[0]["errors"][2].startswith("embeddings must be (B, 6) floats, got (5, 7)")
    assert ranks[1]["errors"][2] == "rank 0 passed a bad batch (its error says what)"
    assert ranks[0]["unchanged"] and ranks[1]["unchanged"]
    assert ranks[0]["after"].shape == (23, 6) and ranks[1]["after"].shape == (22, 6)
    # a NaN in one rank's embeddings: every rank stops at the same check, naming the step
    for r in range(2):
        message, steps = ranks[r]["nan"]
        assert steps == 4 and message.startswith("SparseSoftmaxHead diverged at step 3 (epoch 1, scent, lr 5): "
                                                 "non-finite in-batch logits"), (r, message)
    # gradient accumulation, class-sharded: the spec's sequential steps in backward order
    W0 = init_weight(45, 6, 3, dtype=torch.float64).numpy()
    W, nu, nu_set = W0, np.full(40, np.nan), np.zeros(40, dtype=bool)
    grads = []
    for x, y, i in reversed(_global_batches()):
        grads.append(spec_step("sox", HP["sox"], W0, np.full(40, np.nan), np.zeros(40, dtype=bool), x.numpy(),
                               y.numpy(), i.numpy(), 1, 2, lr_at(1, 2, 0.7))[0])
        _, W, nu, nu_set = spec_step("sox", HP["sox"], W, nu, nu_set, x.numpy(), y.numpy(), i.numpy(), 1, 2,
                                     lr_at(1, 2, 0.7))
    weight = torch.cat([r["accumulation"]["weight"] for r in ranks]).numpy()
    np.testing.assert_allclose(weight, W, rtol=1e-9, atol=1e-12)
    for r in range(2):
        np.testing.assert_allclose(ranks[r]["accumulation"]["nu"].numpy(), nu, rtol=1e-9, atol=1e-12)
        for got, full in zip(ranks[r]["accumulation"]["grads"], reversed(grads)):
            np.testing.assert_allclose(got.numpy(), full[6 * r:6 * r + 6], rtol=1e-9, atol=1e-12)
