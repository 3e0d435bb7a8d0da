"""An IVF-PQ index's stored vectors as one flat float16 file by image id, read when its candidates are re-ranked.

Re-ranking reads a hundred or more random rows per query. From the store each row is a B-tree lookup and a row
decoded by the database; here a row is one `pread` at id x row size, READ_THREADS at once, with the kernel's
readahead off for this file (POSIX_FADV_RANDOM: with this VM's 8 MB device readahead on, 240 random 4 KB reads
took ~32 ms on any number of threads; without it 6-16 ms on 16 threads). At 10M out of the page cache, 160 rows:
~4 ms from here, ~6.4 ms from SQLite (bench_scale.py). No library keeps vectors by an external id on disk for
random reads (FAISS's on-disk lists are by list, its refine indexes hold vectors in RAM): hence this.

The store stays the truth. Rows never written read as zeros, and a row whose norm is not ~1 (zeros, a torn or
foreign row) counts as missing: the caller reads those from the store. Builds and folds write rows in place: a
row rewritten under a reader belongs to a photo changed since that reader's FAISS file, which its searches
exclude (stale), so no reader re-ranks on it.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np

from ._threads import shared_pool

READ_THREADS = 16  # rows read at once: random reads here stopped gaining past 16 (a virtual disk)
READ_PART = 8  # ... at least this many rows per thread
NORM_SLACK = 0.02  # float16 rows of unit vectors have norms within ~1e-3 of 1; a row further off is not one


def path_for(folder: str | os.PathLike[str], dim: int) -> Path:
    """The vector file of an index folder for `dim`-d vectors (the dimension in its name: another model's
    vectors never read as these)."""
    return Path(folder) / f"vectors-{int(dim)}.f16"


def remove(folder: str | os.PathLike[str], *, but: int | None = None) -> None:
    """Delete the folder's vector files (but the one for `but`-d vectors): an index that no longer re-ranks from
    disk; readers holding one open keep reading it until they load the new FAISS file."""
    keep = path_for(folder, but).name if but is not None else None
    for p in Path(folder).glob("vectors-*.f16"):
        if p.name != keep:
            p.unlink(missing_ok=True)


class VectorFile:
    """float16 rows of `dim` values at offset id x 2 x dim; `open` to read, `for_writing` to build or fold."""

    def __init__(self, path: str | os.PathLike[str], dim: int, *, writable: bool = False) -> None:
        self.path, self.dim, self.row = Path(path), int(dim), int(dim) * 2
        self.fd = os.open(self.path, (os.O_RDWR | os.O_CREAT) if writable else os.O_RDONLY, 0o644)
        self._closer = weakref.finalize(self, os.close, self.fd)
        if hasattr(os, "posix_fadvise"):  # random reads: no readahead (see the module's docstring)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    @classmethod
    def open(cls, folder: str | os.PathLike[str], dim: int) -> VectorFile | None:
        """The folder's vector file for reading, or None when it has none."""
        try:
            return cls(path_for(folder, dim), dim)
        except FileNotFoundError:
            return None

    @classmethod
    def for_writing(cls, folder: str | os.PathLike[str], dim: int) -> VectorFile:
        """The folder's vector file, created when missing, for `write`."""
        return cls(path_for(folder, dim), dim, writable=True)

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store `vectors` (float32 or float16, (len(ids), dim)) as the rows of `ids`; runs of consecutive ids go
        in one write each (a build's chunks are in id order)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("vector file rows need non-negative ids")
        order = np.argsort(ids, kind="stable")
        ids, half = ids[order], np.ascontiguousarray(np.asarray(vectors)[order], dtype=np.float16)
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(ids)], strict=True):
            data = half[lo:hi].tobytes()
            offset, done = int(ids[lo]) * self.row, 0
            while done < len(data):  # pwrite may write less than asked
                done += os.pwrite(self.fd, data[done:], offset + done)

    def sync(self) -> None:
        """Make the rows written so far durable (before the FAISS file that needs them is published)."""
        os.fsync(self.fd)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), dim): the rows of `ids`, NaN rows where the file has none (or not a unit vector)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) >= 2 * READ_PART:
            size = max(READ_PART, -(-len(ids) // READ_THREADS))
            parts = [ids[s : s + size] for s in range(0, len(ids), size)]
            raw = b"".join(shared_pool("ruclip-vector-file", READ_THREADS).map(self._rows, parts))
        else:
            raw = self._rows(ids)
        out = np.frombuffer(raw, dtype=np.float16).reshape(len(ids), self.dim).astype(np.float32)
        norms = np.einsum("nd,nd->n", out, out)
        out[~(np.abs(norms - 1.0) <= NORM_SLACK)] = np.nan  # zeros (never written), torn or foreign rows
        return out

    def _rows(self, ids: np.ndarray) -> bytes:
        """The raw rows of `ids`, zeros past the file's end."""
        parts = []
        for i in ids.tolist():
            row = os.pread(self.fd, self.row, i * self.row) if i >= 0 else b""
            parts.append(row if len(row) == self.row else row.ljust(self.row, b"\0"))
        return b"".join(parts)

    def close(self) -> None:
        """Close the file (also when the object is collected)."""
        self._closer()
