"""Deliberate crashes for fault-injection tests, switched on by one environment variable.

DIST_SENSE_CRASH="POINT:N[:RANK]" makes the process die like `kill -9` (os._exit,
no cleanup, no flushing) the N-th time it reaches crash point POINT, on rank RANK
(any rank if omitted). Unset, `crash_point` costs one dictionary lookup.
"""
from __future__ import annotations

import os
from collections import Counter

_seen: Counter = Counter()


def crash_point(name: str) -> None:
    spec = os.environ.get("DIST_SENSE_CRASH")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    count, _, rank = rest.partition(":")
    if rank:
        from dist_sense.comm import detect

        if detect().rank != int(rank):
            return
    _seen[name] += 1
    if _seen[name] == int(count or 1):
        os._exit(137)
