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


def exit_on_crash_jpg_in_ray(preprocessor: Any, path: str, max_pixels: int | None) -> Loaded:
    """As load_one, but a Ray worker dies (exit 17) on crash.jpg every time, like a decoder segfault."""
    if os.path.basename(path) == CRASH_NAME:
        os._exit(17)
    return load_one(preprocessor, path, max_pixels)


def exit_once_on_flaky_jpg(preprocessor: Any, path: str, max_pixels: int | None) -> Loaded:
    """As load_one, but the first worker to read flaky.jpg dies (a marker file beside it records that)."""
    if os.path.basename(path) == "flaky.jpg":
        marker = path + ".died"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            os._exit(18)
        except FileExistsError:
            pass
    return load_one(preprocessor, path, max_pixels)


class DiesOnceModel:
    """A loaded model whose first encode_pixels call (across processes, via a marker file) kills its process."""

    def __init__(self, model: Any, marker: str) -> None:
        self.model, self.marker = model, marker
        self.name, self.dim, self.preprocessor = model.name, model.dim, model.preprocessor

    def encode_pixels(self, pixels: Any) -> Any:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            os._exit(19)
        except FileExistsError:
            pass
        return self.model.encode_pixels(pixels)
