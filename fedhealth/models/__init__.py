"""The DP-safe model zoo."""

from fedhealth.models.zoo import build_model, model_names

__all__ = ["build_model", "model_names"]
