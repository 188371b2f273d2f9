"""A Grid that never lets the coordinator wait forever for sites.

Flower's ``sample_nodes`` loops until ``min_available_nodes`` are connected, with no
deadline. :class:`GuardedGrid` makes ``get_node_ids`` wait (bounded) for enough sites
and raise a clear :class:`~fedhealth.errors.FederationError` instead of hanging.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fedhealth.errors import FederationError


class GuardedGrid:
    """Wrap a Flower ``Grid``: bounded waits for connected sites, everything else delegated.

    Parameters
    ----------
    grid : Grid
        The real grid.
    min_sites : int
        Fewest connected sites a round needs.
    expected : int
        Sites the experiment lists; the first call waits (up to ``first_wait``) for all.
    wait : float
        Seconds to wait for ``min_sites`` before failing.
    first_wait : float
        Seconds the very first call waits for all ``expected`` sites.
    """

    def __init__(
        self, grid: Any, min_sites: int, expected: int, wait: float, first_wait: float = 60.0
    ) -> None:
        self._grid = grid
        self.min_sites = min_sites
        self.expected = expected
        self.wait = wait
        self.first_wait = first_wait
        self._first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids, after waiting (bounded) until enough sites are connected."""
        start = time.monotonic()
        want, limit = (self.expected, self.first_wait) if self._first else (self.min_sites, 0.0)
        self._first = False
        while True:
            ids = list(self._grid.get_node_ids())
            waited = time.monotonic() - start
            if len(ids) >= want or (len(ids) >= self.min_sites and waited >= limit):
                return ids
            if waited >= max(self.wait, limit):
                raise FederationError(
                    f"only {len(ids)} site(s) connected to the SuperLink after {waited:.0f} s; "
                    f"the experiment needs min_sites = {self.min_sites}. Start the missing "
                    "sites (`fedhealth site start PROFILE`) or lower `experiment.min_sites`"
                )
            time.sleep(1.0)
