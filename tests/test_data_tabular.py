"""Tabular reading, normalisation and splits (fedhealth.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from fedhealth import settings
from fedhealth.data.normalisation import (
    STD_FLOOR,
    Moments,
    Standardizer,
    combine_moments,
    local_moments,
)
from fedhealth.data.splits import train_test_split_indices
from fedhealth.data.tabular import TabularSchema, normalise_value, read_table
from fedhealth.errors import ConfigError, DataError


def shared_data() -> Path:
    return settings.SHARED_DATA.get()


HEART = shared_data() / "uci-heart-disease"
HEART_COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
# FLamby's Fed-Heart-Disease preprocessing, expressed as a schema.
HEART_SCHEMA = TabularSchema(
    numeric=["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"],
    categorical={"cp": ["1", "2", "3", "4"], "restecg": ["0", "1", "2"]},
    label="num",
    binarize_label_above=0,
    columns=HEART_COLUMNS,
    drop=["slope", "ca", "thal"],
    drop_first=True,
)
SIMPLE = TabularSchema(numeric=["age", "bp"], categorical={"cp": ["1", "2", "3"]}, label="y")


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- heart disease (real data) ----------------------------------------------

needs_heart = pytest.mark.skipif(
    not HEART.is_dir(), reason=f"shared UCI heart-disease data not found at {HEART}"
)


@needs_heart
@pytest.mark.parametrize(
    ("centre", "rows", "positives", "split"),
    [
        ("cleveland", 303, 139, (199, 104)),
        ("hungarian", 261, 98, (172, 89)),
        ("switzerland", 46, 45, (30, 16)),
        ("va", 130, 101, (85, 45)),
    ],
)
def test_heart_disease_reproduces_flamby(centre, rows, positives, split):
    data = read_table(HEART / f"processed.{centre}.data", HEART_SCHEMA)
    assert data.X.shape == (rows, 13)
    assert data.X.dtype == np.float32 and data.y.dtype == np.int64
    assert int(data.y.sum()) == positives
    assert data.feature_names[8:] == ["cp=2", "cp=3", "cp=4", "restecg=1", "restecg=2"]
    assert data.one_hot.tolist() == [False] * 8 + [True] * 5
    train, test = train_test_split_indices(data.y, test_fraction=0.34, seed=43)
    assert (len(train), len(test)) == split
    # The very same rows as FLamby's own call (its stratification rule included).
    _, counts = np.unique(data.y, return_counts=True)
    strat = data.y if counts.size > 1 and counts.min() > 2 else None
    _, flamby_test = train_test_split(
        np.arange(rows), test_size=1 - 0.66, train_size=0.66, random_state=43, stratify=strat
    )
    assert test.tolist() == sorted(flamby_test)


@needs_heart
def test_heart_cleveland_float_values_and_leading_dot():
    cle = read_table(HEART / "processed.cleveland.data", HEART_SCHEMA)
    assert cle.X[0, :8].tolist() == pytest.approx([63, 1, 145, 233, 1, 150, 0, 2.3])
    # First row: cp=1.0 (reference level) and restecg=2.0.
    assert cle.X[0, 8:].tolist() == [0, 0, 0, 0, 1]
    swi = read_table(HEART / "processed.switzerland.data", HEART_SCHEMA)
    assert np.isfinite(swi.X).all()


# --- reading and encoding ----------------------------------------------------


def test_csv_numeric_and_one_hot(tmp_path):
    path = write(tmp_path, "age,bp,cp,y,note\n50,120,1,0,x\n 61.5 ,.5,3.0,1,y\n40,1e2, 2 ,1,z\n")
    data = read_table(path, SIMPLE)
    assert data.feature_names == ["age", "bp", "cp=1", "cp=2", "cp=3"]
    assert data.X.tolist() == [[50, 120, 1, 0, 0], [61.5, 0.5, 0, 0, 1], [40, 100, 0, 1, 0]]
    assert data.y.tolist() == [0, 1, 1]
    assert data.n_dropped == 0


def test_parquet_with_numeric_categories_and_nulls(tmp_path):
    frame = pd.DataFrame(
        {
            "age": [50.0, None, 40.0],
            "bp": [120, 130, 110],
            "cp": [1, 2, 3],  # integers match the declared strings "1", "2", "3"
            "y": [0, 1, 1],
        }
    )
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    data = read_table(path, SIMPLE)
    assert data.n_dropped == 1
    assert data.X.tolist() == [[50, 120, 1, 0, 0], [40, 110, 0, 0, 1]]
    frame["bp"] = ["120", "n/a", "110"]  # text in a Parquet column: no line numbers
    frame.to_parquet(path)
    with pytest.raises(DataError, match=r"column 'bp', row 2: 'n/a' is not a number"):
        read_table(path, SIMPLE)


def test_normalise_value():
    assert normalise_value("1") == normalise_value("1.0") == normalise_value(1) == "1"
    assert normalise_value(" .5 ") == normalise_value(0.5) == "0.5"
    assert normalise_value(" male ") == "male"
    assert normalise_value("nan") == "nan"  # a word, not a number


def test_label_map_and_binarize(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n1,2,1,benign\n3,4,2,malignant\n")
    schema = TabularSchema(["age", "bp"], {}, "y", label_map={"benign": 0, "malignant": 1})
    assert read_table(path, schema).y.tolist() == [0, 1]
    path = write(tmp_path, "age,bp,cp,y\n1,2,1,0\n3,4,2,3.0\n5,6,1,1\n", "b.csv")
    schema = TabularSchema(["age"], {}, "y", binarize_label_above=0)
    assert read_table(path, schema).y.tolist() == [0, 1, 1]


def test_missing_drop_counts_and_na_values(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,?,1,0\n60,120,,1\n70,NA,2,1\n80,130,3,0\n")
    with pytest.raises(DataError, match="'NA' is not a number"):
        read_table(path, SIMPLE)  # "?" and "" are missing by default; "NA" is not
    schema = TabularSchema(["age", "bp"], {"cp": ["1", "2", "3"]}, "y", na_values=["?", "", "NA"])
    data = read_table(path, schema)
    assert data.n_dropped == 3 and data.X.tolist() == [[80, 130, 0, 0, 1]]
    # Unused columns are not read: their missing values drop nothing.
    assert read_table(path, TabularSchema(["age"], {}, "y")).n_dropped == 0


def test_missing_mean_imputes_site_means(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,?,1,0\n60,120,?,1\n70,140,2,?\n80,130,2,0\n")
    schema = TabularSchema(["age", "bp"], {"cp": ["1", "2", "3"]}, "y", missing="mean")
    data = read_table(path, schema)
    assert data.n_dropped == 1  # the row without a label
    assert data.X[0, 1] == pytest.approx(125.0)  # mean of 120 and 130 (kept rows)
    assert data.X[1, 2:].tolist() == pytest.approx([0.5, 0.5, 0.0])  # cp frequencies


def test_missing_error_names_file_column_row(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,120,1,0\n60,?,1,1\n")
    schema = TabularSchema(["age", "bp"], {}, "y", missing="error")
    with pytest.raises(DataError) as err:
        read_table(path, schema)
    msg = str(err.value)
    assert str(path) in msg and "'bp'" in msg and "row 2 (line 3)" in msg


# --- errors --------------------------------------------------------------


def test_missing_file_gives_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        read_table(Path("nope/site.csv"), SIMPLE)
    assert str(tmp_path / "nope" / "site.csv") in str(err.value)


def test_absent_column_lists_present_columns(tmp_path):
    path = write(tmp_path, "age,cp,y\n50,1,0\n")
    with pytest.raises(DataError) as err:
        read_table(path, SIMPLE)
    msg = str(err.value)
    assert str(path) in msg and "'bp'" in msg and "age, cp, y" in msg


def test_non_numeric_value_names_row_and_value(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,120,1,0\n\n60,12O,1,1\n")
    with pytest.raises(DataError) as err:
        read_table(path, SIMPLE)
    msg = str(err.value)
    # The blank line still counts, so the row matches what an editor shows.
    assert str(path) in msg and "'bp'" in msg and "row 3 (line 4)" in msg and "'12O'" in msg


def test_non_numeric_in_headerless_file_counts_lines_from_one(tmp_path):
    path = write(tmp_path, "50,120,1,0\n60,x,1,1\n", "h.data")
    schema = TabularSchema(["age", "bp"], {}, "y", columns=["age", "bp", "cp", "y"])
    with pytest.raises(DataError, match=r"row 2 \(line 2\)"):
        read_table(path, schema)


def test_unknown_category_lists_allowed(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,120,1,0\n60,130,7,1\n")
    with pytest.raises(DataError) as err:
        read_table(path, SIMPLE)
    msg = str(err.value)
    assert str(path) in msg and "'cp'" in msg and "row 2" in msg and "'7'" in msg
    assert "['1', '2', '3']" in msg


@pytest.mark.parametrize("text", ["", "age,bp,cp,y\n"])
def test_no_rows(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(DataError, match=r"no header and no rows|no data rows") as err:
        read_table(path, SIMPLE)
    assert str(path) in str(err.value)


def test_no_rows_left_after_dropping(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,?,1,0\n60,?,2,1\n")
    with pytest.raises(DataError) as err:
        read_table(path, SIMPLE)
    msg = str(err.value)
    assert "no rows left" in msg and "'bp' is missing in 2 of 2 rows" in msg


def test_label_not_integer(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,120,1,0\n60,130,2,yes\n")
    with pytest.raises(DataError) as err:
        read_table(path, SIMPLE)
    msg = str(err.value)
    assert "'y'" in msg and "row 2" in msg and "'yes'" in msg and "label_map" in msg
    path = write(tmp_path, "age,bp,cp,y\n50,120,1,0.5\n", "b.csv")
    with pytest.raises(DataError, match="not an integer"):
        read_table(path, SIMPLE)


def test_label_not_in_label_map(tmp_path):
    path = write(tmp_path, "age,bp,cp,y\n50,120,1,benign\n60,130,1,unknown\n")
    schema = TabularSchema(["age"], {}, "y", label_map={"benign": 0, "malignant": 1})
    with pytest.raises(DataError, match=r"row 2 .*'unknown' is not in label_map"):
        read_table(path, schema)


def test_headerless_field_count_mismatch(tmp_path):
    path = write(tmp_path, "1,2,3\n", "h.data")
    schema = TabularSchema(["a"], {}, "d", columns=["a", "b", "c", "d"])
    with pytest.raises(DataError, match="3 fields but the schema's columns names 4"):
        read_table(path, schema)


def test_unknown_suffix(tmp_path):
    path = write(tmp_path, "x", "t.xlsx")
    with pytest.raises(DataError, match="unknown table format"):
        read_table(path, SIMPLE)


def test_schema_checks():
    with pytest.raises(ConfigError, match="missing must be"):
        TabularSchema(["a"], {}, "y", missing="ignore")
    with pytest.raises(ConfigError, match="more than once"):
        TabularSchema(["a"], {"a": ["1"]}, "y")
    with pytest.raises(ConfigError, match="distinct categories"):
        TabularSchema([], {"a": ["1", "1.0"]}, "y")
    with pytest.raises(ConfigError, match="listed in drop"):
        TabularSchema(["a"], {}, "y", drop=["a"])


# --- normalisation -----------------------------------------------------------


def test_local_moments_match_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(200, 4))
    s = Standardizer.from_moments(local_moments(X))
    assert s.mean == pytest.approx(X.mean(axis=0))
    assert s.std == pytest.approx(X.std(axis=0))
    Z = s.transform(X)
    assert Z.dtype == np.float32
    assert Z.mean(axis=0) == pytest.approx(0, abs=1e-5)
    assert Z.std(axis=0) == pytest.approx(1, abs=1e-5)


def test_combined_moments_equal_pooled_data():
    rng = np.random.default_rng(1)
    sites = [rng.normal(i, 1 + i, size=(30 + 10 * i, 3)) for i in range(3)]
    pooled = np.concatenate(sites)
    combined = combine_moments([local_moments(x) for x in sites])
    assert combined.count == len(pooled)
    s = Standardizer.from_moments(combined)
    assert s.mean == pytest.approx(pooled.mean(axis=0))
    assert s.std == pytest.approx(pooled.std(axis=0))


def test_std_floor_skip_mask_and_round_trip():
    X = np.array([[1.0, 0.0, 5.0], [3.0, 1.0, 5.0]])
    s = Standardizer.fit(X)
    assert s.std[2] == STD_FLOOR  # constant column: no division by zero
    Z = s.transform(X, skip=np.array([False, True, False]))
    assert Z[:, 0].tolist() == [-1, 1]
    assert Z[:, 1].tolist() == [0, 1]  # left as it is
    assert np.isfinite(Z).all()
    again = Standardizer.from_dict(s.to_dict())
    assert np.array_equal(again.transform(X), s.transform(X))
    m = local_moments(X)
    m2 = Moments.from_dict(m.to_dict())
    assert m2.count == 2 and np.array_equal(m2.sumsq, m.sumsq)


def test_image_moments_are_per_channel():
    rng = np.random.default_rng(2)
    X = rng.uniform(size=(5, 2, 4, 4))
    X[:, 1] += 10
    m = local_moments(X)
    assert m.count == 5 * 16 and m.sum.shape == (2,)
    s = Standardizer.from_moments(m)
    assert s.mean == pytest.approx([X[:, 0].mean(), X[:, 1].mean()])
    Z = s.transform(X)
    assert Z.shape == X.shape and abs(Z[:, 1].mean()) < 1e-5


def test_normalisation_errors():
    with pytest.raises(DataError, match="different feature counts"):
        combine_moments([local_moments(np.ones((2, 2))), local_moments(np.ones((2, 3)))])
    with pytest.raises(DataError, match="no site"):
        combine_moments([])
    with pytest.raises(DataError, match="empty"):
        Standardizer.from_moments(Moments(0, np.zeros(2), np.zeros(2)))
    with pytest.raises(DataError, match="3 features"):
        Standardizer.fit(np.ones((2, 3))).transform(np.ones((2, 4)))


# --- splits -----------------------------------------------------------------


def test_split_is_deterministic_stratified_and_sorted():
    y = np.array([0] * 60 + [1] * 40)
    a = train_test_split_indices(y, 0.25, seed=7)
    b = train_test_split_indices(y, 0.25, seed=7)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    train, test = a
    assert len(test) == 25 and len(train) == 75
    assert sorted(np.r_[train, test].tolist()) == list(range(100))
    assert np.all(np.diff(test) > 0)
    assert (y[test] == 1).sum() == 10  # stratified: 40 % of 25
    c = train_test_split_indices(y, 0.25, seed=8)[1]
    assert not np.array_equal(c, test)


def test_split_gives_the_same_rows_as_sklearn():
    """The sklearn-free split draws exactly what sklearn's train_test_split draws."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = int(rng.integers(6, 300)), int(rng.integers(1, 5))
        y = rng.integers(0, k, size=n)
        frac, seed = float(rng.uniform(0.1, 0.6)), int(rng.integers(0, 10_000))
        counts = np.unique(y, return_counts=True)[1]
        n_test = int(np.ceil(frac * n))
        strat = counts.size > 1 and counts.min() >= 3 and min(n_test, n - n_test) >= counts.size
        ref = train_test_split(np.arange(n), test_size=frac, random_state=seed, shuffle=True,
                               stratify=y if strat else None)  # fmt: skip
        ours = train_test_split_indices(y, frac, seed)
        for a, b in zip(ours, ref, strict=True):
            assert np.array_equal(a, np.sort(b)), (n, k, frac, seed)


def test_split_falls_back_when_a_class_is_tiny():
    y = np.array([0] * 20 + [1])  # sklearn cannot stratify a class of one
    train, test = train_test_split_indices(y, 0.3, seed=0)
    assert len(train) + len(test) == 21


def test_split_errors():
    with pytest.raises(DataError, match="between 0 and 1"):
        train_test_split_indices(np.zeros(10), 1.0, seed=0)
    with pytest.raises(DataError, match="would be empty"):
        train_test_split_indices(np.zeros(1), 0.5, seed=0)
