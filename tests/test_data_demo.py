"""Demo data generators round-trip through the readers (fedhealth.data.demo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from fedhealth.data.demo import (
    LABELS_FILE,
    breast_cancer_feature_names,
    breast_cancer_schema,
    write_breast_cancer_sites,
    write_demo_data,
    write_dicom_phantoms,
)
from fedhealth.data.imaging import read_dicom_folder
from fedhealth.data.normalisation import Standardizer
from fedhealth.data.tabular import read_table
from fedhealth.errors import ConfigError

SITES = ["st-olav", "karolinska", "charite"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- breast cancer ---------------------------------------------------------------


def test_breast_cancer_sites_are_non_iid_and_complete(tmp_path):
    paths = write_breast_cancer_sites(tmp_path, SITES, seed=0)
    assert set(paths) == set(SITES)
    assert all(paths[s] == tmp_path / s / "breast-cancer.csv" for s in SITES)
    frames = {s: pd.read_csv(p) for s, p in paths.items()}
    first = frames[SITES[0]]
    assert list(first.columns) == [*breast_cancer_feature_names(), "diagnosis"]
    assert first.columns[0] == "mean_radius" and "worst_concave_points" in first.columns
    assert sum(len(f) for f in frames.values()) == 569
    pooled = pd.concat(frames.values())
    assert (pooled["diagnosis"] == "malignant").sum() == 212
    assert len(pooled.drop_duplicates()) == 569  # every patient exactly once
    shares = []
    for frame in frames.values():
        counts = frame["diagnosis"].value_counts()
        assert counts["malignant"] >= 10 and counts["benign"] >= 10
        shares.append(counts["malignant"] / len(frame))
    assert len({len(f) for f in frames.values()}) == 3  # different sizes
    assert max(shares) - min(shares) > 0.15  # label skew


def test_breast_cancer_reads_with_its_schema(tmp_path):
    paths = write_breast_cancer_sites(tmp_path, ["a", "b"], seed=3)
    data = read_table(paths["a"], breast_cancer_schema())
    assert data.X.shape[1] == 30 and data.n_dropped == 0
    assert set(data.y.tolist()) == {0, 1}
    raw = pd.read_csv(paths["a"])
    assert data.y.tolist() == (raw["diagnosis"] == "malignant").astype(int).tolist()


def test_breast_cancer_deterministic_in_seed(tmp_path):
    write_breast_cancer_sites(tmp_path / "x", SITES, seed=5)
    write_breast_cancer_sites(tmp_path / "y", SITES, seed=5)
    write_breast_cancer_sites(tmp_path / "z", SITES, seed=6)
    assert tree_bytes(tmp_path / "x") == tree_bytes(tmp_path / "y")
    assert tree_bytes(tmp_path / "x") != tree_bytes(tmp_path / "z")


@pytest.mark.parametrize("sites", [[], ["a", "a"], ["../up"]])
def test_bad_site_names(tmp_path, sites):
    with pytest.raises(ConfigError):
        write_breast_cancer_sites(tmp_path, sites)


# --- DICOM phantoms ------------------------------------------------------------


def test_phantoms_are_valid_varied_dicom(tmp_path):
    folder = write_dicom_phantoms(tmp_path / "d", n_images=24, seed=1, positive_fraction=0.25)
    labels = pd.read_csv(folder / LABELS_FILE)
    assert list(labels.columns) == ["file", "label"] and len(labels) == 24
    assert labels["label"].sum() == 6
    photometric, slopes, intercepts, sizes = set(), set(), set(), set()
    for name in labels["file"]:
        ds = pydicom.dcmread(folder / name)  # no force: the file meta is present
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.BitsAllocated == 16 and ds.pixel_array.dtype == np.uint16
        assert 48 <= ds.Rows <= 96 and 48 <= ds.Columns <= 96
        photometric.add(ds.PhotometricInterpretation)
        slopes.add(float(ds.RescaleSlope))
        intercepts.add(float(ds.RescaleIntercept))
        sizes.add((ds.Rows, ds.Columns))
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert len(slopes) > 1 and len(intercepts) > 1 and len(sizes) > 1


def test_phantoms_round_trip_and_look_alike_across_photometrics(tmp_path):
    folder = write_dicom_phantoms(tmp_path, n_images=30, seed=2)
    data = read_dicom_folder(folder, folder / LABELS_FILE, image_size=32)
    assert data.X.shape == (30, 1, 32, 32) and data.skipped == []
    # Air in the corners is dark whether the file is MONOCHROME1 or 2.
    assert data.X[:, 0, :3, :3].max() < 0.2
    # The lesion makes the body's bright area larger in class 1.
    bright = (data.X > 0.75).mean(axis=(1, 2, 3))
    assert bright[data.y == 1].mean() > bright[data.y == 0].mean()


def test_phantoms_deterministic_and_rewritten(tmp_path):
    a = write_dicom_phantoms(tmp_path / "a", n_images=6, seed=9)
    b = write_dicom_phantoms(tmp_path / "b", n_images=6, seed=9)
    assert tree_bytes(a) == tree_bytes(b)
    (a / "keep.txt").write_text("mine")
    write_dicom_phantoms(a, n_images=3, seed=9)  # fewer files: stale ones go
    assert sorted(p.name for p in a.iterdir()) == [
        "keep.txt", "labels.csv", "phantom-0000.dcm", "phantom-0001.dcm", "phantom-0002.dcm",
    ]  # fmt: skip
    with pytest.raises(ConfigError):
        write_dicom_phantoms(tmp_path / "c", n_images=1, seed=0)


def small_cnn() -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    width = 1
    for c in (8, 16, 32):  # conv -> GroupNorm -> ReLU -> pool, as the model zoo's small_cnn
        layers += [
            torch.nn.Conv2d(width, c, 3, padding=1),
            torch.nn.GroupNorm(4, c),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        ]
        width = c
    return torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 2)
    )


@pytest.fixture
def one_thread():
    # Two threads on a shared 2-core machine can be many times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_phantoms_are_learnable_by_a_small_cnn(tmp_path, one_thread):
    torch.manual_seed(0)
    train = write_dicom_phantoms(tmp_path / "train", n_images=200, seed=10)
    test = write_dicom_phantoms(tmp_path / "test", n_images=60, seed=11)
    tr = read_dicom_folder(train, train / LABELS_FILE, image_size=32)
    te = read_dicom_folder(test, test / LABELS_FILE, image_size=32)
    scale = Standardizer.fit(tr.X)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(scale.transform(tr.X)), torch.from_numpy(tr.y)
    x_test = torch.from_numpy(scale.transform(te.X))
    best = 0.0
    for _ in range(8):
        for batch in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
        with torch.no_grad():
            best = max(best, float((model(x_test).argmax(1).numpy() == te.y).mean()))
    # Learnability, not training stability: the best epoch must be clearly right.
    assert best >= 0.9


# --- everything ---------------------------------------------------------------


def test_write_demo_data_layout_and_non_iid(tmp_path):
    out = write_demo_data(tmp_path, SITES, seed=0)
    counts, shares = [], []
    for site in SITES:
        paths = out[site]
        assert paths["tabular"] == tmp_path / site / "breast-cancer.csv"
        assert paths["dicom"] == tmp_path / site / "dicom"
        assert paths["labels"] == tmp_path / site / "dicom" / "labels.csv"
        table = read_table(paths["tabular"], breast_cancer_schema())
        images = read_dicom_folder(paths["dicom"], paths["labels"], image_size=16)
        assert table.X.shape[1] == 30
        assert set(images.y.tolist()) == {0, 1}
        counts.append(len(images.y))
        shares.append(images.y.mean())
    assert len(set(counts)) == 3 and max(shares) - min(shares) > 0.1
    again = write_demo_data(tmp_path / "again", SITES, seed=0)
    assert tree_bytes(again[SITES[0]]["dicom"]) == tree_bytes(out[SITES[0]]["dicom"])
