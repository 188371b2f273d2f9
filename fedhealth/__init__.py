"""fedhealth: federated learning and privacy computing for hospital consortia."""

__version__ = "0.1.0"
