"""What an evaluation-only study found (shared by the coordinator and the registry)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fedhealth.evaluation.metrics import INTERVAL_METHOD
from fedhealth.protocol import Refusal


@dataclass
class ValidationResult:
    """What an evaluation-only study found."""

    model: str
    version: str
    experiment: str
    split: str
    threshold: float
    metrics: dict[str, dict[str, Any]]
    releases: dict[str, dict[str, Any]]
    epsilon: dict[str, float]
    refusals: list[Refusal] = field(default_factory=list)
    finished: float = field(default_factory=time.time)
    run_id: str = ""
    interval_method: str = INTERVAL_METHOD

    @property
    def sites(self) -> list[str]:
        """The sites that released statistics."""
        return sorted(self.releases)
