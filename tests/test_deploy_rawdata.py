"""Proof that raw data stays home (issue 5, item 5).

A real deployment on 127.0.0.1 — ``fedhealth coordinator start`` (SuperLink + MLflow
server) and ``fedhealth site start`` as separate processes — with a recording TCP proxy
between the site's SuperNode and the SuperLink. TLS is off for this test only, so the
recorder sees the plaintext stream (Flower 1.41's Fleet API: protobuf over HTTP/1.1); every
byte the site sends upstream is recorded, and each request body is also decoded (chunked,
compressed) so that framing cannot hide a pattern.

One round of a tabular experiment and one round of a DICOM imaging experiment run, then an
evaluation-only study of the registered tabular model (``fedhealth evaluate --federation``,
issue 12); then:

* none of the site's raw values occurs in what it sent: CSV text of its rows, float32 and
  float64 little-endian encodings of distinctive feature values and of whole rows, the
  16-bit stored pixel bytes of rows of its DICOM images and their DICOM UIDs;
* positive control: the same recording does hold the float32 bytes of the model weights
  the site sent (with one site, the round's global model is its update), so a leak of
  raw bytes would be seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedhealth.data.demo import write_demo_data
from fedhealth.deploy.processes import free_port
from tests.deploy_harness import Deployment, write_experiment, write_site
from tests.recording_proxy import RecordingProxy, http_bodies

pytestmark = pytest.mark.slow

SITE = "st-olav"
TABULAR_USED = ["mean_radius", "mean_texture", "mean_perimeter", "mean_area", "mean_smoothness"]

IMAGING_EXPERIMENT = """
[experiment]
name = "rawdata-imaging"
sites = ["sites/{site}.toml"]
rounds = 1
min_sites = 1
seed = 7
round_timeout = 60

[task]
dataset = "phantoms"
kind = "image"
num_classes = 2
image_size = 32
normalisation = "none"

[model]
name = "small_cnn"
channels = [8, 16]
groups = 4

[training]
local_epochs = 1
batch_size = 8
learning_rate = 0.01

[tracking]
registered_model = "rawdata-imaging"
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Run both experiments through the recording proxy; yield what was recorded."""
    root = tmp_path_factory.mktemp("rawdata")
    data = root / "data"
    write_demo_data(data, [SITE], seed=3, images_per_site=20)
    dep = Deployment(root, tls=False)
    proxy = RecordingProxy(dep.link_port, lifetime=900)
    proxy.start()
    dicom = f'[datasets.phantoms]\nkind = "dicom"\npath = "{data / SITE / "dicom"}"\n'
    # 20 phantoms split 15/5: below the default smallest split (50) the site would refuse.
    write_site(
        root, SITE, data, free_port(), f"127.0.0.1:{proxy.port}", tls=False, extra=dicom,
        min_split_records=5,
    )  # fmt: skip
    tabular = write_experiment(root, "rawdata-tabular", [SITE], rounds=1, min_sites=1)
    imaging = root / "rawdata-imaging.toml"
    imaging.write_text(IMAGING_EXPERIMENT.format(site=SITE))
    globals_: dict[str, dict[str, np.ndarray]] = {}
    try:
        # The site starts while the coordinator does (it retries until accepted), and both
        # runs go at once: the fixed costs (process starts, MLflow) overlap.
        dep.spawn(f"site-{SITE}", "site", "start", str(root / "sites" / f"{SITE}.toml"))
        dep.start_coordinator()
        dep.wait_output(f"site-{SITE}", "Ctrl-C stops the site", timeout=60)
        for exp in (tabular, imaging):
            dep.spawn(f"run-{exp.stem}", "run", str(exp), "--federation", "test")
        for exp in (tabular, imaging):
            code = dep.procs[f"run-{exp.stem}"].wait(timeout=300)
            assert code == 0, dep.output(f"run-{exp.stem}")[-3000:]
            globals_[exp.stem] = _final_globals(dep, exp.stem)
        sent_before = sum(len(b) for b in proxy.upstream())
        res = dep.cli(
            "evaluate", "models:/rawdata-tabular/1", "--federation", "test", "--split", "all",
            "--tracking-uri", dep.tracking_uri, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        validation = res.stdout
    finally:
        dep.teardown()
        proxy.stop()
    assert not proxy.truncated
    upstream = proxy.upstream()
    messages = [m for stream in upstream for m in http_bodies(stream)]
    yield {"root": root, "data": data / SITE, "raw": upstream, "messages": messages,
           "globals": globals_, "validation": validation,
           "sent_before_validation": sent_before}  # fmt: skip


def _final_globals(dep: Deployment, experiment: str) -> dict[str, np.ndarray]:
    """The global arrays of the run's last checkpoint (round 1)."""
    import mlflow

    from fedhealth.coordinator.checkpoint import load_latest

    client = mlflow.tracking.MlflowClient(dep.tracking_uri, registry_uri=dep.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id])[0]
    ck = load_latest(client, run.info.run_id)
    assert ck is not None and ck.round == 1
    return ck.arrays


