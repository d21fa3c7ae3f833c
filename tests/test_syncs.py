"""Host synchronisations of the training step (issue 15): at most one per step, none
between the checks of a :class:`xcent.step.StepMonitor`.

On the CPU a "sync" cannot be observed, so the tests make the step's reads visible:

* explicit reads go through :mod:`xcent.sync` and are counted (``read_count``);
* :class:`SyncTracer` catches implicit ones: it marks the tensors that would live on
  the accelerator (weight, features, duals, momentum buffer, monitor) and everything
  computed from them (a TorchDispatchMode follows every op), and counts each read of a
  marked tensor's values (``item``/``bool``/``int``/``float``, i.e.
  ``aten._local_scalar_dense``; ``tolist``/``numpy``) and each op whose output shape
  depends on a marked tensor's data (``unique``, ``nonzero``, boolean-mask indexing, ...)
  that does not come through :mod:`xcent.sync`. Host data (labels, index, LazySGD's
  counters, softplus's mirror) stays unmarked, as on a GPU machine.

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` makes any sync between checks fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from xcent import sync
from xcent.classifier import init_weight
from xcent.losses import build
from xcent.step import LazySGD, StepMonitor, train_step

ALGOS = ["scent", "sox", "asgd", "softplus", "umax", "bsgd"]
aten = torch.ops.aten

#: ops whose output shape (or result) depends on their input's values: a sync on CUDA
DATA_DEPENDENT = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten._unique.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.equal.default,
    aten.is_nonzero.default, aten.bincount.default, aten.repeat_interleave.Tensor, aten.argwhere.default,
}
MASK_INDEXED = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class SyncTracer:
    """Counts implicit host reads of "device" tensors (see the module docstring)."""

    def __init__(self):
        self.marked = WeakIdKeyDictionary()
        self.implicit: list[str] = []
        tracer = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                inputs = list(_tensors((args, kwargs)))
                hot = any(t in tracer.marked for t in inputs)
                if hot and (func in DATA_DEPENDENT or (func in MASK_INDEXED and any(
                        t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])))):
                    tracer.implicit.append(str(func))
                out = func(*args, **kwargs)
                if hot:
                    tracer.mark(*_tensors(out), *_written(func, args, kwargs))
                return out

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in ("tolist", "numpy", "__array__") and args and args[0] in tracer.marked:
                    tracer.implicit.append(name)
                return func(*args, **(kwargs or {}))

        self._modes = (Function(), Dispatch())

    def mark(self, *tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.marked[t] = True
                if t._base is not None:
                    self.marked[t._base] = True

    def unmark(self, t):  # what an explicit read returns is host data
        self.marked.pop(t, None)

    def __enter__(self):
        sync.watchers.append(self.unmark)
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        sync.watchers.remove(self.unmark)


def _written(func, args, kwargs) -> list:
    """The tensors ``func`` writes into (in-place ops, ``out=`` arguments)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            out.extend(_tensors(value))
    return out


def _batches(num_steps, B=12, C=40, N=60, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        out.append((torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen),
                    torch.randperm(N, generator=gen)[:B].sort().values))
    return out


def _setup(name, momentum=0.0, weight_decay=0.0, C=40, N=60, D=8):
    weight = init_weight(C, D, seed=1) * 30
    loss_fn = build(name, N, epochs=2)
    loss_fn.set_epoch(1)
    optimizer = LazySGD(C, D, momentum, weight_decay)
    return weight, loss_fn, optimizer


VARIANTS = [(name, 0.0, 0.0) for name in ALGOS] + [("scent", 0.9, 0.01), ("softplus", 0.0, 0.05)]


@pytest.mark.parametrize("name,momentum,weight_decay", VARIANTS)
def test_step_reads_the_device_once_per_check(name, momentum, weight_decay):
    """Every step (first visits and revisits, every algorithm, lazy momentum/weight
    decay) reads nothing from the device; a check every 3 steps is one read."""
    weight, loss_fn, optimizer = _setup(name, momentum, weight_decay)
    monitor = StepMonitor(3, weight.device)
    tracer = SyncTracer()
    tracer.mark(weight, loss_fn.nu, loss_fn.nu_set, monitor.values, *([optimizer.buf] if optimizer.buf is not None
                                                                        else []))
    per_step = []
    with tracer:
        for step, (x, y, idx) in enumerate(_batches(10)):
            if step == 5:
                loss_fn.set_epoch(2)  # revisits
            tracer.mark(x)
            before = sync.read_count()
            result = train_step(weight, loss_fn, x, y, idx, 0.1, check_finite=False, optimizer=optimizer)
            assert not result.skipped
            monitor.record(result.health, step + 1)
            if monitor.due:
                assert monitor.check() == (None, [])
            per_step.append(sync.read_count() - before)
    assert tracer.implicit == [], tracer.implicit
    assert per_step == [0, 0, 1] * 3 + [0], per_step


