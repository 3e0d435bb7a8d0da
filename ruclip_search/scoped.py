"""Exact search over a small allowed set (one user's collection in a large index), with the vectors taken from
the IVF-Flat file's own inverted lists rather than from the store row by row.

A scoped query at 1M photos used FAISS's filtered IVF search (many lists probed for a few hundred hits, then an
exact re-run on vectors read from SQLite when a page came up short): 26 ms with the pages cached, 100 ms or more
without. An IVF-Flat file already holds every vector it covers in full precision (the stored float16 values,
widened), in RAM or the page cache: a hash map id -> (list, offset) finds them (`reconstruct_batch`), and a
matmul over the allowed ids is exact and costs about a millisecond for a thousand photos. IVF-PQ and HNSW files
keep no exact copy: they go the FAISS way as before.
"""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np

#: Up to this many allowed ids a scoped search is exact over the file's vectors (reconstructing 16k vectors is
#: ~50 MB of copies, a few ms; beyond it FAISS's filtered search probes few enough lists to be cheaper).
EXACT_MAX = 16_384

_lock = threading.Lock()
_KEEP = 2
_built: list[tuple[Any, FlatVectors]] = []  # (FAISS index, its lookup), newest first: SWIG objects take no attributes


class FlatVectors:
    """The vectors of an IVF-Flat index by id: which ids it holds (sorted) and their float32 vectors."""

    def __init__(self, ivf: Any) -> None:
        invlists = ivf.invlists
        parts = []
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(lst, ptr)
        self.ids = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # id -> (list, offset), for reconstruct_batch
        self.ivf = ivf

    @classmethod
    def of(cls, index: Any) -> FlatVectors | None:
        """The lookup of `index` (built once per loaded file, ~0.3 s at 1M), or None when it is not IVF-Flat."""
        if not isinstance(index, faiss.IndexIVFFlat):  # (the files hold a bare IndexIVFFlat; PQ, HNSW: None)
            return None
        with _lock:
            for held, found in _built:
                if held is index:
                    return found
            found = cls(index)
            _built.insert(0, (index, found))
            del _built[_KEEP:]  # the file in use and its predecessor (searches may still run on it)
        return found

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """A bool mask of the ids this file holds a vector for."""
        if not len(self.ids):
            return np.zeros(len(ids), dtype=bool)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[at] == ids

    def get(self, ids: np.ndarray) -> np.ndarray:
        """(n, d) float32 vectors of ids the file holds."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.ivf.d), dtype=np.float32)
        return self.ivf.reconstruct_batch(ids)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through torch (numpy's BLAS threads keep spinning after a call: see search._matmul)."""
    import torch

    return (torch.from_numpy(a) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def top(flat: FlatVectors, tombs: np.ndarray, query: np.ndarray, want: int,
        allowed: np.ndarray) -> list[tuple[int, float]]:  # fmt: skip
    """Exact top-`want` (id, score) of the file's vectors among `allowed`, never a tombstoned id (its current
    vector, if any, is the recent segment's), ties by id."""
    ids = allowed[~np.isin(allowed, tombs)] if len(tombs) else allowed
    ids = ids[flat.holds(ids)]  # written by another process since this state was caught up: not yet visible
    if not len(ids):
        return []
    scores = _matmul(flat.get(ids), query[0])
    order = np.lexsort((ids, -scores))[:want]
    return [(int(ids[j]), float(scores[j])) for j in order]
