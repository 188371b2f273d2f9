"""fedhealth.config."""
