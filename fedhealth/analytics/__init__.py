"""Federated analytics: descriptive statistics and survival curves under the privacy ledger.

* :mod:`~fedhealth.analytics.site_queries` -- at a site: read the declared columns, compute
  each query's sufficient statistics, charge the ledger, add Gaussian noise.
* :mod:`~fedhealth.analytics.pooling` -- at the coordinator: pool the sites' noisy releases
  into consortium answers with 95 % intervals.
* :mod:`~fedhealth.analytics.report` -- terminal table and MLflow run.
* :mod:`~fedhealth.analytics.local` -- run an analysis in process (every site's real code).

No Flower here: the ClientApp and ServerApp handlers wrap these functions.
"""
