"""Error hierarchy.

Every error daskpath raises on bad input is a :class:`DaskpathError` whose message is one line
naming the file, key or value at fault and how to fix it. The CLI prints that line (no traceback
unless ``-v``) and exits non-zero.

As in ``zarr.errors``, each class also subclasses the builtin exception it means, so code that
does not know daskpath can still ``except ValueError`` or ``except FileNotFoundError``::

    DaskpathError(Exception)                     bad input or environment (no GPU...)
    ├── ConfigError(ValueError)                  config file, key or value; ``--set``
    ├── InvalidInputError(ValueError)            data or arguments given to a function
    │   ├── SlideError                           slide unreadable, corrupt, empty, wrong pixels
    │   │   ├── SlideNotFoundError(FileNotFoundError)
    │   │   └── PairMismatchError                the two slides of a pair differ in size
    │   └── ManifestError                        manifest malformed, duplicate slide ids
    │       └── ManifestNotFoundError(FileNotFoundError)
    └── ModelError(ValueError)                   model folder, spec or checkpoint
        └── ModelNotFoundError(FileNotFoundError)
"""

from __future__ import annotations

__all__ = [
    "DaskpathError",
    "ConfigError",
    "InvalidInputError",
    "SlideError",
    "SlideNotFoundError",
    "PairMismatchError",
    "ManifestError",
    "ManifestNotFoundError",
    "ModelError",
    "ModelNotFoundError",
]


class DaskpathError(Exception):
    """Base class of all daskpath errors on bad input or environment."""


class ConfigError(DaskpathError, ValueError):
    """Unknown, missing or ill-typed configuration key, or an unreadable config file."""


class InvalidInputError(DaskpathError, ValueError):
    """Bad data or arguments given to a library function (dtype, shape, table, region...)."""


class SlideError(InvalidInputError):
    """A slide file is unreadable, corrupt, empty or of an unsupported pixel type."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """A slide file does not exist (or vanished after it was opened)."""

    # the OSError layout wins: unpickling (tblib, on dask workers) must use OSError.__new__
    __new__ = FileNotFoundError.__new__


class PairMismatchError(SlideError):
    """The two slides of a pair do not match (size)."""


class ManifestError(InvalidInputError):
    """The slide manifest is malformed or has duplicate slide ids."""


class ManifestNotFoundError(ManifestError, FileNotFoundError):
    """The slide manifest file does not exist."""

    # the OSError layout wins: unpickling (tblib, on dask workers) must use OSError.__new__
    __new__ = FileNotFoundError.__new__


class ModelError(DaskpathError, ValueError):
    """A model folder, spec or checkpoint is corrupt or of the wrong architecture."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model folder, weights file or checkpoint does not exist."""

    # the OSError layout wins: unpickling (tblib, on dask workers) must use OSError.__new__
    __new__ = FileNotFoundError.__new__
