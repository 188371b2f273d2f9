"""fedhealth.data."""
