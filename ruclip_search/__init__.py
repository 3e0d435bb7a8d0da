"""ruclip-search: find photos by their content from a Russian sentence, with RuCLIP, FAISS and SQLite."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "build", "Index", "Hit", "SearchFilters", "zero_shot", "errors"]

if TYPE_CHECKING:  # pragma: no cover
    from .encoder import load_model
    from .filters import SearchFilters
    from .indexer import build
    from .search import Hit, Index, zero_shot

# Lazy attributes: `import ruclip_search` stays cheap (no torch import) until a name is used.
_LAZY = {
    "load_model": "encoder",
    "build": "indexer",
    "Index": "search",
    "Hit": "search",
    "SearchFilters": "filters",
    "zero_shot": "search",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'ruclip_search' has no attribute {name!r}")