@pytest.mark.parametrize("name", ["softplus", "asgd"])
def test_immediate_check_is_one_read(name):
    weight, loss_fn, optimizer = _setup(name)
    tracer = SyncTracer()
    tracer.mark(weight, loss_fn.nu, loss_fn.nu_set)
    with tracer:
        for x, y, idx in _batches(4):
            tracer.mark(x)
            before = sync.read_count()
            assert train_step(weight, loss_fn, x, y, idx, 0.1).finite
            assert sync.read_count() - before == 1
    assert tracer.implicit == []


def test_tracer_catches_implicit_reads():
    """The tracer is not blind: the reads the step used to make are caught."""
    tracer = SyncTracer()
    w = torch.randn(5)
    tracer.mark(w)
    with tracer:
        v = (w * 2).abs()
        bool(v.sum() > 0)
        torch.unique(v)
        v[v > 1]
        v.tolist()
        int(torch.searchsorted(v.sort().values, 0.5))
        host = torch.arange(5)
        int(host.max())  # host data: not a sync
        sync.host_read(v)  # explicit: counted by xcent.sync, not here
    assert tracer.implicit == ["aten._local_scalar_dense.default", "aten._unique2.default", "aten.index.Tensor",
                               "tolist", "aten._local_scalar_dense.default"], tracer.implicit


def test_monitor_names_the_first_bad_step():
    weight, loss_fn, _ = _setup("asgd")
    monitor = StepMonitor(5, weight.device)
    batches = _batches(5)
    for step, (x, y, idx) in enumerate(batches):
        lr = float("inf") if step == 2 else 0.1  # step 3 makes its rows non-finite
        result = train_step(weight, loss_fn, x, y, idx, lr, check_finite=False)
        monitor.record(result.health, step + 1)
    assert monitor.due
    before = sync.read_count()
    bad, extra = monitor.check(torch.tensor([1.5, 2.5]))
    assert (bad, extra) == (3, [1.5, 2.5]) and sync.read_count() - before == 1
    assert len(monitor) == 0 and monitor.check() == (None, [])


def test_step_health_flags_overflow_and_nan():
    loss_fn = build("asgd", 4)
    loss_fn.set_epoch(1, 1)
    rows = torch.ones(2, 3)
    loss_fn.value, loss_fn.overflow = torch.tensor(0.5), torch.tensor(False)
    from xcent.step import step_health
    assert step_health(loss_fn, rows).item() == 6.5
    loss_fn.overflow = torch.tensor(True)
    assert step_health(loss_fn, rows).isnan()
    loss_fn.overflow = torch.tensor(False)
    assert not step_health(loss_fn, rows * float("inf")).isfinite()


def _logits(idx, K=5):
    z = torch.randn(len(idx), K, generator=torch.Generator().manual_seed(int(idx.sum())))
    z[torch.arange(len(idx)), idx % K] = float("-inf")
    return z


def test_softplus_host_mirror_follows_the_duals():
    """softplus decides "first visit?" from a host mirror of nu_set; the mirror is
    rebuilt (one counted read) whenever nu_set changed outside the algorithm's own
    steps (a loaded state: at once, a user's fill_: when next needed), and .to()
    keeps it valid."""
    indices = [_batches(1, N=30, seed=s)[0][2] for s in range(6)]
    ref = build("softplus", 30, epochs=2)
    ref.set_epoch(1)
    for idx in indices[:3]:
        ref.weights(_logits(idx), idx)
    copy = build("softplus", 30, epochs=2).to(torch.float32)
    copy.set_epoch(1)
    copy.weights(_logits(indices[5]), indices[5])  # its mirror now disagrees with ref's state
    before = sync.read_count()
    copy.load_state_dict(ref.state_dict())
    assert sync.read_count() == before + 1  # refreshed on load (here on the host: no sync)
    for a in (ref, copy):
        a.set_epoch(2)
    for idx in indices[3:]:
        before = sync.read_count()
        G_ref = ref.weights(_logits(idx), idx)
        G = copy.weights(_logits(idx), idx)
        assert sync.read_count() == before  # the stepping algorithms' own mirrors stay valid
        torch.testing.assert_close(G, G_ref, rtol=0, atol=0)
        torch.testing.assert_close(copy.nu, ref.nu, rtol=0, atol=0, equal_nan=True)
    # a user marks every dual set: the next step treats the rows as revisits, as a
    # freshly loaded copy of the same state does
    ref.nu_set.fill_(True)
    ref.nu.nan_to_num_(0.0)
    twin = build("softplus", 30, epochs=2)
    twin.load_state_dict(ref.state_dict())
    twin.set_epoch(2)
    ref.nu_set.fill_(True)  # written again after the twin's copy: still stale
    idx = torch.arange(18, 30)
    before = sync.read_count()
    G_ref = ref.weights(_logits(idx), idx)
    assert sync.read_count() == before + 1
    torch.testing.assert_close(G_ref, twin.weights(_logits(idx), idx), rtol=0, atol=0)
    torch.testing.assert_close(ref.nu, twin.nu, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["softplus", "scent", "bsgd"])
