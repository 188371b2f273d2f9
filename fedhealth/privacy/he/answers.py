"""Coordinator side: read the quorum's decrypted aggregates (split, check they agree)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedhealth.errors import CryptoError

__all__ = ["answers_agree", "split_aggregate"]


def split_aggregate(aggregate: np.ndarray, weight_scale: float = 1.0) -> tuple[np.ndarray, float]:
    """Split a decrypted aggregate into ``(sum_i n_i u_i, sum_i n_i)``.

    With ``weight_scale`` equal to the one used by the sites the results are in example
    units; the FedAvg mean is ``weighted_sum / total`` either way.
    """
    a = np.asarray(aggregate, dtype=np.float64)
    return a[:-1] * weight_scale, float(a[-1]) * weight_scale


def answers_agree(answers: Mapping[str, np.ndarray], atol: float) -> None:
    """Check that several sites decrypted the same aggregate.

    Parameters
    ----------
    answers
        ``site -> decrypted aggregate``.
    atol
        Largest allowed absolute difference.

    Raises
    ------
    CryptoError
        Naming the sites that disagree with the majority (all, if there is none).
    """
    names = sorted(answers)
    if len(names) < 2:
        return
    arrays = {n: np.asarray(answers[n], dtype=np.float64) for n in names}

    def same(a: str, b: str) -> bool:
        x, y = arrays[a], arrays[b]
        return x.shape == y.shape and bool(np.all(np.abs(x - y) <= atol))

    support = {n: [m for m in names if same(n, m)] for n in names}
    best = max(names, key=lambda n: len(support[n]))
    majority = support[best]
    if len(majority) == len(names):
        return
    if 2 * len(majority) > len(names):
        odd = [n for n in names if n not in majority]
        raise CryptoError(
            f"decrypted aggregates disagree: site(s) {odd} differ from {majority} by more than "
            f"{atol:g}; check those sites' keys and the requests they were sent"
        )
    raise CryptoError(
        f"decrypted aggregates disagree with no majority among sites {names} (atol {atol:g}); "
        "the coordinator may have sent different requests to different sites"
    )
