"""Record-level DP-SGD: make_private on the zoo's model shapes, validation, loader maths."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedhealth.errors import ConfigError, FedHealthError
from fedhealth.privacy.dp.local import (
    PrivateTraining,
    make_private,
    pick_grad_sample_mode,
    sample_rate,
    steps_per_epoch,
)

# PyTorch notes that a full backward hook fires without input grads: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from more
    yield
    torch.set_num_threads(threads)


def _loader(shape: tuple[int, ...], n: int, batch_size: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _train(pt: PrivateTraining, max_steps: int = 2) -> int:
    steps = 0
    for x, y in pt.data_loader:
        pt.optimizer.zero_grad()
        loss = pt.criterion(pt.model(x), y)
        loss.backward()
        pt.optimizer.step()
        steps += 1
        if steps >= max_steps:
            break
    return steps


def _logreg() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 2))


def _mlp_layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))


def _cnn_groupnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def _mlp_wide() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 512),
        nn.LayerNorm(512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 2),
    )


@pytest.mark.parametrize(
    "build,shape,mode",
    [
        # Tiny Linear models: ghost's second backward pass costs more than it saves.
        (_logreg, (10,), "hooks"),
        (_mlp_layernorm, (10,), "hooks"),
        (_mlp_wide, (10,), "ghost"),
        (_cnn_groupnorm, (1, 8, 8), "hooks"),
    ],
)
def test_make_private_small_models(build, shape, mode):
    torch.manual_seed(0)
    model = build()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pt = make_private(
        model,
        opt,
        _loader(shape, 64, 8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(1),
    )
    assert pt.grad_sample_mode == "bk"  # every zoo layer type: book-keeping
    assert pick_grad_sample_mode(build(), batch_size=8) == mode  # Opacus's path otherwise
    assert pt.sample_rate == pytest.approx(1 / 8) and pt.steps_per_epoch == 8
    assert _train(pt) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_make_private_monai_densenet121_groupnorm():
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    model = monai.networks.nets.DenseNet121(
        spatial_dims=2, in_channels=1, out_channels=2, norm=("group", {"num_groups": 8})
    )
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())  # MONAI took the spec
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pt = make_private(
        model, opt, _loader((1, 32, 32), 8, 4), noise_multiplier=1.0, max_grad_norm=1.0
    )
    assert pt.grad_sample_mode == "bk"
    assert any("in-place" in n for n in pt.notes)  # MONAI's ReLU(inplace=True) switched off
    assert _train(pt, max_steps=1) == 1


def test_ghost_and_hooks_clip_identically():
    """Two Opacus paths, one answer: with σ=0 both must apply the same clipped mean."""
    torch.manual_seed(0)
    base = _mlp_layernorm()
    x = torch.randn(16, 10) * 5
    y = torch.randint(0, 2, (16,))
    results = {}
    for mode in ("hooks", "ghost"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        pt = make_private(
            model,
            opt,
            DataLoader(TensorDataset(x, y), batch_size=16),
            noise_multiplier=0.0,
            max_grad_norm=0.1,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        assert pt.grad_sample_mode == mode
        _train(pt, max_steps=1)
        results[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = results["hooks"] - torch.cat([p.detach().flatten() for p in base.parameters()])
    assert 0 < moved.norm() <= 0.1 + 1e-5  # clipped mean of per-sample grads, lr 1
    assert torch.allclose(results["hooks"], results["ghost"], atol=1e-5)


def test_ghost_guard_refuses_unclipped_step():
    model = _logreg()
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        _loader((10,), 32, 8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
    )
    assert pt.grad_sample_mode == "ghost"
    x, y = next(iter(pt.data_loader))
    nn.CrossEntropyLoss()(pt.model(x), y).backward()  # the wrong loss: no clipping pass
    with pytest.raises(FedHealthError, match=r"PrivateTraining\.criterion"):
        pt.optimizer.step()


def test_auto_falls_back_to_hooks_when_ghost_fails(monkeypatch):
    from opacus import PrivacyEngine

    def broken(self, **kwargs):
        raise TypeError("simulated ghost-clipping API mismatch")

    monkeypatch.setattr(PrivacyEngine, "_prepare_criterion", broken)
    # Pretend book-keeping cannot take the model, so that auto chooses among Opacus's paths.
    monkeypatch.setattr("fedhealth.privacy.dp.bookkeeping.supports", lambda m: "test")
    model = _mlp_wide()  # auto picks ghost for it
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        _loader((10,), 32, 8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert pt.grad_sample_mode == "hooks"
    assert any("fell back to hooks" in n and "simulated" in n for n in pt.notes)
    assert _train(pt, 2) == 2
    other = _logreg()
    with pytest.raises(ConfigError, match=r"'ghost'.*simulated"):  # asked for: no fallback
        make_private(
            other,
            torch.optim.SGD(other.parameters(), lr=0.1),
            _loader((10,), 32, 8),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
        )


def test_release_and_rewrap_next_round():
    model = _logreg()
    loader = _loader((10,), 32, 8)
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="hooks",
    )
    with pytest.raises(ConfigError, match="release"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    plain = pt.release()
    assert plain is model
    again = make_private(
        plain,
        torch.optim.SGD(plain.parameters(), lr=0.1),
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert _train(again, 1) == 1


def test_batchnorm_is_refused_naming_the_layer():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    )
    with pytest.raises(ConfigError) as exc:
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader((1, 8, 8), 8, 4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            site="cleveland",
        )
    msg = str(exc.value)
    assert "layer '1' (BatchNorm2d)" in msg and "site 'cleveland'" in msg and "GroupNorm" in msg
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_frozen_batchnorm_is_refused_too():
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    for p in model[1].parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"layer '1' \(BatchNorm1d\)"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader((10,), 8, 4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"grad_sample_mode": "fast"}, "grad_sample_mode"),
        ({"noise_multiplier": -1.0}, "noise multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"criterion": nn.CrossEntropyLoss(reduction="none")}, "reduce"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    model = _logreg()
    args = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=fragment):
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), _loader((10,), 8, 4), **args
        )


def test_shared_parameters_avoid_ghost():
    lin = nn.Linear(4, 4)
    assert pick_grad_sample_mode(nn.Sequential(lin, nn.ReLU(), lin)) == "hooks"


@pytest.mark.parametrize(
    "n,batch",
    [(303, 32), (1000, 64), (372, 4), (10, 4), (5, 8), (600, 6), (1000, 1000)],
)
def test_loader_maths_matches_opacus(n, batch):
    from opacus.data_loader import DPDataLoader

    for drop_last in (False, True):
        if drop_last and batch > n:
            continue
        dl = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch, drop_last=drop_last)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = DPDataLoader.from_data_loader(dl)
        assert sample_rate(n, batch, drop_last) == dp.sample_rate
        assert steps_per_epoch(n, batch, drop_last) == len(dp) == len(dp.batch_sampler)
    assert sample_rate(n, batch) <= batch / n + 1e-12


def test_steps_per_epoch_reproduces_opacus_rounding():
    # Opacus runs int(1 / (1 / 93)) = 92 batches for a 93-batch loader.
    assert math.ceil(372 / 4) == 93 and steps_per_epoch(372, 4) == 92
    with pytest.raises(ConfigError):
        sample_rate(0, 4)
