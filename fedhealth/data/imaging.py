"""Read a site's images (DICOM folder, PNG/JPEG folder, MedMNIST npz).

Every reader returns :class:`ImageData` with ``X`` of shape (N, 1, S, S),
float32 in [0, 1]. How values reach [0, 1]:

* DICOM: the modality LUT (RescaleSlope/RescaleIntercept, e.g. to Hounsfield
  units) is applied, then each image is min-max scaled on its own, so scanners
  with different rescale settings or bit depths give comparable inputs.
  Pass ``window=(low, high)`` in modality units (e.g. HU) to use one fixed range
  for the whole data set instead (values clipped). MONOCHROME1 images (where
  high values are dark) are inverted afterwards, so bright always means high.
* PNG/JPEG and npz: divided by the bit-depth range (255 for 8-bit, 65535 for
  16-bit), the data set's fixed range, as MedMNIST does.

Images are resized to S x S (aspect ratio not kept) with antialiased bilinear
interpolation; an image already S x S is left untouched.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedhealth.catalogue import READERS
from fedhealth.config.site import DataSourceBase
from fedhealth.errors import DataError

log = logging.getLogger(__name__)

NPZ_SPLITS = ("train", "val", "test")
# Files in an image folder that are never images to label.
IGNORED_NAMES = {"DICOMDIR", "Thumbs.db"}


@dataclass
class ImageData:
    """Images and labels of one site.

    Attributes
    ----------
    X : numpy.ndarray
        float32, (N, 1, S, S), values in [0, 1] (see the module docstring).
    y : numpy.ndarray
        int64, (N,).
    files : list of str
        Source of each image: path relative to the folder, or ``name:split[i]``.
    skipped : list of tuple of str
        ``(file, reason)`` for each bad file skipped with ``skip_bad_files``.
    """

    X: np.ndarray
    y: np.ndarray
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _BadFile(Exception):
    """A file that cannot be read as an image; the message is the reason."""


def read_dicom_folder(
    folder: Path,
    labels_csv: Path,
    image_size: int,
    skip_bad_files: bool = False,
    file_column: str = "file",
    label_column: str = "label",
    window: tuple[float, float] | None = None,
) -> ImageData:
    """Read the labelled DICOM files of a folder.

    Parameters
    ----------
    folder : Path
        Folder searched recursively; hidden files, ``DICOMDIR`` and the labels
        CSV itself are ignored, every other file must be a labelled image.
    labels_csv : Path
        CSV with a header and columns ``file_column`` (path relative to
        ``folder``) and ``label_column`` (integer class).
    image_size : int
        Output side length S.
    skip_bad_files : bool
        Record unreadable files (not DICOM, truncated, no pixel data) in
        ``skipped`` and load the rest, instead of raising.
    file_column, label_column : str
        Column names in the labels CSV.
    window : tuple of float, optional
        Fixed (low, high) range in modality units instead of per-image min-max.

    Returns
    -------
    ImageData

    Raises
    ------
    DataError
        Missing folder or CSV, empty folder, a label row without a file or a
        file without a label, a bad label, or a bad file (unless skipped).
    """
    return _read_folder(
        folder,
        labels_csv,
        image_size,
        skip_bad_files,
        file_column,
        label_column,
        lambda path: _load_dicom(path, window),
        "DICOM",
    )


def read_image_folder(
    folder: Path,
    labels_csv: Path,
    image_size: int,
    skip_bad_files: bool = False,
    file_column: str = "file",
    label_column: str = "label",
) -> ImageData:
    """Read the labelled PNG/JPEG files of a folder, converted to grey.

    Parameters and errors are those of :func:`read_dicom_folder` (without
    ``window``); values are divided by 255 (16-bit: 65535).
    """
    return _read_folder(
        folder,
        labels_csv,
        image_size,
        skip_bad_files,
        file_column,
        label_column,
        _load_picture,
        "image",
    )


def read_npz(path: Path, split: str, image_size: int) -> ImageData:
    """Read a MedMNIST-style ``.npz`` (keys ``{split}_images``, ``{split}_labels``).

    Parameters
    ----------
    path : Path
        The ``.npz`` file.
    split : {"train", "val", "test", "all"}
        Which split; ``"all"`` concatenates train, val and test.
    image_size : int
        Output side length S (28 keeps MedMNIST's 28 x 28 as is).

    Returns
    -------
    ImageData
        ``files`` are ``"<name>:<split>[i]"``.
    """
    path = Path(path)
    _check_size(image_size)
    if split not in (*NPZ_SPLITS, "all"):
        raise DataError(f"{path}: split must be train, val, test or all, not {split!r}")
    if not path.is_file():
        raise DataError(f"npz file not found: {path.resolve()}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile/pickle errors of all kinds
        raise DataError(f"{path}: cannot read as a numpy .npz archive: {exc}") from exc
    with archive:
        keys = set(archive.files)
        splits = NPZ_SPLITS if split == "all" else (split,)
        files: list[str]
        images, labels, files = [], [], []
        for name in splits:
            missing = [k for k in (f"{name}_images", f"{name}_labels") if k not in keys]
            if missing:
                raise DataError(
                    f"{path}: key(s) {', '.join(missing)} not found; keys present: "
                    f"{', '.join(sorted(keys))}"
                )
            imgs, labs = archive[f"{name}_images"], archive[f"{name}_labels"]
            labs = np.asarray(labs)
            if labs.ndim == 2 and labs.shape[1] == 1:
                labs = labs[:, 0]
            if labs.ndim != 1 or labs.shape[0] != imgs.shape[0]:
                raise DataError(
                    f"{path}: {name}_labels has shape {labs.shape} for {imgs.shape[0]} "
                    "images; only one integer label per image is supported"
                )
            images.append(imgs)
            labels.append(labs.astype(np.int64))
            files.extend(f"{path.name}:{name}[{i}]" for i in range(imgs.shape[0]))
    X = np.concatenate([_to_grey_unit(imgs, path) for imgs in images])
    X = _resize_batch(X, image_size)
    return ImageData(X=X, y=np.concatenate(labels), files=files, skipped=[])


# --- dataset kinds a site profile may register ------------------------------


class _LabelledFolder(DataSourceBase):
    labels: Path = Field(
        Path("labels.csv"), description="Labels CSV (file,label), relative to the folder."
    )
    skip_bad_files: bool = Field(
        False, description="Skip unreadable files (reported by name) instead of failing."
    )

    def labels_path(self) -> Path:
        """The labels CSV (relative paths are relative to the folder)."""
        return self.labels if self.labels.is_absolute() else self.path / self.labels


class DicomSource(_LabelledFolder):
    """A folder of DICOM files with a labels CSV (``file,label``)."""

    kind: Literal["dicom"] = Field(description="A folder of DICOM files.")
    path: Path = Field(description="The folder.")


class ImageFolderSource(_LabelledFolder):
    """A folder of PNG/JPEG images with a labels CSV (``file,label``)."""

    kind: Literal["images"] = Field(description="A folder of PNG/JPEG images.")
    path: Path = Field(description="The folder.")


class NpzSource(DataSourceBase):
    """A MedMNIST-style ``.npz`` (``<split>_images``, ``<split>_labels``)."""

    kind: Literal["npz"] = Field(description="A MedMNIST-style .npz archive.")
    path: Path = Field(description="The .npz file.")
    split: Literal["train", "val", "test", "all"] = Field(
        "all", description="Which split's arrays to read; 'all' concatenates them."
    )


def _result(img: ImageData) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]]]:
    return img.X, img.y, [], list(img.skipped)


@READERS.register(
    "dicom", traits={"image"}, options=DicomSource, imports=("pydicom", "pydicom.pixels")
)
def read_dicom_source(source: DicomSource, task: dict[str, Any]) -> Any:
    """Read a registered DICOM folder for ``task`` (its ``image_size``)."""
    size = int(task.get("image_size", 32))
    return _result(
        read_dicom_folder(
            source.path, source.labels_path(), size, skip_bad_files=source.skip_bad_files
        )
    )


@READERS.register("images", traits={"image"}, options=ImageFolderSource, imports=("PIL.Image",))
def read_image_source(source: ImageFolderSource, task: dict[str, Any]) -> Any:
    """Read a registered PNG/JPEG folder for ``task`` (its ``image_size``)."""
    size = int(task.get("image_size", 32))
    return _result(
        read_image_folder(
            source.path, source.labels_path(), size, skip_bad_files=source.skip_bad_files
        )
    )


@READERS.register("npz", traits={"image"}, options=NpzSource)
def read_npz_source(source: NpzSource, task: dict[str, Any]) -> Any:
    """Read a registered MedMNIST-style archive for ``task`` (its ``image_size``)."""
    return _result(read_npz(source.path, source.split, int(task.get("image_size", 32))))


# --- folders ---------------------------------------------------------------


def _read_folder(
    folder: Path,
    labels_csv: Path,
    image_size: int,
    skip_bad_files: bool,
    file_column: str,
    label_column: str,
    load: Callable[[Path], np.ndarray],
    kind: str,
) -> ImageData:
    folder, labels_csv = Path(folder), Path(labels_csv)
    _check_size(image_size)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder.resolve()}")
    labels = _read_labels(labels_csv, file_column, label_column)
    files = _list_files(folder, labels_csv)
    if not files:
        raise DataError(f"{folder}: the folder has no {kind} files")

    unlabelled = sorted(set(files) - labels.keys())
    if unlabelled:
        raise DataError(
            f"{folder}: {len(unlabelled)} file(s) have no row in {labels_csv}: "
            f"{_some(unlabelled)}. Add them to the labels CSV or move them out of the folder."
        )
    on_disk = set(files)
    absent = [f for f in labels if f not in on_disk]
    if absent:
        raise DataError(
            f"{labels_csv}: {len(absent)} listed file(s) not found in {folder}: "
            f"{_some(absent)}. Fix the file names or remove those rows."
        )

    images, ys, names, skipped = [], [], [], []
    for name in sorted(files):
        try:
            image = load(folder / name)
        except _BadFile as exc:
            skipped.append((name, str(exc)))
            continue
        images.append(_resize(image, image_size))
        ys.append(labels[name])
        names.append(name)
    if skipped and not skip_bad_files:  # every bad file at once, not one per attempt
        if len(skipped) == 1:
            name, why = skipped[0]
            raise DataError(
                f"{folder / name}: cannot read as {kind}: {why}. Fix or remove the file, or "
                "set skip_bad_files = true in the dataset's table to load the rest."
            )
        listed = "; ".join(f"{folder / name}: {why}" for name, why in skipped)
        raise DataError(
            f"{folder}: {len(skipped)} files cannot be read as {kind}: {listed}. Fix or "
            "remove them, or set skip_bad_files = true in the dataset's table to load the rest."
        )
    if not images:
        raise DataError(f"{folder}: none of the {len(files)} {kind} files could be read")
    X = np.stack(images)[:, None].astype(np.float32)
    return ImageData(X=X, y=np.array(ys, dtype=np.int64), files=names, skipped=skipped)


def _check_size(image_size: int) -> None:
    if int(image_size) < 1:
        raise DataError(f"image_size must be a positive number of pixels, not {image_size}")


def _read_labels(path: Path, file_column: str, label_column: str) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"labels CSV not found: {path.resolve()}")
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as exc:  # empty or malformed CSV
        raise DataError(f"{path}: cannot read as CSV: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    for col in (file_column, label_column):
        if col not in frame.columns:
            raise DataError(
                f"{path}: column {col!r} not found; columns present: {', '.join(frame.columns)}"
            )
    labels: dict[str, int] = {}
    pairs = zip(frame[file_column], frame[label_column], strict=True)
    for i, (name, value) in enumerate(pairs, start=1):
        name = _normalise_name(name)
        if not name:
            raise DataError(f"{path}: column {file_column!r}, row {i}: the file name is empty")
        if name in labels:
            raise DataError(f"{path}: column {file_column!r}, row {i}: {name!r} is listed twice")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not np.isfinite(number) or number != int(number):
            raise DataError(
                f"{path}: column {label_column!r}, row {i}: label {value.strip()!r} of "
                f"{name!r} is not an integer"
            )
        labels[name] = int(number)
    return labels


def _normalise_name(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _list_files(folder: Path, labels_csv: Path) -> list[str]:
    skip = labels_csv.resolve()
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.name in IGNORED_NAMES:
            continue
        if path.is_file() and path.resolve() != skip:
            out.append(rel.as_posix())
    return out


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- single files ----------------------------------------------------------


def _load_dicom(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    """One DICOM image as float64 (H, W) in [0, 1]."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on odd but readable files
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        ds = _read_without_preamble(path)
    except Exception as exc:  # EOFError, struct errors, ... on damaged files
        raise _BadFile(f"damaged or truncated file ({type(exc).__name__}: {exc})") from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _BadFile("no pixel data (not an image, or the file is truncated)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as exc:  # truncated pixel data, unsupported compression, ...
        raise _BadFile(f"cannot decode pixel data ({exc})") from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise _BadFile("multi-frame images are not supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        if photometric != "RGB":
            raise _BadFile(f"colour images in {photometric} are not supported")
        return _unit_range(_luminance(pixels.astype(np.float64)), None)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    image = _unit_range(values, window)
    return 1.0 - image if photometric == "MONOCHROME1" else image


def _read_without_preamble(path: Path):
    """A DICOM file without the 128-byte preamble and 'DICM' prefix, as pydicom reads it with
    ``force=True``; a file that is not DICOM at all (no pixel data then) stays a bad file."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    except Exception:  # noqa: BLE001 - forced parsing of a non-DICOM file fails any way
        has_pixels = False
    if not has_pixels:
        raise _BadFile("not a DICOM file (no 'DICM' file header)")
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:  # no file meta either: the encoding pydicom found
        implicit, little = ds.original_encoding
        if not little:
            raise _BadFile("no file meta header and big-endian encoding: cannot decode")
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta = meta
    log.warning(
        "%s: no DICOM preamble ('DICM' header missing); read as DICOM anyway (pydicom "
        "force=True). Rewrite it with a standard DICOM writer to silence this warning.",
        path,
    )
    return ds


def _load_picture(path: Path) -> np.ndarray:
    """One PNG/JPEG as float64 (H, W) in [0, 1], grey."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(img, dtype=np.float64) / 65535.0
            return np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except UnidentifiedImageError:
        raise _BadFile("not a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged file
        raise _BadFile(f"damaged or truncated image ({exc})") from None


def _unit_range(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    low, high = (values.min(), values.max()) if window is None else window
    if high <= low:
        return np.zeros_like(values)  # a constant image carries no contrast
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3] @ np.array([0.299, 0.587, 0.114])


def _to_grey_unit(images: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) or (N, H, W, 3) integer images -> float32 (N, 1, H, W) in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] in (3, 4):
        images = _luminance(images.astype(np.float64))
        scale = 255.0
    elif images.ndim == 3:
        scale = float(np.iinfo(images.dtype).max) if images.dtype.kind in "ui" else 1.0
    else:
        raise DataError(f"{path}: images of shape {images.shape} are not 2-D grey or RGB")
    return (images.astype(np.float32) / scale)[:, None]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image.astype(np.float32)
    return _resize_batch(image[None, None].astype(np.float32), size)[0, 0]


def _resize_batch(X: np.ndarray, size: int) -> np.ndarray:
    """(N, 1, H, W) -> (N, 1, size, size), antialiased so downsizing does not alias."""
    if X.shape[-2:] == (size, size):
        return X.astype(np.float32)
    import torch
    import torch.nn.functional as F

    out = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return out.clamp_(0.0, 1.0).numpy()
