"""Book-keeping DP-SGD and the vectorised Poisson loader equal Opacus's reference path.

Same model, same data, same sampling and noise generators: fedhealth's ``bk`` path and
Opacus (``hooks``; ``ew`` for ResNet18) must draw the same batches and move the weights
to the same place, with and without noise; every batch the loader yields is a step the
accountant is charged for.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedhealth.errors import ConfigError, FedHealthError
from fedhealth.models import build_model
from fedhealth.privacy.dp.bookkeeping import supports
from fedhealth.privacy.dp.local import make_private

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(shape: tuple[int, ...], n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, *shape, generator=g) * 3, torch.randint(0, 2, (n,), generator=g)
    )


def _train(base: nn.Module, ds: TensorDataset, mode: str, sigma: float, steps: int = 3):
    """Weights after ``steps`` DP-SGD steps, the batch sizes seen and the PrivateTraining."""
    model = copy.deepcopy(base)
    loader = DataLoader(ds, batch_size=8, generator=torch.Generator().manual_seed(5))
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        loader,
        noise_multiplier=sigma,
        max_grad_norm=0.5,
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(7),
    )
    batches = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in pt.data_loader:
            pt.optimizer.zero_grad()
            pt.criterion(pt.model(x), y).backward()
            pt.optimizer.step()
            batches.append(y.clone())
            if len(batches) >= steps:
                break
    pt.release()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), batches, pt


ZOO = [
    ("logistic_regression", {"name": "logistic_regression"}, (13,), "hooks"),
    ("mlp", {"name": "mlp", "hidden": [32, 16], "dropout": 0.0}, (30,), "hooks"),
    ("small_cnn", {"name": "small_cnn", "channels": [8, 16]}, (1, 16, 16), "hooks"),
]


@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("name,spec,shape,reference", ZOO, ids=[z[0] for z in ZOO])
def test_bk_equals_opacus_on_the_zoo(name, spec, shape, reference, sigma):
    base = build_model(spec, shape[0], 2, seed=0)
    ds = _data(shape)
    ours, our_batches, pt = _train(base, ds, "bk", sigma)
    ref, ref_batches, _ = _train(base, ds, reference, sigma)
    assert pt.grad_sample_mode == "bk"
    assert all(torch.equal(a, b) for a, b in zip(our_batches, ref_batches, strict=True))
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    assert (ref - start).norm() > 0.1  # the step moved the weights
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,reference", [("densenet121", "hooks"), ("resnet18", "ew")])
def test_bk_equals_opacus_on_monai_models(name, reference):
    pytest.importorskip("monai")
    base = build_model({"name": name, "groups": 8}, 1, 2, seed=0)
    ds = _data((1, 32, 32), n=16)
    ours, _, pt = _train(base, ds, "bk", 1.0, steps=1)
    ref, _, _ = _train(base, ds, reference, 1.0, steps=1)
    assert pt.grad_sample_mode == "bk"
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_clipping_bounds_every_sample_and_matches_a_loop():
    """σ = 0, one full batch: the update is the mean of per-sample gradients clipped to C."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(6, 5) * 4, torch.randint(0, 2, (6,))
    expected = []
    for i in range(6):
        m = copy.deepcopy(model)
        nn.CrossEntropyLoss()(m(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters()])
        expected.append(g * min(1.0, 0.1 / (float(g.norm()) + 1e-6)))
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        DataLoader(TensorDataset(x, y), batch_size=6),
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        poisson_sampling=False,
        grad_sample_mode="bk",
    )
    pt.optimizer.zero_grad()
    pt.criterion(pt.model(x), y).backward()
    pt.optimizer.step()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(got, torch.stack(expected).sum(0) / 6, atol=1e-6)


def test_noise_has_the_calibrated_std():
    """Empty batches: the gradient is pure noise, std σC / expected batch size."""
    model = nn.Sequential(nn.Linear(200, 50))
    ds = TensorDataset(torch.zeros(64, 200), torch.zeros(64, dtype=torch.long))
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(ds, batch_size=8),
        noise_multiplier=1.3,
        max_grad_norm=2.0,
        grad_sample_mode="bk",
    )
    pt.optimizer.zero_grad()
    empty = torch.zeros(0, 200)
    pt.criterion(pt.model(empty), torch.zeros(0, dtype=torch.long)).backward()
    pt.optimizer.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert noise.std().item() == pytest.approx(1.3 * 2.0 / 8, rel=0.05)


