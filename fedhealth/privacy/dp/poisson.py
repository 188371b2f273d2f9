"""Poisson-sampled batches of in-memory tensors, drawn exactly as Opacus draws them.

Opacus's ``DPDataLoader`` draws each step's batch with ``UniformWithReplacementSampler``
(``torch.rand(n, generator=g) < q``, ``int(1 / q)`` steps an epoch) and then fetches the
chosen records one by one through ``Dataset.__getitem__`` and ``default_collate`` -- on a
tabular step of a fraction of a millisecond that fetching costs more than the step.
:class:`PoissonLoader` makes the same draws from the same generator and indexes the
dataset's tensors in one go: same batches, same sampling rate, same number of steps, so the
accountant's charge is unchanged (``tests/test_dp_fast.py`` checks batch for batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset


class PoissonLoader:
    """Poisson sampling over a ``TensorDataset``: each record joins each batch with prob. q.

    Parameters
    ----------
    dataset : TensorDataset
        The site's training split.
    sample_rate : float
        q, the probability of each record joining each batch.
    generator : torch.Generator, optional
        Source of the draws (None: torch's global generator, as Opacus).

    Attributes
    ----------
    sample_rate : float
    steps : int
        Batches per pass, ``int(1 / q)`` as Opacus.
    """

    def __init__(
        self,
        dataset: TensorDataset,
        sample_rate: float,
        generator: torch.Generator | None = None,
    ) -> None:
        self.dataset = dataset
        self.tensors = dataset.tensors
        self.sample_rate = float(sample_rate)
        self.generator = generator
        self.steps = int(1 / self.sample_rate)
        self.n = len(self.tensors[0])

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # A DataLoader's iterator first draws its workers' base seed from the generator;
        # drawing it too keeps every later draw, and so every batch, identical to Opacus's.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for _ in range(self.steps):
            mask = torch.rand(self.n, generator=self.generator) < self.sample_rate
            idx = mask.nonzero().reshape(-1)
            yield tuple(t.index_select(0, idx) for t in self.tensors)


def fast_loader_applies(loader: DataLoader) -> bool:
    """Whether :class:`PoissonLoader` can replace Opacus's loader for ``loader``.

    Only an in-memory ``TensorDataset`` with the default collation qualifies (other
    datasets may transform records in ``__getitem__``).
    """
    from torch.utils.data._utils.collate import default_collate

    return isinstance(loader.dataset, TensorDataset) and loader.collate_fn is default_collate
