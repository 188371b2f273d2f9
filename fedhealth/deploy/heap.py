"""Keep a long-lived process's garbage collector off what its imports left behind.

A site's app process, its SuperNode and the coordinator's SuperLink start once and serve
every message of every run. Their imports (torch, Opacus, TenSEAL, Flower, FastAPI) leave
hundreds of thousands of objects that live as long as the process, and CPython's full
collection traverses all of them: in a 3-round deployed benchmark each site's app process
paused 0.23-0.29 s once, in the middle of answering a message, and the SuperLink 0.09-0.11 s
every few seconds. :func:`settle` collects once at the end of start-up and moves every
surviving object into the collector's permanent generation (:func:`gc.freeze`); later
collections see only what was allocated while serving, which is still collected as usual.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect once, then exempt every surviving object from later collections.

    Call it when a long-lived process has finished starting (its imports and warm-up done),
    before it serves.

    Returns
    -------
    int
        How many objects are now in the permanent generation.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
