"""One model cache per process, shared by the model stages (StarDist, generators, baselines).

Tasks carry only a model's reference (a folder path, a spec); the first task in a worker process
that needs the model builds it here, the others reuse it, so each worker loads a model once and
no model travels in the task graph.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["cached"]

_LOCK = threading.RLock()  # re-entrant: a build may itself use the cache
_CACHE: dict[Hashable, Any] = {}


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()`` once per process for ``key`` (double-checked under a lock), then reuse it.

    A build that raises caches nothing, so the next call tries again.
    """
    value = _CACHE.get(key)
    if value is not None:
        return value
    with _LOCK:
        value = _CACHE.get(key)
        if value is None:
            value = build()
            _CACHE[key] = value
    return value
