"""The site console: a local web page where a hospital's operator sees the site's policy,
datasets, privacy spend and audit log, and approves or declines studies (issue 13).

:func:`fedhealth.site.console.app.create_app` builds the Flask application;
``fedhealth site console PROFILE`` serves it on 127.0.0.1. It reads only the site's own
profile, study store, privacy ledger and audit log, and never shows a record of a dataset.
"""