def test_head_step_reads_nothing_given_host_ids(name):
    """SparseSoftmaxHead: forward + backward with labels and index on the host make no
    device read (with momentum and weight decay: LazySGD's counters are host-side)."""
    from xcent import SparseSoftmaxHead

    head = SparseSoftmaxHead(40, 8, 60, algorithm=name, epochs=2, momentum=0.9, weight_decay=0.01)
    head.set_epoch(1)
    backbone = torch.nn.Linear(8, 8)
    tracer = SyncTracer()
    tracer.mark(head.weight, head.loss_fn.nu, head.loss_fn.nu_set, head.momentum_buffer,
                *backbone.parameters())
    with tracer:
        for step, (x, y, idx) in enumerate(_batches(6)):
            if step == 3:
                head.set_epoch(2)
            before = sync.read_count()
            head(backbone(x), y, idx).backward()
            assert sync.read_count() == before
    assert tracer.implicit == [], tracer.implicit


@pytest.mark.parametrize("name", ["softplus", "scent"])
def test_head_reads_the_device_once_per_check(name):
    """The head's health check: no read on ordinary steps, one every ``check_every``
    steps (the health and batch CE bound of those steps together), and one at
    ``set_epoch`` for the steps not yet read."""
    from xcent import SparseSoftmaxHead

    head = SparseSoftmaxHead(40, 8, 60, algorithm=name, epochs=2, momentum=0.9, weight_decay=0.01, check_every=3)
    head.set_epoch(1)
    backbone = torch.nn.Linear(8, 8)
    tracer = SyncTracer()
    tracer.mark(head.weight, head.loss_fn.nu, head.loss_fn.nu_set, head.momentum_buffer, head._monitor.values,
                head._batch_ce, *backbone.parameters())
    reads = []
    with tracer:
        for x, y, idx in _batches(7):
            before = sync.read_count()
            head(backbone(x), y, idx).backward()
            reads.append(sync.read_count() - before)
        before = sync.read_count()
        head.set_epoch(2)
        reads.append(sync.read_count() - before)
    assert reads == [0, 0, 1, 0, 0, 1, 0, 1] and tracer.implicit == [], (reads, tracer.implicit)


