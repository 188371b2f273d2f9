"""Flower's pause before pulling a message's object again, shortened on a local network.

In Flower 1.41 a message travels as a small header plus its objects (records, arrays),
pushed one request each after the header. Whoever pulls the message (a SuperNode pulling a
request, the coordinator pulling a reply) pulls the objects with
``flwr.supercore.inflatable.inflatable_utils.pull_objects``; an object the sender has not
pushed yet is retried after ``PULL_INITIAL_BACKOFF`` = 1 s, doubling up to 10 s. A small
round's objects arrive within milliseconds of their header, so nearly every exchange lost
about a second there, in each direction.

:func:`pace_object_pulls` sets those two keyword defaults of ``pull_objects`` (and of
``pull_and_inflate_object_from_tree``, which passes its own to it) to
:data:`INITIAL_BACKOFF` and :data:`BACKOFF_CAP` in the calling process. It is the only
change, made only on the Flower release it was checked against (otherwise it warns and
leaves Flower as it is); every other limit (tries per object, the overall deadline) stays
Flower's. fedhealth calls it in the processes it starts: a site's SuperNode
(:mod:`fedhealth.deploy.flower_pacing`), a site's app process
(:mod:`fedhealth.deploy.site_exec`) and the coordinator's ServerApp.
"""

from __future__ import annotations

import warnings

#: The Flower release whose ``pull_objects`` this was checked against.
FLOWER_SERIES = "1.41."
#: First pause (s) before pulling a missing object again (Flower: 1 s).
INITIAL_BACKOFF = 0.02
#: Longest pause (s) between pulls of a missing object (Flower: 10 s).
BACKOFF_CAP = 0.5
#: The functions of ``flwr.supercore.inflatable.inflatable_utils`` that pull objects (the
#: second pulls a message from a SuperNode into a site's app process).
PULLING_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
#: Flower's own defaults, checked before they are changed.
FLOWER_DEFAULTS = {"initial_backoff": 1, "backoff_cap": 10}


def pace_object_pulls() -> bool:
    """Shorten Flower's object-pull backoff in this process.

    Returns
    -------
    bool
        ``True`` if the pacing is in place (now or from an earlier call), ``False`` (with a
        warning) if the installed Flower is not the one it was checked against.
    """
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.version import package_version

    functions = [getattr(inflatable_utils, name, None) for name in PULLING_FUNCTIONS]
    kwdefaults = [getattr(f, "__kwdefaults__", None) or {} for f in functions]
    ours = {"initial_backoff": INITIAL_BACKOFF, "backoff_cap": BACKOFF_CAP}
    if all(d.get(k) == v for d in kwdefaults for k, v in ours.items()):
        return True
    if not package_version.startswith(FLOWER_SERIES):
        why = f"Flower {package_version} is installed; this was written for {FLOWER_SERIES}x"
    elif any(d.get(k) != v for d in kwdefaults for k, v in FLOWER_DEFAULTS.items()):
        why = f"the backoff defaults of {', '.join(PULLING_FUNCTIONS)} are not {FLOWER_DEFAULTS}"
    else:
        for d in kwdefaults:
            d.update(ours)
        return True
    warnings.warn(f"object pulls left as Flower's: {why}", stacklevel=2)
    return False
