"""FLamby's Fed-TCGA-BRCA as six site tables: each patient goes to its region's centre.

``brca.csv`` holds all 1,096 patients in one file; FLamby assigns each to one of six
regions through the tissue-source-site code in the TCGA barcode (``centers.csv``)
and leaves out the 8 "Other" patients. This writes one CSV per centre (the patient
barcode is dropped: a site's table needs no identifier for analytics) so that each
centre's site profile (``sites/tcga-*.toml``) reads only its own patients. The
shared data is read in place and the tables go to a workspace folder, never into
the repository.

Run ``python -m fedhealth.data.tcga_brca [DATA_DIR] [OUT_DIR]`` (defaults:
``../shared/data/tcga-brca-flamby`` and ``workspace/demo-data/tcga-brca``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from fedhealth.errors import DataError

#: FLamby's centre order: region -> file stem.
CENTRES = {
    "Northeast": "northeast",
    "South": "south",
    "West": "west",
    "Midwest": "midwest",
    "Europe": "europe",
    "Canada": "canada",
}


def centre_tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    """Each centre's patients (all columns but ``pid``), keyed by file stem.

    Parameters
    ----------
    data_dir : Path
        The folder with ``brca.csv`` and ``centers.csv``.

    Returns
    -------
    dict of str to pandas.DataFrame
    """
    data_dir = Path(data_dir)
    for f in ("brca.csv", "centers.csv"):
        if not (data_dir / f).is_file():
            raise DataError(f"{data_dir / f}: not found; point at FLamby's TCGA-BRCA folder")
    brca = pd.read_csv(data_dir / "brca.csv")
    centers = pd.read_csv(data_dir / "centers.csv")
    region = dict(
        zip(
            centers["TSS Code"].astype(str).str.strip(),
            centers["Region"].astype(str).str.strip(),
            strict=True,
        )
    )
    tss = brca["pid"].astype(str).str.split("-").str[1]
    regions = tss.map(region)
    return {
        stem: brca[regions == name].drop(columns=["pid"]).reset_index(drop=True)
        for name, stem in CENTRES.items()
    }


def write_tcga_brca_centres(data_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write ``<out_dir>/<centre>.csv`` for the six centres.

    Returns
    -------
    dict of str to Path
        Centre stem -> file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, frame in centre_tables(data_dir).items():
        path = out_dir / f"{stem}.csv"
        frame.to_csv(path, index=False)
        written[stem] = path
    return written


if __name__ == "__main__":  # pragma: no cover - convenience entry point
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/tcga-brca-flamby")
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("workspace/demo-data/tcga-brca")
    for stem, path in write_tcga_brca_centres(src, dst).items():
        print(f"{stem}: {path}")