def _occurs(pattern: bytes, recorded: dict) -> bool:
    return any(pattern in blob for blob in (*recorded["raw"], *recorded["messages"]))


def _distinctive(values: pd.Series, count: int) -> list[float]:
    """``count`` values with at least four significant digits (no round numbers)."""
    out = [float(v) for v in values if len(f"{v:.6g}".replace(".", "").strip("0-")) >= 4]
    return out[:count]


def test_site_sent_something_and_the_recorder_sees_model_weights(recorded) -> None:
    assert sum(len(b) for b in recorded["raw"]) > 10_000
    assert recorded["messages"], "no HTTP body parsed from the recorded stream"
    for experiment, arrays in recorded["globals"].items():
        float_arrays = {k: v for k, v in arrays.items() if v.dtype == np.float32 and v.size > 1}
        assert float_arrays, experiment
        for name, value in float_arrays.items():
            pattern = np.ascontiguousarray(value).astype("<f4").tobytes()
            assert any(pattern in m for m in recorded["messages"]), (experiment, name)


def test_no_tabular_row_leaves_the_site(recorded) -> None:
    csv = recorded["data"] / "breast-cancer.csv"
    lines = csv.read_text().splitlines()[1:]
    frame = pd.read_csv(csv)
    assert len(frame) >= 20
    rows = list(range(0, len(frame), max(1, len(frame) // 8)))[:8]
    patterns: dict[str, bytes] = {}
    for i in rows:
        patterns[f"csv line {i}"] = lines[i].encode()
        patterns[f"csv fields {i}"] = ",".join(lines[i].split(",")[:5]).encode()
        used = frame.loc[i, TABULAR_USED].to_numpy(dtype=np.float64)
        patterns[f"row {i} float64"] = used.astype("<f8").tobytes()
        patterns[f"row {i} float32"] = used.astype("<f4").tobytes()
        everything = frame.iloc[i, :-1].to_numpy(dtype=np.float64)
        patterns[f"row {i} all float64"] = everything[:8].astype("<f8").tobytes()
        patterns[f"row {i} all float32"] = everything[:8].astype("<f4").tobytes()
    for column in ("mean_area", "mean_perimeter", "worst_area"):
        for v in _distinctive(frame[column], 6):
            patterns[f"{column}={v} float64"] = np.float64(v).astype("<f8").tobytes()
            patterns[f"{column}={v} float32"] = np.float32(v).astype("<f4").tobytes()
            patterns[f"{column}={v} text"] = f",{v:g},".encode()
    leaked = [name for name, p in patterns.items() if _occurs(p, recorded)]
    assert not leaked, f"raw tabular values found in what the site sent: {leaked}"


def test_no_dicom_pixel_leaves_the_site(recorded) -> None:
    import pydicom

    files = sorted((recorded["data"] / "dicom").glob("phantom-*.dcm"))[:4]
    assert files
    patterns: dict[str, bytes] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
        for r in (ds.Rows // 3, ds.Rows // 2, 2 * ds.Rows // 3):
            patterns[f"{path.name} row {r}"] = stored[r].tobytes()
            patterns[f"{path.name} row {r} half"] = stored[r, 8:40].tobytes()
        hu = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row = hu[ds.Rows // 2, 8:24]
        patterns[f"{path.name} HU float32"] = row.astype("<f4").tobytes()
        patterns[f"{path.name} uid"] = str(ds.SOPInstanceUID).encode()
    patterns["patient id"] = str(pydicom.dcmread(files[0]).PatientID).encode()
    leaked = [name for name, p in patterns.items() if _occurs(p, recorded)]
    assert not leaked, f"raw DICOM data found in what the site sent: {leaked}"


def test_site_names_its_own_path_only_in_the_audit(recorded) -> None:
    # The site's data file paths are not sent either (only the coordinator-given config).
    path = str(Path(recorded["data"]) / "breast-cancer.csv").encode()
    assert not _occurs(path, recorded)


def test_an_evaluation_study_went_through_the_recorder(recorded) -> None:
    """The evaluation-only study's traffic is in the recording the checks above search."""
    assert "validated" in recorded["validation"], recorded["validation"][-2000:]
    total = sum(len(b) for b in recorded["raw"])
    assert total > recorded["sent_before_validation"]  # the site answered the study
