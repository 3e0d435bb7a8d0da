"""Every error the library raises. Each message says what happened and what to do next.

Only the CLI turns these into exit codes; library code never prints or exits.
"""

from __future__ import annotations


class RuclipSearchError(Exception):
    """Base class: catch this to handle any ruclip-search failure."""


class ModelNotFoundError(RuclipSearchError):
    """A model name or folder could not be resolved (unknown name, offline and not cached, missing file)."""


class CheckpointError(RuclipSearchError):
    """A checkpoint file exists but cannot be used (corrupt, unsafe pickle, wrong shapes)."""


class ImageError(RuclipSearchError):
    """One image cannot be decoded; the indexer records it and goes on."""


class IndexNotFoundError(RuclipSearchError):
    """No index at the given path, or no index to choose by default."""


class IndexLockedError(RuclipSearchError):
    """Another build holds the index's write lock."""


class ModelMismatchError(RuclipSearchError):
    """The index was built with another model."""


class QueryError(RuclipSearchError):
    """A query is empty, malformed or refers to an unknown image."""


class StorageError(RuclipSearchError):
    """The index directory cannot be written (disk full, permissions) or is corrupt."""
