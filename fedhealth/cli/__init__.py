"""fedhealth.cli."""
