"""Demo data for the quickstart, generated offline and deterministically.

* Tabular: scikit-learn's bundled Wisconsin breast-cancer data (real clinical
  measurements, 569 patients, 30 features) split across sites non-IID.
* Imaging: synthetic CT-like phantom DICOM files with a learnable binary label
  (class 1 has a bright round "lesion").

Layout written by :func:`write_demo_data`::

    root/<site>/breast-cancer.csv
    root/<site>/dicom/phantom-0000.dcm ...
    root/<site>/dicom/labels.csv          (columns file,label)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from fedhealth.data.tabular import TabularSchema
from fedhealth.errors import ConfigError

TABULAR_FILE = "breast-cancer.csv"
DICOM_DIR = "dicom"
LABELS_FILE = "labels.csv"
LABEL_COLUMN = "diagnosis"
# Malignant is the positive class (1), the clinical convention; note that
# scikit-learn's own target uses 0 for malignant.
BREAST_CANCER_LABEL_MAP = {"benign": 0, "malignant": 1}
DIRICHLET_ALPHA = 0.5
MIN_PER_CLASS = 10  # each site gets at least this many of each class (when possible)

_PHANTOM_NAME = re.compile(r"^phantom-\d+\.dcm$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def breast_cancer_feature_names() -> list[str]:
    """The 30 snake_case feature columns of the demo CSV, in order."""
    from sklearn.datasets import load_breast_cancer

    return [_snake(n) for n in load_breast_cancer().feature_names]


def breast_cancer_schema() -> TabularSchema:
    """The :class:`TabularSchema` that reads the demo breast-cancer CSVs."""
    return TabularSchema(
        numeric=breast_cancer_feature_names(),
        categorical={},
        label=LABEL_COLUMN,
        label_map=dict(BREAST_CANCER_LABEL_MAP),
    )


def write_breast_cancer_sites(out_dir: Path, sites: list[str], seed: int = 0) -> dict[str, Path]:
    """Split the breast-cancer data across sites, non-IID, one CSV per site.

    Each class is spread over the sites with Dirichlet(0.5) proportions, after
    giving every site a minimum of each class (10, or fewer if there are many
    sites), so sites differ in size and in class balance.

    Parameters
    ----------
    out_dir : Path
        Root folder; writes ``<out_dir>/<site>/breast-cancer.csv``.
    sites : list of str
        Site names (distinct; letters, digits, ``.``, ``_``, ``-``).
    seed : int
        Same seed, same split.

    Returns
    -------
    dict of str to Path
        Site -> CSV path. Columns: 30 snake_case features, then ``diagnosis``
        (``malignant``/``benign``).
    """
    from sklearn.datasets import load_breast_cancer

    _check_sites(sites)
    data = load_breast_cancer()
    rng = np.random.default_rng(seed)
    k = len(sites)
    per_site: list[list[int]] = [[] for _ in sites]
    for cls in np.unique(data.target):
        idx = rng.permutation(np.flatnonzero(data.target == cls))
        floor = min(MIN_PER_CLASS, idx.size // k)
        if floor < 1:
            raise ConfigError(f"too many sites ({k}) to give each one both classes")
        counts = floor + rng.multinomial(idx.size - floor * k, rng.dirichlet([DIRICHLET_ALPHA] * k))
        for site_rows, part in zip(per_site, np.split(idx, np.cumsum(counts)[:-1]), strict=True):
            site_rows.extend(part.tolist())

    columns = [_snake(n) for n in data.feature_names]
    out: dict[str, Path] = {}
    for site, kept in zip(sites, per_site, strict=True):
        rows = rng.permutation(kept)
        frame = pd.DataFrame(data.data[rows], columns=columns)
        frame[LABEL_COLUMN] = np.where(data.target[rows] == 0, "malignant", "benign")
        path = Path(out_dir) / site / TABULAR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        out[site] = path
    return out


def write_dicom_phantoms(
    out_dir: Path,
    n_images: int,
    seed: int,
    image_size: int = 64,
    photometric_mix: bool = True,
    positive_fraction: float = 0.5,
) -> Path:
    """Write synthetic CT-like phantom DICOM files and their ``labels.csv``.

    Each image is an elliptical "body" (soft tissue, about 40 HU) with two darker
    "lungs" and a bony "spine" (500-700 HU), in air (-1000 HU), with Gaussian
    noise. Label 1 images also hold one round "enhancing lesion" (900-1200 HU,
    the brightest structure) of random position and radius (10-16 % of the
    side), label 0 images none: a small CNN learns it in a few epochs. Files are
    valid DICOM (CT Image Storage, explicit VR little endian, 16-bit unsigned
    pixels) with RescaleSlope/RescaleIntercept varying per file and sides drawn
    from 0.75-1.5 x ``image_size`` (48-96 px for 64). With ``photometric_mix``
    about a quarter are MONOCHROME1 (stored inverted, so they look the same
    once read).

    Earlier ``phantom-*.dcm`` files and ``labels.csv`` in ``out_dir`` are
    replaced; other files are left alone.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (created).
    n_images : int
        Number of files (at least 2).
    seed : int
        Same seed, same files.
    image_size : int
        Nominal side length.
    photometric_mix : bool
        Write some files as MONOCHROME1.
    positive_fraction : float
        Fraction of label-1 images (at least one of each class is written).

    Returns
    -------
    Path
        ``out_dir``.
    """
    if n_images < 2:
        raise ConfigError(f"n_images must be at least 2 (one per class), not {n_images}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if _PHANTOM_NAME.match(old.name) or old.name == LABELS_FILE:
            old.unlink()

    rng = np.random.default_rng(seed)
    n_pos = int(np.clip(round(n_images * positive_fraction), 1, n_images - 1))
    labels = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n_images - n_pos, int)])
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series")
    lo, hi = round(0.75 * image_size), round(1.5 * image_size)
    rows = []
    for i, label in enumerate(labels):
        shape = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
        hu = _phantom(rng, shape, bool(label))
        monochrome1 = photometric_mix and rng.random() < 0.25
        name = f"phantom-{i:04d}.dcm"
        _write_ct(out_dir / name, hu, rng, monochrome1, i, seed, study_uid, series_uid)
        rows.append((name, int(label)))
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(out_dir / LABELS_FILE, index=False)
    return out_dir


def write_demo_data(
    root: Path, sites: list[str], seed: int = 0, images_per_site: int = 120
) -> dict[str, dict[str, Path]]:
    """Write the quickstart's tabular and imaging data for every site.

    Image counts vary per site (about 0.6-1.4 x ``images_per_site``) and so
    does the share of lesion images (about 25-65 %), so the imaging data is
    non-IID too.

    Parameters
    ----------
    root : Path
        Root folder; each site gets ``root/<site>/``.
    sites : list of str
        Site names.
    seed : int
        Same seed, same data.
    images_per_site : int
        Mean number of DICOM images per site.

    Returns
    -------
    dict
        Site -> ``{"tabular": csv, "dicom": folder, "labels": labels.csv}``.
    """
    _check_sites(sites)
    tables = write_breast_cancer_sites(root, sites, seed)
    rng = np.random.default_rng([seed, 1])
    out: dict[str, dict[str, Path]] = {}
    for i, site in enumerate(sites):
        n = max(20, round(images_per_site * rng.uniform(0.6, 1.4)))
        folder = write_dicom_phantoms(
            Path(root) / site / DICOM_DIR,
            n_images=n,
            seed=seed * 1000 + i,
            positive_fraction=float(rng.uniform(0.25, 0.65)),
        )
        out[site] = {"tabular": tables[site], "dicom": folder, "labels": folder / LABELS_FILE}
    return out


# --- helpers -----------------------------------------------------------------


def _check_sites(sites: list[str]) -> None:
    if not sites:
        raise ConfigError("demo data needs at least one site")
    if len(set(sites)) != len(sites):
        raise ConfigError(f"site names must be distinct, got {sites}")
    bad = [s for s in sites if not _SITE_NAME.match(s)]
    if bad:
        raise ConfigError(
            f"site name(s) {bad} cannot be folder names; use letters, digits, '.', '_', '-'"
        )


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    # Derived from the seed, so the same seed writes byte-identical files.
    return generate_uid(entropy_srcs=["fedhealth-demo", str(seed), *map(str, parts)])


def _phantom(rng: np.random.Generator, shape: tuple[int, int], lesion: bool) -> np.ndarray:
    """Hounsfield units of one phantom slice."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy / h - 0.5, xx / w - 0.5  # image-relative coordinates in [-0.5, 0.5)
    cy, cx = rng.uniform(-0.04, 0.04, size=2)
    ry, rx = rng.uniform(0.33, 0.44), rng.uniform(0.36, 0.46)
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    hu = np.full(shape, -1000.0)
    hu[body] = 40.0
    for side in (-1, 1):  # two air-filled "lungs"
        ly, lx = cy + rng.uniform(-0.05, 0.05), cx + side * rx * 0.45
        lungs = ((yy - ly) / (ry * 0.55)) ** 2 + ((xx - lx) / (rx * 0.3)) ** 2 <= 1.0
        hu[lungs & body] = -800.0
    # A bony "spine" in every image, so class 0 has a bright blob too and the
    # lesion (brighter still) is what tells the classes apart.
    spine = (yy - cy - 0.72 * ry) ** 2 + (xx - cx) ** 2 <= rng.uniform(0.045, 0.06) ** 2
    hu[spine] = rng.uniform(500.0, 700.0)
    if lesion:
        r = rng.uniform(0.1, 0.16)
        # Somewhere inside the body, away from its edge.
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55)
        py, px = cy + dist * ry * np.sin(angle), cx + dist * rx * np.cos(angle)
        spot = (yy - py) ** 2 + (xx - px) ** 2 <= r**2
        hu[spot] = rng.uniform(900.0, 1200.0)
    return hu + rng.normal(0.0, 25.0, size=shape)


def _write_ct(
    path: Path,
    hu: np.ndarray,
    rng: np.random.Generator,
    monochrome1: bool,
    index: int,
    seed: int,
    study_uid: str,
    series_uid: str,
) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    slope = float(rng.choice([0.5, 1.0, 2.0]))
    intercept = float(rng.integers(-1300, -1100))
    stored = np.clip(np.rint((hu - intercept) / slope), 0, 65535)
    if monochrome1:
        stored = stored.max() - stored  # high stored value = dark in MONOCHROME1
    stored = stored.astype(np.uint16)

    sop_uid = _uid(seed, "image", index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientName = f"Phantom^{seed}"
    ds.PatientID = f"PHANTOM-{seed}"
    ds.SeriesDescription = "fedhealth synthetic phantom"
    ds.InstanceNumber = index + 1
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [0.8, 0.8]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = stored.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
