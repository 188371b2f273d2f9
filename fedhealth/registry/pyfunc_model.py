"""The registered model as an MLflow pyfunc: raw rows or image files in, probabilities out.

A consumer loads any registered version with ``mlflow.pyfunc.load_model("models:/NAME/V")``
and calls ``predict`` on data as a site holds it before fedhealth touches it:

- **tables**: a pandas DataFrame with the schema's raw column names (other columns are
  ignored); categorical columns as their raw values (``"4"``, ``4`` or ``4.0`` all match
  category ``"4"``), missing values as NaN/None (or the tokens ``"?"`` and ``""``).
  Rows with a missing value follow the schema's ``missing`` policy: ``drop`` gives that
  row NaN probabilities (fedhealth dropped such rows from training and evaluation),
  ``error`` raises naming the row and column, ``mean`` imputes the pooled training mean
  (category frequencies for a categorical column).
- **images**: a pandas DataFrame with a column ``path`` of DICOM, PNG or JPEG files, read
  exactly as a site's reader does (modality LUT, MONOCHROME1 inverted, grey, [0, 1],
  resized to the task's size).

``predict`` returns a DataFrame of class probabilities, one column per class (named by
the label, e.g. ``benign``/``malignant``, or ``0``/``1``). One-hot encoding in the
consortium's category order, imputation and the standardisation statistics are inside the
model (:data:`SPEC_FILE`). When the run had no statistics to build in (normalisation
``site`` and the sites declined to share their sums), ``predict`` refuses raw input
unless the statistics are passed as ``params={"statistics": '{"mean": [...], "std":
[...]}'}``: it never guesses.

Nothing is unpickled on load: the weights are a safetensors file, the architecture is
rebuilt from the model catalogue (:func:`fedhealth.models.build_model`) and this class is
logged as code (MLflow's models-from-code, :mod:`fedhealth.registry.model_code`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext as PythonContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import AnyType
from torch import nn

SPEC_FILE = "preprocessing.json"
WEIGHTS_FILE = "weights.safetensors"
PATH_COLUMN = "path"
NA_TOKENS = ("?", "")


def class_names(spec: dict[str, Any]) -> list[str]:
    """Output column names: the raw labels of ``label_map``, else the class numbers."""
    k = int(spec["num_classes"])
    names = [str(i) for i in range(k)]
    label_map = (spec.get("schema") or {}).get("label_map") or {}
    for label, cls in label_map.items():
        if 0 <= int(cls) < k:
            names[int(cls)] = str(label)
    return names


def _numeric_categories(cats: list[str]) -> bool:
    from fedhealth.data.tabular import _to_number

    return all(_to_number(c) is not None for c in cats)


def signature(spec: dict[str, Any]) -> ModelSignature:
    """The model's signature: raw column names and types in, one probability per class out."""
    outputs = Schema([ColSpec("double", name) for name in class_names(spec)])
    params = ParamSchema([ParamSpec("statistics", "string", "")])
    if spec["kind"] != "tabular":
        return ModelSignature(Schema([ColSpec("string", PATH_COLUMN)]), outputs, params)
    schema = spec["schema"]
    # Any type per column: MLflow's enforcement refuses int64 for a double column (a CSV
    # column without a missing value reads as int64); predict checks every value itself.
    cols: list[ColSpec | TensorSpec] = [
        ColSpec(AnyType(), c) for c in [*schema["numeric"], *schema["categorical"]]
    ]
    return ModelSignature(Schema(cols), outputs, params)


def input_example(spec: dict[str, Any]) -> pd.DataFrame:
    """A synthetic two-row input (the registry must never hold a site's real record)."""
    if spec["kind"] != "tabular":
        return pd.DataFrame({PATH_COLUMN: ["scan-0001.dcm", "scan-0002.png"]})
    schema = spec["schema"]
    stats = spec.get("statistics")
    data: dict[str, list[Any]] = {}
    for i, col in enumerate(schema["numeric"]):
        value = float(stats["mean"][i]) if stats else 0.0
        data[col] = [value, value]
    for col, cats in schema["categorical"].items():
        first = float(cats[0]) if _numeric_categories(cats) else str(cats[0])
        data[col] = [first, first]
    return pd.DataFrame(data)


