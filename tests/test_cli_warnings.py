"""No third-party warning reaches a user's normal output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fedhealth

SOURCE = str(Path(fedhealth.__file__).resolve().parents[1])  # the fedhealth under test


def test_opening_the_mlflow_store_under_rays_warning_filters_is_quiet(tmp_path):
    """Ray puts ``once`` for every DeprecationWarning first in the filters, so MLflow's SQL store
    made SQLAlchemy print its ``noload`` deprecation in every simulated run. A fresh process:
    the warning comes once, when MLflow's store module is first imported."""
    code = textwrap.dedent(
        f"""
        import warnings
        warnings.filterwarnings("once", category=DeprecationWarning)  # as Ray does
        from fedhealth.registry.store import use_store
        client = use_store("sqlite:///{tmp_path / "mlflow.db"}")
        client.search_registered_models()
        print("opened")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SOURCE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "opened" in out.stdout, out.stderr
    assert "Warning" not in out.stderr, out.stderr
