"""How an EHR feature's several values in its window become one: the ``rule`` of a FHIR or
OMOP feature (``fedhealth.config.ehr_sources.Rule``), shared by both readers."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np


def apply_rule(rule: str, values: list[tuple[dt.date | None, Any]]) -> Any:
    """Reduce one patient's dated values of a feature to one value.

    Parameters
    ----------
    rule
        ``"mean"``, ``"max"`` or ``"min"`` (numeric values), or ``"latest"`` / ``"first"``
        by date.
    values
        ``(date, value)`` pairs, not empty; the date may be unknown (``None``).

    Returns
    -------
    Any
        A float for ``mean``, ``max`` and ``min``; else the chosen value as given.
    """
    if rule == "mean":
        return float(np.mean([float(v) for _, v in values]))
    if rule in ("max", "min"):
        nums = [float(v) for _, v in values]
        return max(nums) if rule == "max" else min(nums)
    # Undated values sort first: a dated value is preferred as "latest".
    ordered = sorted(values, key=lambda dv: (dv[0] is not None, dv[0] or dt.date.min))
    return ordered[-1][1] if rule == "latest" else ordered[0][1]
