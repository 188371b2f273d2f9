"""Image readers: DICOM folders, PNG/JPEG folders, MedMNIST npz (fedhealth.data.imaging)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fedhealth import settings
from fedhealth.data.imaging import read_dicom_folder, read_image_folder, read_npz
from fedhealth.errors import DataError


def shared_data() -> Path:
    return settings.SHARED_DATA.get()


def assert_close(actual: np.ndarray, expected: object, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(actual, np.asarray(expected, dtype=np.float64), atol=atol)


STORED = np.array([[0, 100], [200, 300]], dtype=np.uint16)


def write_dicom(
    path: Path,
    stored: np.ndarray = STORED,
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
    pixels: bool = True,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if pixels:
        ds.PixelData = stored.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_labels(folder: Path, rows: dict[str, object], name: str = "labels.csv") -> Path:
    path = folder / name
    path.write_text("file,label\n" + "".join(f"{f},{v}\n" for f, v in rows.items()))
    return path


# --- DICOM: pixel values ------------------------------------------------------


def test_rescale_is_applied(tmp_path):
    write_dicom(tmp_path / "a.dcm", slope=2, intercept=-100)  # -> -100, 100, 300, 500
    labels = write_labels(tmp_path, {"a.dcm": 1})
    data = read_dicom_folder(tmp_path, labels, image_size=2, window=(0, 500))
    assert data.X.shape == (1, 1, 2, 2) and data.X.dtype == np.float32
    assert_close(data.X[0, 0], [[0.0, 0.2], [0.6, 1.0]])
    # Without a window each image is min-max scaled on its own.
    data = read_dicom_folder(tmp_path, labels, image_size=2)
    assert_close(data.X[0, 0], [[0, 1 / 3], [2 / 3, 1]])
    assert data.y.tolist() == [1] and data.files == ["a.dcm"] and data.skipped == []


def test_monochrome1_is_inverted(tmp_path):
    write_dicom(tmp_path / "m1.dcm", photometric="MONOCHROME1", slope=2, intercept=-100)
    labels = write_labels(tmp_path, {"m1.dcm": 0})
    data = read_dicom_folder(tmp_path, labels, image_size=2)
    assert_close(data.X[0, 0], [[1, 2 / 3], [1 / 3, 0]])
    data = read_dicom_folder(tmp_path, labels, image_size=2, window=(0, 500))
    assert_close(data.X[0, 0], [[1.0, 0.8], [0.4, 0.0]])


def test_resize_non_square(tmp_path):
    stored = np.arange(48 * 30, dtype=np.uint16).reshape(48, 30)
    write_dicom(tmp_path / "sub" / "big.dcm", stored)  # subfolders are searched too
    labels = write_labels(tmp_path, {"sub/big.dcm": 1})
    data = read_dicom_folder(tmp_path, labels, image_size=16)
    assert data.X.shape == (1, 1, 16, 16)
    assert data.X.min() >= 0.0 and data.X.max() <= 1.0
    assert data.X[0, 0, 0, 0] < 0.1 and data.X[0, 0, -1, -1] > 0.9  # orientation kept


# --- DICOM: bad files ----------------------------------------------------------


def bad_folder(tmp_path: Path) -> Path:
    for name in ("a.dcm", "b.dcm"):
        write_dicom(tmp_path / name)
    raw = (tmp_path / "b.dcm").read_bytes()
    write_dicom(tmp_path / "trunc.dcm")
    (tmp_path / "trunc.dcm").write_bytes(raw[:-5])  # pixel data cut short
    (tmp_path / "notes.txt").write_text("not an image")
    write_dicom(tmp_path / "nopix.dcm", pixels=False)
    return write_labels(
        tmp_path, {"a.dcm": 0, "b.dcm": 1, "trunc.dcm": 1, "notes.txt": 0, "nopix.dcm": 0}
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("trunc.dcm", "cannot decode pixel data"),
        ("notes.txt", "not a DICOM file"),
        ("nopix.dcm", "no pixel data"),
    ],
)
def test_bad_file_raises_naming_file_and_reason(tmp_path, name, reason):
    labels = bad_folder(tmp_path)
    for other in {"trunc.dcm", "notes.txt", "nopix.dcm"} - {name}:
        (tmp_path / other).unlink()
    keep = {"a.dcm": 0, "b.dcm": 1, name: 0}
    labels = write_labels(tmp_path, keep)
    with pytest.raises(DataError) as err:
        read_dicom_folder(tmp_path, labels, image_size=2)
    msg = str(err.value)
    assert str(tmp_path / name) in msg and reason in msg and "skip_bad_files" in msg


def test_truncated_header_is_a_bad_file(tmp_path):
    write_dicom(tmp_path / "t.dcm")
    (tmp_path / "t.dcm").write_bytes((tmp_path / "t.dcm").read_bytes()[:200])
    labels = write_labels(tmp_path, {"t.dcm": 0})
    with pytest.raises(DataError, match=r"t\.dcm: cannot read as DICOM"):
        read_dicom_folder(tmp_path, labels, image_size=2)


def test_skip_bad_files_loads_the_rest(tmp_path):
    labels = bad_folder(tmp_path)
    data = read_dicom_folder(tmp_path, labels, image_size=2, skip_bad_files=True)
    assert data.files == ["a.dcm", "b.dcm"] and data.y.tolist() == [0, 1]
    reasons = dict(data.skipped)
    assert set(reasons) == {"trunc.dcm", "notes.txt", "nopix.dcm"}
    assert "not a DICOM file" in reasons["notes.txt"]


def test_all_files_bad(tmp_path):
    (tmp_path / "x.dcm").write_text("junk")
    labels = write_labels(tmp_path, {"x.dcm": 0})
    with pytest.raises(DataError, match="none of the 1 DICOM files"):
        read_dicom_folder(tmp_path, labels, image_size=2, skip_bad_files=True)


# --- DICOM: labels and folders ------------------------------------------------


def test_label_row_without_file_names_both(tmp_path):
    write_dicom(tmp_path / "a.dcm")
    labels = write_labels(tmp_path, {"a.dcm": 0, "gone.dcm": 1})
    with pytest.raises(DataError) as err:
        read_dicom_folder(tmp_path, labels, image_size=2)
    msg = str(err.value)
    assert "gone.dcm" in msg and str(labels) in msg and str(tmp_path) in msg


def test_file_without_label_names_both(tmp_path):
    write_dicom(tmp_path / "a.dcm")
    write_dicom(tmp_path / "extra.dcm")
    labels = write_labels(tmp_path, {"a.dcm": 0})
    with pytest.raises(DataError) as err:
        read_dicom_folder(tmp_path, labels, image_size=2, skip_bad_files=True)
    msg = str(err.value)
    assert "extra.dcm" in msg and str(labels) in msg


def test_labels_csv_outside_folder_and_hidden_files_ignored(tmp_path):
    folder = tmp_path / "images"
    write_dicom(folder / "a.dcm")
    (folder / ".DS_Store").write_text("x")
    labels = write_labels(tmp_path, {"./a.dcm": 3}, name="my-labels.csv")
    assert read_dicom_folder(folder, labels, image_size=2).y.tolist() == [3]


def test_empty_folder(tmp_path):
    labels = write_labels(tmp_path, {})
    with pytest.raises(DataError, match="has no DICOM files") as err:
        read_dicom_folder(tmp_path, labels, image_size=2)
    assert str(tmp_path) in str(err.value)


def test_missing_folder_and_labels(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        read_dicom_folder(tmp_path / "nope", tmp_path / "l.csv", image_size=2)
    with pytest.raises(DataError, match="labels CSV not found") as err:
        read_dicom_folder(tmp_path, tmp_path / "l.csv", image_size=2)
    assert str((tmp_path / "l.csv").resolve()) in str(err.value)


def test_bad_label_values_and_columns(tmp_path):
    write_dicom(tmp_path / "a.dcm")
    labels = write_labels(tmp_path, {"a.dcm": "sick"})
    with pytest.raises(DataError) as err:
        read_dicom_folder(tmp_path, labels, image_size=2)
    msg = str(err.value)
    assert str(labels) in msg and "'label'" in msg and "row 1" in msg and "'sick'" in msg
    with pytest.raises(DataError, match="column 'diagnosis' not found"):
        read_dicom_folder(tmp_path, labels, image_size=2, label_column="diagnosis")
    (tmp_path / "labels.csv").write_text("file,label\na.dcm,1\na.dcm,0\n")
    with pytest.raises(DataError, match="listed twice"):
        read_dicom_folder(tmp_path, labels, image_size=2)


# --- PNG / JPEG ------------------------------------------------------------------


def test_image_folder_png_jpeg_grey(tmp_path):
    grey = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(np.full((20, 12), 128, np.uint8)).save(tmp_path / "j.jpg")
    labels = write_labels(tmp_path, {"g.png": 0, "rgb.png": 1, "deep.png": 0, "j.jpg": 1})
    data = read_image_folder(tmp_path, labels, image_size=2)
    assert data.files == ["deep.png", "g.png", "j.jpg", "rgb.png"]
    assert data.y.tolist() == [0, 0, 1, 1]
    expected = grey / 255
    for i in (0, 1, 3):
        assert_close(data.X[i, 0], expected, atol=1e-3)
    assert data.X[2, 0] == pytest.approx(np.full((2, 2), 128 / 255), abs=0.02)


def test_image_folder_bad_file(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n-not-really")
    labels = write_labels(tmp_path, {"ok.png": 0, "bad.png": 1})
    with pytest.raises(DataError, match=r"bad\.png: cannot read as image"):
        read_image_folder(tmp_path, labels, image_size=4)
    data = read_image_folder(tmp_path, labels, image_size=4, skip_bad_files=True)
    assert data.files == ["ok.png"] and [f for f, _ in data.skipped] == ["bad.png"]


MEDNIST = shared_data() / "mednist-mini" / "MedNIST_test.tar.gz"


@pytest.mark.skipif(not MEDNIST.is_file(), reason=f"shared MedNIST sample not found at {MEDNIST}")
def test_real_mednist_jpegs(tmp_path):
    with tarfile.open(MEDNIST) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "MedNIST"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = {f"{c}/{f.name}": i for i, c in enumerate(classes) for f in sorted((root / c).iterdir())}
    labels = write_labels(tmp_path, rows)
    data = read_image_folder(root, labels, image_size=32)
    assert data.X.shape == (12, 1, 32, 32)
    assert sorted(np.bincount(data.y).tolist()) == [2] * 6
    assert data.X.min() >= 0.0 and data.X.max() <= 1.0 and data.X.std() > 0.05


# --- npz -------------------------------------------------------------------------


def write_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez_compressed(path, **arrays)
    return path


def test_npz_splits_and_scaling(tmp_path):
    path = write_npz(tmp_path / "m.npz")
    train = read_npz(path, "train", image_size=8)
    assert train.X.shape == (6, 1, 8, 8) and train.y.tolist() == [0, 1, 0, 1, 0, 1]
    raw = np.load(path)["train_images"]
    assert np.allclose(train.X[:, 0], raw / 255.0)
    assert train.files[0] == "m.npz:train[0]"
    both = read_npz(path, "all", image_size=4)
    assert both.X.shape == (11, 1, 4, 4) and both.files[-1] == "m.npz:test[2]"


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match="npz file not found"):
        read_npz(tmp_path / "none.npz", "train", 8)
    path = write_npz(tmp_path / "m.npz")
    with pytest.raises(DataError, match="split must be"):
        read_npz(path, "validation", 8)
    np.savez(tmp_path / "k.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="train_images, train_labels not found; keys present: x"):
        read_npz(tmp_path / "k.npz", "train", 8)
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(DataError, match="cannot read"):
        read_npz(tmp_path / "junk.npz", "train", 8)


BREAST = shared_data() / "medmnist-breastmnist" / "breastmnist.npz"


@pytest.mark.skipif(not BREAST.is_file(), reason=f"shared BreastMNIST not found at {BREAST}")
def test_real_breastmnist():
    data = read_npz(BREAST, "train", image_size=28)
    assert data.X.shape == (546, 1, 28, 28) and data.X.dtype == np.float32
    assert np.bincount(data.y).tolist() == [147, 399]
    assert data.X.min() == 0.0 and data.X.max() == 1.0
    assert read_npz(BREAST, "all", image_size=28).X.shape[0] == 780


# --- several bad files; DICOM without preamble (newcomer defects) ---------------


def test_every_bad_file_is_named_in_one_error(tmp_path):
    labels = bad_folder(tmp_path)
    with pytest.raises(DataError) as err:
        read_dicom_folder(tmp_path, labels, image_size=2)
    msg = str(err.value)
    assert "3 files cannot be read as DICOM" in msg and "skip_bad_files = true" in msg
    for name in ("trunc.dcm", "notes.txt", "nopix.dcm"):
        assert str(tmp_path / name) in msg


def write_without_preamble(path: Path, file_meta: bool) -> Path:
    """The DICOM of ``write_dicom`` without its 128-byte preamble and 'DICM' prefix (and,
    with ``file_meta=False``, without its file meta group: a bare implicit-VR data set)."""
    import io

    full = write_dicom(path)
    if file_meta:
        path.write_bytes(full.read_bytes()[132:])
        return path
    ds = pydicom.dcmread(full)
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("file_meta", [True, False])
def test_dicom_without_preamble_is_read_with_a_warning(tmp_path, caplog, file_meta):
    write_dicom(tmp_path / "a.dcm")
    bare = write_without_preamble(tmp_path / "b.dcm", file_meta)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(bare)  # what rejected it before
    labels = write_labels(tmp_path, {"a.dcm": 0, "b.dcm": 1})
    with caplog.at_level("WARNING", logger="fedhealth.data.imaging"):
        data = read_dicom_folder(tmp_path, labels, image_size=2)
    assert data.files == ["a.dcm", "b.dcm"] and data.skipped == []
    assert_close(data.X[1, 0], data.X[0, 0])  # the same pixels as the standard file
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(bare) in m and "no DICOM preamble" in m for m in warned)
    assert not any("a.dcm" in m for m in warned)


def test_text_file_is_still_not_dicom_when_forced(tmp_path):
    write_dicom(tmp_path / "a.dcm")
    (tmp_path / "notes.txt").write_bytes(b"\x08\x00\x16\x00" + b"not an image" * 20)
    labels = write_labels(tmp_path, {"a.dcm": 0, "notes.txt": 1})
    with pytest.raises(DataError, match=r"notes\.txt: cannot read as DICOM: not a DICOM file"):
        read_dicom_folder(tmp_path, labels, image_size=2)