def test_every_batch_is_a_step_and_the_loader_matches_opacus():
    """Vectorised Poisson loader: Opacus's batches, int(1/q) of them, empty ones included."""
    from opacus.data_loader import DPDataLoader

    ds = _data((3,), n=40)
    for seed in range(3):
        model = nn.Sequential(nn.Linear(3, 2))
        pt = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(ds, batch_size=20, generator=torch.Generator().manual_seed(seed)),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="bk",
        )
        ref = DPDataLoader.from_data_loader(
            DataLoader(ds, batch_size=20, generator=torch.Generator().manual_seed(seed))
        )
        ours_b, ref_b = list(pt.data_loader), list(ref)
        assert len(ours_b) == len(ref_b) == pt.steps_per_epoch == 2
        assert pt.sample_rate == ref.sample_rate == 0.5
        for (xa, ya), (xb, yb) in zip(ours_b, ref_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # A q small enough that empty batches occur: each still is a step (noise only).
    model = nn.Sequential(nn.Linear(3, 2))
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(_data((3,), n=5), batch_size=1, generator=torch.Generator().manual_seed(1)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    steps, sizes = 0, []
    for _ in range(4):
        for x, y in pt.data_loader:
            pt.optimizer.zero_grad()
            pt.criterion(pt.model(x), y).backward()
            pt.optimizer.step()
            steps += 1
            sizes.append(len(y))
    assert steps == 4 * pt.steps_per_epoch == 20
    assert 0 in sizes  # empty Poisson batches happened and were stepped


def test_step_without_the_private_criterion_is_refused():
    model = nn.Sequential(nn.Linear(4, 2))
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(_data((4,)), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert pt.grad_sample_mode == "bk"
    x, y = next(iter(pt.data_loader))
    nn.CrossEntropyLoss()(pt.model(x), y).backward()  # plain loss: nothing clipped
    with pytest.raises(FedHealthError, match=r"PrivateTraining\.criterion"):
        pt.optimizer.step()


def test_unsupported_layers_fall_back_to_opacus_and_bk_refuses_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    assert "PReLU" in supports(model)
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(_data((4,)), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert pt.grad_sample_mode == "hooks"
    assert any("PReLU" in n for n in pt.notes)
    pt.release()
    other = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"'bk'.*PReLU"):
        make_private(
            other,
            torch.optim.SGD(other.parameters(), lr=0.1),
            DataLoader(_data((4,)), batch_size=8),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="bk",
        )
    lin = nn.Linear(4, 4)
    assert "shares" in supports(nn.Sequential(lin, nn.ReLU(), lin))


def test_release_removes_the_hooks():
    model = nn.Sequential(nn.Linear(4, 2))
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(_data((4,)), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert pt.release() is model
    assert not model[0]._forward_hooks
    again = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(_data((4,)), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert again.grad_sample_mode == "bk"


def test_bk_equals_opacus_with_a_sum_loss():
    """A "sum" loss: no division by the batch size, the same clipped, noised update."""
    base = build_model({"name": "mlp", "hidden": [16]}, 6, 2, seed=0)
    ds = _data((6,))
    out = {}
    for mode in ("bk", "hooks"):
        model = copy.deepcopy(base)
        pt = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(ds, batch_size=8, generator=torch.Generator().manual_seed(5)),
            noise_multiplier=1.0,
            max_grad_norm=0.5,
            grad_sample_mode=mode,
            criterion=nn.CrossEntropyLoss(reduction="sum"),
            noise_generator=torch.Generator().manual_seed(7),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x, y in pt.data_loader:
                pt.optimizer.zero_grad()
                pt.criterion(pt.model(x), y).backward()
                pt.optimizer.step()
        pt.release()
        out[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(out["bk"], out["hooks"], atol=1e-5, rtol=1e-5)
