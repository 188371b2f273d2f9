"""Operations of a real deployment: provisioning, process management, run submission.

A deployed consortium runs Flower's own distributed engine: one SuperLink (the
coordinator) and one SuperNode per hospital, over TLS with SuperNode
authentication, plus an MLflow tracking server. This package provisions the
certificates and keys (:mod:`~fedhealth.deploy.pki`, :mod:`~fedhealth.deploy.provision`),
starts and stops the processes (:mod:`~fedhealth.deploy.processes`), submits and
watches runs (:mod:`~fedhealth.deploy.submit`). It sits above the site runtime and the
coordinator and is imported only by the CLI.
"""
