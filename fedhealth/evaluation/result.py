"""What an evaluation-only study, or a run's final evaluation, found (shared by the
coordinator and the registry)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
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


#: Folder and file of a training run's final-evaluation artifact (:class:`FinalEvaluation`).
FINAL_DIR = "evaluation"
FINAL_FILE = "score_histograms.json"
FINAL_ARTIFACT = f"{FINAL_DIR}/{FINAL_FILE}"
#: Decision threshold of accuracy, sensitivity and specificity (argmax of two classes).
FINAL_THRESHOLD = 0.5


@dataclass
class FinalEvaluation:
    """What the sites released in a training run's final evaluation, and what follows.

    Logged as the JSON artifact :data:`FINAL_ARTIFACT` of the run; the run report reads it
    back (:func:`from_json`).
    """

    round: int
    releases: dict[str, dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    epsilon: dict[str, float] = field(default_factory=dict)
    withheld: list[str] = field(default_factory=list)
    threshold: float = FINAL_THRESHOLD
    interval_method: str = INTERVAL_METHOD

    def to_json(self) -> str:
        """The artifact's text."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FinalEvaluation:
        """Read the artifact's text back."""
        return cls(**json.loads(text))
