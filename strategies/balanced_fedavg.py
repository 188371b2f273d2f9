"""BalancedFedAvg: FedAvg that stops the largest hospital from drowning out the rest.

Plain FedAvg weights each site by its number of training records ``n``. In a
hospital consortium sizes differ by orders of magnitude and label mixes differ
too (non-IID), so the global model fits the largest centre and is poor at the
small ones. BalancedFedAvg weights each site by ``n ** alpha``:

- ``alpha = 1``: FedAvg;
- ``alpha = 0.5`` (default): square-root weighting, a common compromise;
- ``alpha = 0``: every site counts the same (optimises the mean over sites,
  which is how FLamby scores Fed-Heart-Disease).

Each site computes its own weight (``site-weight`` in its reply), so the
aggregate stays a weighted mean and works unchanged under encrypted
aggregation. Use it from an experiment::

    [strategy]
    name = "strategies/balanced_fedavg.py:BalancedFedAvg"
    options = { alpha = 0.5 }
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedhealth.protocol import ConfigKey, Metric


class BalancedFedAvg(FedAvg):
    """FedAvg with site weights ``n ** alpha``.

    Parameters
    ----------
    alpha : float (default: 0.5)
        Exponent of the site size in its weight, in [0, 1].
    **kwargs
        Any parameter of ``flwr.serverapp.strategy.FedAvg`` (sampling, minimum sites).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=Metric.SITE_WEIGHT,
        )
        self.alpha = alpha

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask each site to weight its update by ``n ** alpha``."""
        config[ConfigKey.WEIGHT_EXPONENT] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)