def _sharded_worker(rank, world, store_path, out_dir):
    import torch.distributed as dist

    from xcent.distributed import class_range

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        results = {}
        for name in ("softplus",):  # the host mirror and LazySGD's counters (one algorithm: spawning is slow)
            weight, loss_fn, _ = _setup(name)
            lo, hi = class_range(weight.shape[0], rank, world)
            shard = weight[lo:hi].clone()
            optimizer = LazySGD(hi - lo, weight.shape[1], 0.9, 0.01)
            monitor = StepMonitor(3, shard.device, dist.group.WORLD)
            tracer = SyncTracer()
            tracer.mark(shard, loss_fn.nu, loss_fn.nu_set, monitor.values, optimizer.buf)
            reads = []
            with tracer:
                for step, (x, y, idx) in enumerate(_batches(7)):
                    tracer.mark(x)
                    before = sync.read_count()
                    result = train_step(shard, loss_fn, x, y, idx, 0.1, check_finite=False, lo=lo,
                                        process_group=dist.group.WORLD, optimizer=optimizer)
                    monitor.record(result.health, step + 1)
                    if monitor.due:
                        assert monitor.check()[0] is None
                    reads.append(sync.read_count() - before)
            results[name] = (reads, tracer.implicit)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_step_reads_the_device_once_per_check(tmp_path):
    """Class-sharded over 2 gloo processes: no read per step either, and a check (one
    all-reduce of the recorded values, then one read) every 3 steps."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        for name, (reads, implicit) in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert reads == [0, 0, 1, 0, 0, 1, 0] and implicit == [], (rank, name, reads, implicit)


@pytest.mark.parametrize("name", ALGOS)
def test_no_sync_between_checks_on_cuda(device, name):
    if device.type != "cuda":
        pytest.skip("CUDA only (the CPU twin is test_step_reads_the_device_once_per_check)")
    weight = (init_weight(40, 8, seed=1) * 30).to(device)
    loss_fn = build(name, 60, epochs=2).to(device)
    loss_fn.set_epoch(1)
    optimizer = LazySGD(40, 8, 0.9, 0.01, device=device)
    monitor = StepMonitor(4, device)
    batches = [(x.to(device), y, idx) for x, y, idx in _batches(8)]
    train_step(weight, loss_fn, *batches[0], 0.1, check_finite=False, optimizer=optimizer)  # warm-up
    torch.cuda.synchronize()
    try:
        for step, (x, y, idx) in enumerate(batches[1:]):
            torch.cuda.set_sync_debug_mode("error")
            result = train_step(weight, loss_fn, x, y, idx, 0.1, check_finite=False, optimizer=optimizer)
            monitor.record(result.health, step + 1)
            torch.cuda.set_sync_debug_mode(0)
            if monitor.due:
                assert monitor.check()[0] is None
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("name", ["scent", "softplus"])
def test_head_no_sync_between_checks_on_cuda(device, name):
    """SparseSoftmaxHead on CUDA, labels and index on the host: forward + backward make
    no synchronisation except on the steps whose health check is due."""
    if device.type != "cuda":
        pytest.skip("CUDA only (the CPU twin is test_head_reads_the_device_once_per_check)")
    from xcent import SparseSoftmaxHead

    head = SparseSoftmaxHead(40, 8, 60, algorithm=name, epochs=2, momentum=0.9, weight_decay=0.01, device=device,
                             check_every=3)
    head.set_epoch(1)
    backbone = torch.nn.Linear(8, 8).to(device)
    batches = [(x.to(device), y, idx) for x, y, idx in _batches(8)]
    head(backbone(batches[0][0]), *batches[0][1:]).backward()  # warm-up (step 1)
    torch.cuda.synchronize()
    try:
        for step, (x, y, idx) in enumerate(batches[1:], 2):
            due = step % 3 == 0
            torch.cuda.set_sync_debug_mode(0 if due else "error")
            head(backbone(x), y, idx).backward()
            torch.cuda.set_sync_debug_mode(0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert head.steps == 8 and torch.isfinite(head.weight).all()


def test_trainer_check_interval_changes_nothing(tmp_path, capsys):
    """The deferred check is invisible: a run whose step goes non-finite mid-epoch (a
    NaN feature row, let through with --no-check-features) stops with the same
    message, naming the exact step, and leaves the same outputs whether its steps are
    checked every step or every 100."""
    from conftest import read_jsonl

    from xcent import cli
    from xcent.data import write_split
    from xcent.train import epoch_permutation

    rng = np.random.default_rng(2)
    data = tmp_path / "d"
    for split, n in (("train", 400), ("val", 40)):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        if split == "train":
            x[123, 3] = np.nan
        write_split(data / split, x, rng.integers(0, 20, n))
    order = epoch_permutation(400, 42, 1)
    bad_step = int((order == 123).nonzero()[0, 0]) // 16 + 1
    assert bad_step > 1
    errors, outputs = {}, {}
    for every in (1, 100):
        name = f"every{every}"
        code = cli.main(["train", "--data-dir", str(data), "--out-dir", str(tmp_path), "--name", name,
                         "--algorithm", "asgd", "--epochs", "2", "--batch-size", "16", "--seed", "42",
                         "--no-check-features", "--check-every-steps", str(every), "--log-every-steps", "5",
                         "--init", "random"])  # class means would carry the NaN row into the start
        assert code == 3
        errors[every] = capsys.readouterr().err.strip().splitlines()[-1]
        steps = read_jsonl(tmp_path / name / f"steps_{name}.jsonl")
        saved = sorted(f.name for f in (tmp_path / name).glob("checkpoints/*"))
        outputs[every] = ([(r["batch"], r["loss"]) for r in steps], saved)
    assert f"training diverged at epoch 1, step {bad_step} (asgd" in errors[1], errors[1]
    assert errors[1] == errors[100].replace("every100", "every1")  # the last good checkpoint is in its run
    assert outputs[1][0] == outputs[100][0] and all(b < bad_step - 1 for b, _ in outputs[1][0])
    assert outputs[1][1] == outputs[100][1]
