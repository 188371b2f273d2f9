"""What a site's refusal may say to the coordinator: the rule, never a value from the data.

A data problem found while reading a site's dataset is described with the row, column and
cell value that caused it (``row 12: value 'abc' ...``): exactly what the site operator needs,
and exactly what must not leave the site. At the site boundary such an error becomes a
refusal that carries only its rule (``data``), the dataset's name and what to do; the full
detail goes to the site's own audit log (a ``refusal-detail`` line), where the operator reads
it with ``fedhealth site audit``.

Errors whose text is built from the request and the site's policy alone (policy rules,
malformed requests, split pins) are sent as they are.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fedhealth.config.site import SiteProfile
from fedhealth.errors import DataError, PolicyError
from fedhealth.jsonlines import append

logger = logging.getLogger(__name__)

DATA_RULE = "data"


class DataRefusal(PolicyError):
    """A value-free refusal standing for a data problem whose detail stayed at the site."""

    rule = DATA_RULE
    public = True


def data_refusal(
    profile: SiteProfile, dataset: str, exc: Exception, info: dict[str, Any] | None = None
) -> DataRefusal:
    """Log ``exc`` in full to the site's audit log; return the refusal the coordinator sees.

    Parameters
    ----------
    profile : SiteProfile
        The site.
    dataset : str
        The dataset that could not be read.
    exc : Exception
        The data error, with whatever rows and values it quotes.
    info : dict, optional
        What the audit log records about the request (experiment, round, ...).

    Returns
    -------
    DataRefusal
        Names the dataset and the rule, never a row or a value.
    """
    append(
        profile.workspace / "audit.log",
        {"ts": time.time(), "event": "refusal-detail", "site": profile.name, "rule": DATA_RULE,
         "dataset": dataset, **(info or {}), "detail": str(exc)},
    )  # fmt: skip
    return DataRefusal(
        f"site {profile.name!r} cannot read dataset {dataset!r} for this task (rule "
        f"{DATA_RULE!r}); the details stay in the site's audit log. Ask the site operator."
    )


def public_message(site: str, exc: Exception) -> str:
    """The text of ``exc`` that may leave the site.

    A :class:`~fedhealth.errors.DataError` that was not already turned into a value-free
    refusal is replaced by a generic message (its text is logged locally, not sent).
    """
    if isinstance(exc, DataError) and not getattr(exc, "public", False):
        logger.warning("site %s: data error kept at the site: %s", site, exc)
        return (
            f"site {site!r} cannot use its data for this request (rule {DATA_RULE!r}); the "
            "details stay at the site. Ask the site operator."
        )
    return str(exc)
