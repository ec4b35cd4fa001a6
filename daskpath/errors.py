"""Error hierarchy.

Every error daskpath raises on bad input is a :class:`DaskpathError` whose message is one line
naming the file, key or value at fault and how to fix it. The CLI prints that line (no traceback
unless ``-v``) and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "DaskpathError",
    "ConfigError",
    "SlideError",
    "PairMismatchError",
    "ManifestError",
    "ModelError",
]


class DaskpathError(Exception):
    """Base class of all daskpath errors on bad input or environment."""


class ConfigError(DaskpathError):
    """Unknown, missing or ill-typed configuration key."""


class SlideError(DaskpathError):
    """A slide file is missing, unreadable, corrupt, empty or of an unsupported pixel type."""


class PairMismatchError(SlideError):
    """The two slides of a pair do not match (size)."""


class ManifestError(DaskpathError):
    """The slide manifest is missing, malformed, or has duplicate slide ids."""


class ModelError(DaskpathError):
    """A model folder or checkpoint is missing, corrupt, or of the wrong architecture."""
