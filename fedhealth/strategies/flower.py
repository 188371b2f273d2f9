"""Flower's built-in strategies, by the names experiments use (imported only to run)."""

from __future__ import annotations

from fedhealth.catalogue import PROXIMAL, STRATEGIES, WEIGHTED_MEAN

_FLWR = "flwr.serverapp.strategy"

STRATEGIES.declare(
    "fedavg", f"{_FLWR}:FedAvg", traits={WEIGHTED_MEAN}, summary="Weighted mean of the updates."
)
STRATEGIES.declare(
    "fedprox",
    f"{_FLWR}:FedProx",
    traits={WEIGHTED_MEAN, PROXIMAL},
    summary="FedAvg; sites add a proximal term (`proximal_mu`) to their loss.",
)
STRATEGIES.declare(
    "fedadam",
    f"{_FLWR}:FedAdam",
    traits={WEIGHTED_MEAN},
    summary="Adam on the server, applied to the weighted mean.",
)
STRATEGIES.declare(
    "fedyogi",
    f"{_FLWR}:FedYogi",
    traits={WEIGHTED_MEAN},
    summary="Yogi on the server, applied to the weighted mean.",
)
STRATEGIES.declare(
    "fedadagrad",
    f"{_FLWR}:FedAdagrad",
    traits={WEIGHTED_MEAN},
    summary="Adagrad on the server, applied to the weighted mean.",
)
STRATEGIES.declare(
    "fedavgm",
    f"{_FLWR}:FedAvgM",
    traits={WEIGHTED_MEAN},
    summary="Server momentum on the weighted mean.",
)
STRATEGIES.declare(
    "fedmedian", f"{_FLWR}:FedMedian", summary="Coordinate-wise median of the updates."
)
STRATEGIES.declare(
    "fedtrimmedavg", f"{_FLWR}:FedTrimmedAvg", summary="Mean after trimming extreme updates."
)
STRATEGIES.declare("krum", f"{_FLWR}:Krum", summary="The update closest to its neighbours.")
