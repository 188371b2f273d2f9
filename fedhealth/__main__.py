"""``python -m fedhealth``."""

from fedhealth.cli.main import app

app()
