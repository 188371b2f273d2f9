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

``average_last = K`` publishes the mean of the last ``K`` rounds' global models (tail
averaging, Polyak-Ruppert style): training goes on from FedAdam's own iterate, but the
model the sites evaluate after each round, and the one registered at the end, is the mean
of the latest ``K`` global models. Under DP-SGD each round's model carries that round's
noise; the mean averages it out. It is post-processing of models the coordinator already
holds, so it costs no privacy budget, and it needs only the decrypted aggregates, so it
works under encrypted aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
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
    average_last : int (default: 1)
        The published model (evaluated after each round, registered at the end) is the mean
        of the last ``average_last`` rounds' global models (fewer in the first rounds); 1
        publishes the latest global model, as FedAdam does.
    fraction_train, fraction_evaluate : float (default: 1.0)
        Share of the sites sampled for training and evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int (default: 2)
        Fewest sites a round needs.
    """

    #: The aggregate is still FedAdam's weighted mean (``aggregate_train`` only keeps a copy
    #: of the result), so encrypted aggregation and site-level DP accept this strategy.
    weighted_mean_aggregation = True

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
        average_last: int = 1,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if isinstance(average_last, bool) or not isinstance(average_last, int) or average_last < 1:
            raise ValueError(f"average_last must be an integer >= 1, got {average_last!r}")
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
        self.average_last = average_last
        # The latest rounds' global models, keyed "<round>/<array name>": a dict of arrays,
        # so a checkpoint keeps it (fedhealth.coordinator.strategies.strategy_state).
        self.recent_arrays: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask each site to weight its update by ``n ** alpha``."""
        config[ConfigKey.WEIGHT_EXPONENT] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)

    def _kept_rounds(self) -> list[int]:
        """The rounds whose global models :attr:`recent_arrays` holds, oldest first."""
        return sorted({int(key.split("/", 1)[0]) for key in self.recent_arrays})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAdam's step; the new global model is also kept for :meth:`published_arrays`."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.average_last > 1:
            earlier = [r for r in self._kept_rounds() if r < server_round]
            keep = set(earlier[len(earlier) - (self.average_last - 1) :])
            self.recent_arrays = {
                key: value
                for key, value in self.recent_arrays.items()
                if int(key.split("/", 1)[0]) in keep
            }
            for name, array in arrays.items():
                self.recent_arrays[f"{server_round}/{name}"] = array.numpy().copy()
        return arrays, metrics

    def published_arrays(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The model to evaluate and register after ``server_round``.

        Parameters
        ----------
        server_round : int
            The round just aggregated.
        arrays : ArrayRecord
            That round's global model (what the next round trains from).

        Returns
        -------
        ArrayRecord
            ``arrays`` when ``average_last`` is 1; otherwise the element-wise mean of the
            global models of the last ``average_last`` rounds up to ``server_round`` that
            this strategy aggregated (``arrays`` if it holds none of them).
        """
        rounds = [r for r in self._kept_rounds() if r <= server_round][-self.average_last :]
        if self.average_last == 1 or not rounds:
            return arrays
        mean = {
            name: np.mean([self.recent_arrays[f"{r}/{name}"] for r in rounds], axis=0)
            for name in arrays
        }
        return ArrayRecord(
            {name: Array(value.astype(arrays[name].numpy().dtype)) for name, value in mean.items()}
        )
