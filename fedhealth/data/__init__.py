"""fedhealth.data: read a site's tables and images, normalise, split, demo data.

Importing this package is light; the image readers (torch, pydicom, PIL) are
imported from :mod:`fedhealth.data.imaging` when used.
"""

from __future__ import annotations

from fedhealth.data.normalisation import Moments, Standardizer, combine_moments, local_moments
from fedhealth.data.splits import train_test_split_indices
from fedhealth.data.tabular import TabularData, TabularSchema, read_table

__all__ = [
    "Moments",
    "Standardizer",
    "TabularData",
    "TabularSchema",
    "combine_moments",
    "local_moments",
    "read_table",
    "train_test_split_indices",
]
