"""
The proxy process's policy for Python's cyclic garbage collector.

A relayed connection makes a few dozen container objects (its protocols,
transports, the dial's L{Deferred}s) that live for milliseconds and are
freed by reference counting as it ends: the relay and the transports undo
their own cycles.  With CPython's default thresholds (a young-generation
collection every 700 allocations, C{gc.get_threshold()}) a busy proxy
collects every few connections; each collection walks the connections in
flight, which then survive into the older generations and bring on full
collections of the whole heap (Twisted and every module loaded).  Measured
on 20 concurrent short connections: about 4% of the proxy's CPU.

So, once the proxy has started (C{gc.freeze}, Python 3.7+, moves what is
alive then out of every future collection: modules, configuration,
listeners), the young generation is collected every L{YOUNG_THRESHOLD}
allocations instead: the connections in flight are then a small part of
what a collection walks, and few of them are promoted.  Cyclic garbage
still is collected (a Twisted endpoint's connector and wrapping factory
refer to each other), a little later.  This is the tuning the CPython
documentation of C{gc.freeze} describes for long-running servers.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
"""
Allocations (less deallocations) of container objects between two
collections of the youngest generation (CPython's default: 700).
"""


def tuneCollector() -> None:
    """
    Freeze what is alive now and raise the young generation's threshold:
    called once a proxy process has built its service, before it serves.
    The older generations' thresholds are CPython's.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
