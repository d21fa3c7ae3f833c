"""``xcent import``: checkpoints of the reference implementation (Optimization-AI/SCENT,
``xc/train.py``) become xcent checkpoints, and resuming one continues the run.

The reference's checkpoints are written here by a small re-creation of its save code
(its ``LinearClassifier``: one bias-free ``nn.Linear``; plain SGD with a cosine
schedule; ``criterion.nu`` of shape (N, 1) with 0 for a dual never set), not by the
reference repository itself.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from xcent.cli import main as xcent_main


class LinearClassifier(nn.Module):
    """The reference's model: its only parameter is ``fc.weight`` (C, D)."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)


def reference_save(path, weight: torch.Tensor, epoch: int, nu: torch.Tensor | None, lr: float = 5.0,
                   epochs: int = 3, momentum: float = 0.0) -> None:
    """What the reference's train.py writes after ``epoch`` epochs."""
    model = LinearClassifier(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        model.fc.weight.copy_(weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if momentum:  # one step, so that the momentum buffer exists
        model.fc.weight.sum().backward()
        optimizer.step()
        with torch.no_grad():
            model.fc.weight.copy_(weight)
    with warnings.catch_warnings():  # the reference steps its scheduler after training, not here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epoch):
            scheduler.step()
    save_dict = {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(), "epoch": epoch}
    if nu is not None:
        save_dict["criterion_nu"] = nu.reshape(-1, 1).cpu()  # the reference keeps nu as (N, 1)
    torch.save(save_dict, path)


def train(data, out, name, *extra) -> int:
    return xcent_main(["train", "--data-dir", str(data), "--out-dir", str(out), "--name", name, "--device", "cpu",
                       "--batch-size", "64", "--lr", "2.0", "--seed", "3", *map(str, extra)])


def test_resume_of_an_imported_checkpoint_continues_the_run(tiny_data, tmp_path, capsys):
    """Run A trains 3 epochs. Its epoch-1 state, written in the reference's format and
    imported, resumed for epochs 2-3 gives A's epoch-3 weight and duals."""
    assert train(tiny_data, tmp_path / "runs", "a", "--epochs", 3, "--save-frequency", 1) == 0
    ckpt_1 = torch.load(tmp_path / "runs/a/checkpoints/epoch_1.pt", weights_only=True)
    ckpt_3 = torch.load(tmp_path / "runs/a/checkpoints/epoch_3.pt", weights_only=True)
    num_unset = int((~ckpt_1["nu_set"]).sum())
    nu_ref = torch.where(ckpt_1["nu_set"], ckpt_1["nu"], torch.zeros_like(ckpt_1["nu"]))  # unset -> 0
    reference_save(tmp_path / "epoch_1.pt", ckpt_1["weight"], 1, nu_ref, lr=2.0, epochs=3)
    capsys.readouterr()
    assert xcent_main(["import", "--checkpoint", str(tmp_path / "epoch_1.pt"), "--algorithm", "scent",
                       "--out", str(tmp_path / "imported.pt"), "--data-dir", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert f"{num_unset} unset (nu == 0 in the reference)" in out and "epoch 1" in out
    assert "learning rate 2.0" in out

    imported = torch.load(tmp_path / "imported.pt", weights_only=True)
    torch.testing.assert_close(imported["weight"], ckpt_1["weight"], rtol=0, atol=0)
    assert torch.equal(imported["nu_set"], ckpt_1["nu_set"]) and imported["epoch"] == 1
    torch.testing.assert_close(imported["nu"][imported["nu_set"]], ckpt_1["nu"][ckpt_1["nu_set"]], rtol=0, atol=0)
    assert torch.isnan(imported["nu"][~imported["nu_set"]]).all()

    assert train(tiny_data, tmp_path / "runs", "b", "--epochs", 3, "--resume", tmp_path / "imported.pt") == 0
    resumed = torch.load(tmp_path / "runs/b/checkpoints/epoch_3.pt", weights_only=True)
    assert resumed["epoch"] == 3
    torch.testing.assert_close(resumed["weight"], ckpt_3["weight"], rtol=1e-5, atol=1e-6)
    assert torch.equal(resumed["nu_set"], ckpt_3["nu_set"])
    torch.testing.assert_close(resumed["nu"][resumed["nu_set"]], ckpt_3["nu"][ckpt_3["nu_set"]], rtol=1e-5, atol=1e-6)
    records = (tmp_path / "runs/b/eval_b.jsonl").read_text().splitlines()
    assert [int(r.split('"epoch": ')[1].split(",")[0]) for r in records] == [2, 3]  # continued, not restarted


def test_unset_duals_are_exactly_the_zeros(tmp_path, capsys):
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((7, 5)).astype(np.float32))
    nu = torch.from_numpy(rng.standard_normal(40).astype(np.float32))
    zeros = torch.from_numpy(rng.random(40) < 0.3)
    nu[zeros] = 0.0
    nu[1] = -0.0  # the reference's test is nu == 0.0, which -0.0 passes
    zeros[1] = True
    reference_save(tmp_path / "ref.pt", weight, 4, nu, epochs=10, momentum=0.9)
    assert xcent_main(["import", "--checkpoint", str(tmp_path / "ref.pt"), "--algorithm", "sox",
                       "--out", str(tmp_path / "x.pt")]) == 0
    out = capsys.readouterr().out
    assert f"{40 - int(zeros.sum())} duals set, {int(zeros.sum())} unset" in out
    assert "momentum buffer" in out  # dropped, and said so
    x = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(x["nu_set"], ~zeros) and x["algorithm"] == "sox" and x["epoch"] == 4
    assert torch.equal(x["nu"][~zeros], nu[~zeros]) and torch.isnan(x["nu"][zeros]).all()
    assert torch.equal(x["weight"], weight) and (x["num_classes"], x["feature_dim"], x["num_samples"]) == (7, 5, 40)
    # and the other readers take it as an xcent checkpoint
    assert xcent_main(["export", "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "x.safetensors")]) == 0


def test_bsgd_needs_the_data_for_its_row_count(tiny_data, tmp_path, capsys):
    weight = torch.randn(60, 16)
    reference_save(tmp_path / "bsgd.pt", weight, 2, None)
    args = ["import", "--checkpoint", str(tmp_path / "bsgd.pt"), "--algorithm", "bsgd", "--out", str(tmp_path / "b.pt")]
    assert xcent_main(args) == 2
    assert "--data-dir" in capsys.readouterr().err and not (tmp_path / "b.pt").exists()
    assert xcent_main([*args, "--data-dir", str(tiny_data)]) == 0
    assert "no duals (bsgd)" in capsys.readouterr().out
    x = torch.load(tmp_path / "b.pt", weights_only=True)
    assert x["num_samples"] == 960 and not x["nu_set"].any() and torch.equal(x["weight"], weight)


@pytest.mark.parametrize("problem", ["dual_for_bsgd", "no_dual", "bias", "xcent_file", "rows_mismatch",
                                     "classes_too_few"])
def test_mismatches_are_one_line_exit_2(tiny_data, tmp_path, capsys, problem):
    weight, nu, algorithm, extra = torch.randn(60, 16), torch.randn(960), "scent", ["--data-dir", str(tiny_data)]
    if problem == "dual_for_bsgd":
        algorithm = "bsgd"
    elif problem == "no_dual":
        nu = None
    elif problem == "rows_mismatch":
        nu = torch.randn(900)
    elif problem == "classes_too_few":
        weight = torch.randn(10, 16)
    path = tmp_path / "ref.pt"
    reference_save(path, weight, 1, nu)
    if problem == "bias":
        saved = torch.load(path, weights_only=True)
        saved["model_state"]["fc.bias"] = torch.zeros(60)
        torch.save(saved, path)
    elif problem == "xcent_file":
        torch.save({"format": "xcent-checkpoint-v1", "weight": weight}, path)
    code = xcent_main(["import", "--checkpoint", str(path), "--algorithm", algorithm, "--out",
                       str(tmp_path / "x.pt"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("xcent import: error:")
    assert not (tmp_path / "x.pt").exists()


def test_a_weight_beyond_float32_is_refused_after_the_cast(tiny_data, tmp_path, capsys):
    """The reference's fc.weight in float64 holding 1e39: finite in the file, inf in the
    float32 checkpoint import writes. Checked after the cast: exit 2 naming the row."""
    path = tmp_path / "ref.pt"
    reference_save(path, torch.randn(60, 16), 1, torch.randn(960))
    saved = torch.load(path, weights_only=True)
    weight = saved["model_state"]["fc.weight"].double()
    weight[4, 2] = 1e39
    saved["model_state"]["fc.weight"] = weight
    torch.save(saved, path)
    code = xcent_main(["import", "--checkpoint", str(path), "--algorithm", "scent", "--out", str(tmp_path / "x.pt"),
                       "--data-dir", str(tiny_data)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'fc.weight' holds a value that is not finite in float32" in err and "row 4" in err
    assert not (tmp_path / "x.pt").exists()
