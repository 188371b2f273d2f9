"""fedhealth.privacy."""
