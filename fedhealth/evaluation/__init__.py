"""External validation of a registered model from sufficient statistics the sites release.

:mod:`~fedhealth.evaluation.histograms` is what a site computes and releases (score
histograms per class, with score sums per bin: confusion counts at every threshold of the
grid and calibration bins follow from them); :mod:`~fedhealth.evaluation.metrics` is what
the coordinator derives from them, per site and pooled, with 95 % intervals. Neither
imports torch, Flower or MLflow.
"""
