"""fedhealth.registry."""
