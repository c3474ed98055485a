"""Deliberate faults for fault-injection tests, switched on by environment variables.

DIST_SENSE_CRASH="POINT:N[:RANK]" makes the process die like `kill -9` (os._exit,
no cleanup, no flushing) the N-th time it reaches crash point POINT, on rank RANK
(any rank if omitted). DIST_SENSE_BUG, with the same syntax, raises PlantedBug there
instead: a bug as the entry point sees one. DIST_SENSE_SLOW="POINT:SECONDS" sleeps that
long every time any rank reaches POINT, so a test can act while a run is surely still going
(signal it mid-training, say). Unset, `crash_point` costs three dictionary lookups.
"""
from __future__ import annotations

import os
import time
from collections import Counter

_seen: Counter = Counter()


class PlantedBug(RuntimeError):
    """Raised at a crash point by DIST_SENSE_BUG."""


def crash_point(name: str) -> None:
    for variable in ("DIST_SENSE_CRASH", "DIST_SENSE_BUG"):
        spec = os.environ.get(variable)
        if spec and _due(variable, spec, name):
            if variable == "DIST_SENSE_BUG":
                raise PlantedBug(f"planted bug at {name} ({variable}={spec})")
            os._exit(137)
    slow = os.environ.get("DIST_SENSE_SLOW")
    if slow and slow.partition(":")[0] == name:
        time.sleep(float(slow.partition(":")[2]))


def _due(variable: str, spec: str, name: str) -> bool:
    """Whether `spec` (POINT:N[:RANK]) fires now at crash point `name`; counts the visit if it is for this rank."""
    point, _, rest = spec.partition(":")
    if point != name:
        return False
    count, _, rank = rest.partition(":")
    if rank:
        from dist_sense.comm import detect

        if detect().rank != int(rank):
            return False
    _seen[variable, name] += 1
    return _seen[variable, name] == int(count or 1)
