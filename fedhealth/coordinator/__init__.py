"""fedhealth.coordinator."""
