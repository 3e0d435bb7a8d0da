"""What runs on the Ray cluster for `engine="ray"`: the decode task and the encoder actor.

Kept apart from ray_engine (the driver side) so that a Ray worker unpickling these imports only the loader
and numpy, not the indexer and the store (SQLAlchemy, FAISS): about 0.6 s less per worker process started,
measured, which the first decode task waits for.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import numpy as np

from .loader import Loaded, Loader

#: The columns of a decoded row (besides "pixels"), as they travel to the encoder and back to the driver.
COLUMNS = ("i", "ok", "digest", "meta", "error", "fatal")


def decode_chunks(batch: dict[str, np.ndarray], preprocessor: Any, max_pixels: int | None,
                  loader: Loader) -> dict[str, np.ndarray]:  # fmt: skip
    """A CPU task: read, hash, decode and preprocess the files of each chunk row (a list of paths) and return
    one row per file; a bad file becomes a row with its reason."""
    import torch

    torch.set_num_threads(1)  # one core per task: Ray schedules the tasks, not OpenMP
    ids = np.asarray([i for row in batch["i"] for i in row], dtype=np.int64)
    paths = [str(p) for row in batch["path"] for p in row]
    # every block's pixels have one shape, even a block of failed files only: blocks are concatenated into
    # the encoder's batches, and mixed shapes would make an array of objects there
    shape = (3, preprocessor.image_size, preprocessor.image_size)
    try:
        results: list[Loaded] = [loader(preprocessor, p, max_pixels) for p in paths]
    except Exception as e:  # a bug, not a bad file (load_one never raises): the driver stops the build
        return fatal_rows(ids, shape, f"decoding failed: {type(e).__name__}: {e}")
    pixels = np.zeros((len(results), *shape), dtype=np.float32)  # a failed file's row stays zero
    for k, r in enumerate(results):
        if r.pixels is not None:
            pixels[k] = r.pixels
    return {
        "i": ids,
        "ok": np.array([r.pixels is not None for r in results], dtype=bool),
        "pixels": pixels,
        "digest": np.array([r.content_hash.hex() if r.content_hash else "" for r in results], dtype=object),
        "meta": np.array([json.dumps(asdict(r.meta)) if r.meta else "" for r in results], dtype=object),
        "error": np.array([r.error or "" for r in results], dtype=object),
        "fatal": np.array([""] * len(results), dtype=object),
    }


def fatal_rows(ids: np.ndarray, shape: tuple[int, ...], why: str) -> dict[str, np.ndarray]:
    """Rows that tell the driver to stop: an exception in our code on the cluster is a bug or a broken set-up
    (a dying process is not: Ray retries it), and must not pass as files that failed."""
    n = len(ids)
    empty = np.array([""] * n, dtype=object)
    return {"i": ids, "ok": np.zeros(n, dtype=bool), "pixels": np.zeros((n, *shape), dtype=np.float32),
            "digest": empty, "meta": empty, "error": empty, "fatal": np.array([why] * n, dtype=object)}  # fmt: skip


class Encoder:
    """An actor holding the image tower: embeds the decoded rows of a batch (pixels do not travel back).

    `threads`: torch intra-op threads, as many as the CPUs the actor holds (Ray sets OMP_NUM_THREADS to the
    actor's num_cpus; torch is told explicitly so the figure does not depend on that).
    """

    def __init__(self, model: Any, device: str, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        if isinstance(model, ray.ObjectRef):  # a loaded model the driver put in the object store
            model = ray.get(model)
        if isinstance(model, (str, os.PathLike)):
            from .encoder import load_model

            model = load_model(model, device=device, parts=("image",))
        self.model = model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = batch["ok"].astype(bool)
        emb = np.zeros((len(ok), self.model.dim), dtype=np.float32)
        out = {k: batch[k] for k in COLUMNS}
        if any(batch["fatal"]):  # the build stops: nothing to encode
            out["embedding"] = emb
            return out
        try:
            if ok.any():
                emb[ok] = self.model.encode_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        except Exception as e:  # out of GPU memory, a broken model...: the driver stops the build
            out["fatal"] = np.array([f"encoding failed: {type(e).__name__}: {e}"] * len(ok), dtype=object)
        out["embedding"] = emb
        return out
