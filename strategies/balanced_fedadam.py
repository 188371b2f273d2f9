"""BalancedFedAdam: FedAdam on a mean in which every hospital weighs ``n ** alpha``.

FedAdam (Reddi et al., 2021) treats the weighted mean of the sites' updates as a
pseudo-gradient and takes an Adam step with it on the server. Flower's FedAdam weights
each site by its number of training records, so the largest centre dominates; like
``strategies/balanced_fedavg.py``, this one weights each site by ``n ** alpha``:

- ``alpha = 1``: Flower's FedAdam;
- ``alpha = 0`` (default): every site counts the same, which optimises the mean over
  sites -- how FLamby scores Fed-Heart-Disease.

Each site computes its own weight (``site-weight`` in its reply), so the aggregate
stays a weighted mean and works unchanged under encrypted aggregation (the server's
Adam step needs only the decrypted mean). Use it from an experiment::

    [strategy]
    name = "strategies/balanced_fedadam.py:BalancedFedAdam"
    options = { alpha = 0.0, eta = 0.03 }
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam

from fedhealth.protocol import ConfigKey, Metric


class BalancedFedAdam(FedAdam):
    """FedAdam with site weights ``n ** alpha``.

    Parameters
    ----------
    alpha : float (default: 0.0)
        Exponent of the site size in its weight, in [0, 1].
    eta : float (default: 0.03)
        Server learning rate (Adam's step size).
    beta_1, beta_2 : float (default: 0.9, 0.99)
        Adam's moment decay rates.
    tau : float (default: 1e-9)
        Adam's epsilon: how adaptive the step is (small = fully adaptive).
    fraction_train, fraction_evaluate : float (default: 1.0)
        Share of the sites sampled for training and evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int (default: 2)
        Fewest sites a round needs.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.0,
        eta: float = 0.03,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
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
            eta=eta,
            beta_1=beta_1,
            beta_2=beta_2,
            tau=tau,
        )
        self.alpha = alpha

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask each site to weight its update by ``n ** alpha``."""
        config[ConfigKey.WEIGHT_EXPONENT] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)
