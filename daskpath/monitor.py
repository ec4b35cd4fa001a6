"""Worker-side Prometheus counters (exposed on each worker's ``/metrics``).

distributed serves ``prometheus_client``'s default registry on every worker's HTTP port, so
counters registered here show up next to Dask's own metrics. Counters are created lazily, once
per process; without ``prometheus_client`` they are no-ops.
"""

from __future__ import annotations

import threading

__all__ = ["COUNTERS", "count"]

COUNTERS = {
    "chunks_processed": "Slide chunks processed (all stages)",
    "pixels_processed": "Slide pixels processed by the preprocessing stage",
    "tiles_processed": "Tiles whose statistics were completed",
    "nuclei_found": "Nuclei segmented",
    "tiles_translated": "Tiles translated H&E -> virtual IHC",
}

_lock = threading.Lock()
_made: dict = {}


def count(name: str, n: float = 1.0) -> None:
    """Add ``n`` to the counter ``daskpath_<name>_total`` of this process."""
    if n <= 0:
        return
    c = _made.get(name)
    if c is None:
        with _lock:
            c = _made.get(name)
            if c is None:
                try:
                    from prometheus_client import Counter
                except ImportError:  # pragma: no cover - optional
                    _made[name] = False
                    return
                c = Counter(f"daskpath_{name}", COUNTERS.get(name, name))
                _made[name] = c
    if c is not False:
        c.inc(n)
