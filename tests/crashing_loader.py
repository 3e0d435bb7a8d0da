"""Loaders that misbehave on purpose, importable by decoding worker processes (they are pickled by name)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

from ruclip_search.loader import Loaded, load_one

CRASH_NAME = "crash.jpg"


def exit_on_crash_jpg(preprocessor: Any, path: str, max_pixels: int | None) -> Loaded:
    """As load_one, but a worker process dies (exit 17) on a file named crash.jpg, like a decoder segfault."""
    if os.path.basename(path) == CRASH_NAME and multiprocessing.parent_process() is not None:
        os._exit(17)
    return load_one(preprocessor, path, max_pixels)
