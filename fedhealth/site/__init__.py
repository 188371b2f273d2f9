"""fedhealth.site."""