def _where(frame: pd.DataFrame, pos: int) -> str:
    return f"row {pos + 1} (index {frame.index[pos]!r})"


def encode_table(frame: pd.DataFrame, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows -> the encoded feature matrix the network was trained on (before scaling).

    Parameters
    ----------
    frame : pandas.DataFrame
        Raw rows with the schema's column names.
    spec : dict
        The model's preprocessing spec (:data:`SPEC_FILE`).

    Returns
    -------
    tuple of numpy.ndarray
        ``X`` (float32, n x d; imputed under ``missing = "mean"``) and ``usable``
        (bool, n): False for rows the ``drop`` policy leaves out.

    Raises
    ------
    MlflowException
        A column is absent, a value is not a number or not a declared category, a value
        is missing under ``missing = "error"``, or ``mean`` has no statistics to impute.
    """
    from fedhealth.data.tabular import normalise_value

    schema = spec["schema"]
    numeric, categorical = list(schema["numeric"]), dict(schema["categorical"])
    absent = [c for c in [*numeric, *categorical] if c not in frame.columns]
    if absent:
        raise MlflowException.invalid_parameter_value(
            f"input lacks column(s) {', '.join(map(repr, absent))}; the model reads "
            f"{', '.join(numeric + list(categorical))} (raw values, as in the sites' files)"
        )
    n = len(frame)
    blocks: list[np.ndarray] = []
    missing_any = np.zeros(n, dtype=bool)
    missing_cells: list[tuple[int, str]] = []

    def is_missing(series: pd.Series) -> np.ndarray:
        text = series.astype(str).str.strip()
        return (series.isna() | text.isin(NA_TOKENS)).to_numpy()

    for col in numeric:
        miss = is_missing(frame[col])
        values = pd.to_numeric(frame[col].where(~miss), errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~miss & ~np.isfinite(values))
        if bad.size:
            raise MlflowException.invalid_parameter_value(
                f"column {col!r}, {_where(frame, int(bad[0]))}: "
                f"{frame[col].iloc[bad[0]]!r} is not a number"
            )
        blocks.append(values[:, None])
        missing_any |= miss
        if miss.any():
            missing_cells.append((int(np.flatnonzero(miss)[0]), col))
    for col, cats in categorical.items():
        lookup = {normalise_value(c): i for i, c in enumerate(cats)}
        miss = is_missing(frame[col])
        block = np.zeros((n, len(cats)))
        for pos, value in enumerate(frame[col].to_numpy(dtype=object)):
            if miss[pos]:
                block[pos] = np.nan
                continue
            idx = lookup.get(normalise_value(value))
            if idx is None:
                raise MlflowException.invalid_parameter_value(
                    f"column {col!r}, {_where(frame, pos)}: {value!r} is not one of the "
                    f"categories the model was trained on {list(lookup)}"
                )
            block[pos, idx] = 1.0
        if schema.get("drop_first"):
            block = block[:, 1:]
        blocks.append(block)
        missing_any |= miss
        if miss.any():
            missing_cells.append((int(np.flatnonzero(miss)[0]), col))
    X = np.hstack(blocks) if blocks else np.zeros((n, 0))
    policy = schema.get("missing", "drop")
    usable = ~missing_any
    if missing_any.any():
        if policy == "error":
            pos, col = min(missing_cells)
            raise MlflowException.invalid_parameter_value(
                f"column {col!r}, {_where(frame, pos)}: value is missing, and the schema's "
                "missing policy is 'error' (the sites had no missing values)"
            )
        if policy == "mean":
            stats = spec.get("statistics")
            if not stats:
                raise MlflowException.invalid_parameter_value(
                    "input has missing values and the schema's policy is 'mean', but this "
                    "model holds no pooled means to impute; fill the values in first"
                )
            mean = np.asarray(stats["mean"], dtype=np.float64)
            X = np.where(np.isnan(X), mean[None, :], X)
            usable = np.ones(n, dtype=bool)
        else:  # drop: fedhealth left such rows out of training and evaluation
            X = np.nan_to_num(X, nan=0.0)
    return X.astype(np.float32), usable


def read_images(frame: pd.DataFrame, size: int) -> np.ndarray:
    """Image files named in ``frame[PATH_COLUMN]`` -> float32 (n, 1, size, size) in [0, 1]."""
    from fedhealth.data.imaging import _BadFile, _load_dicom, _load_picture, _resize

    if PATH_COLUMN not in frame.columns:
        raise MlflowException.invalid_parameter_value(
            f"input needs a column {PATH_COLUMN!r} of image files (DICOM, PNG or JPEG); "
            f"it has {', '.join(map(str, frame.columns))}"
        )
    images = []
    for name in frame[PATH_COLUMN].astype(str):
        path = Path(name)
        if not path.is_file():
            raise MlflowException.invalid_parameter_value(f"image file not found: {path}")
        try:
            image = _load_dicom(path, None)
        except _BadFile:
            try:
                image = _load_picture(path)
            except _BadFile as exc:
                raise MlflowException.invalid_parameter_value(
                    f"{path}: cannot read as DICOM, PNG or JPEG: {exc}"
                ) from None
        images.append(_resize(image, size))
    return np.stack(images)[:, None].astype(np.float32)


def build_network(spec: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The catalogue's architecture with the registered weights; standardisation in front."""
    from fedhealth.models import build_model
    from fedhealth.models.standardize import Standardize

    net = build_model(spec["model"], int(spec["input_dim"]), int(spec["num_classes"]), 0)
    net.load_state_dict(state)
    stats = spec.get("statistics")
    model = nn.Sequential(Standardize(stats), net) if stats else net
    return model.eval()


class FedHealthModel(PythonModel):
    """The pyfunc a registered fedhealth model loads as (see the module docstring).

    Attributes
    ----------
    spec : dict
        The preprocessing spec (schema, category order, missing policy, statistics,
        architecture).
    network : torch.nn.Module
        The network on encoded (tables) or [0, 1] (images) inputs; with a standardisation
        layer in front when the model holds statistics. For consumers who want the module.
    """

    spec: dict[str, Any]
    network: nn.Module

    def load_context(self, context: PythonContext) -> None:
        """Rebuild the network from the safetensors weights and the JSON spec (no pickle)."""
        from safetensors.torch import load_file

        self.spec = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        self._state = load_file(context.artifacts["weights"])
        self.network = build_network(self.spec, self._state)

    def _inputs(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        if self.spec["kind"] == "tabular":
            return encode_table(frame, self.spec)
        x = read_images(frame, int(self.spec["image_size"]))
        return x, np.ones(len(x), dtype=bool)

    def _model(self, params: dict[str, Any] | None) -> nn.Module:
        given = (params or {}).get("statistics") or ""
        if given:
            from fedhealth.models.standardize import Standardize

            stats = json.loads(given)
            if self.spec.get("statistics"):
                raise MlflowException.invalid_parameter_value(
                    "this model has its standardisation statistics built in; do not pass "
                    "params['statistics']"
                )
            net = build_network(dict(self.spec, statistics=None), self._state)
            return nn.Sequential(Standardize(stats), net).eval()
        if self.spec["normalisation"] != "none" and not self.spec.get("statistics"):
            raise MlflowException.invalid_parameter_value(
                f"this model was trained on standardised inputs (normalisation "
                f"{self.spec['normalisation']!r}) but holds no statistics: the sites declined "
                "to share their sums. Pass params={'statistics': json.dumps({'mean': [...], "
                "'std': [...]})} with one value per encoded feature (see the model card)."
            )
        return self.network

    def predict(
        self,
        context: PythonContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Class probabilities for raw rows (tables) or image files (images).

        Parameters
        ----------
        context : PythonContext or None
            MLflow's context (unused after :meth:`load_context`).
        model_input : pandas.DataFrame
            Raw rows with the schema's columns, or a ``path`` column of image files.
        params : dict, optional
            ``statistics``: JSON mean/std, only for a model that holds none.

        Returns
        -------
        pandas.DataFrame
            One column per class, rows summing to 1 (NaN for rows the ``drop`` policy
            leaves out), same index as ``model_input``.
        """
        frame = pd.DataFrame(model_input)
        model = self._model(params)
        x, usable = self._inputs(frame)
        with torch.no_grad():
            probs = torch.softmax(model(torch.as_tensor(x)), dim=1).numpy().astype(np.float64)
        probs[~usable] = np.nan
        return pd.DataFrame(probs, columns=class_names(self.spec), index=frame.index)
