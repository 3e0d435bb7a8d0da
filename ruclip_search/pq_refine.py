"""A finer in-memory code for IVF-PQ candidates: 8-bit PQ of what the 4-bit FastScan code leaves out.

IVF-PQ at 10M scans short 4-bit codes (fast SIMD scan), then re-ranks its best candidates exactly on the stored
float16 vectors, which at that size are mostly read from disk (~0.1 ms a row). Text-like queries' top scores lie
within a few thousandths, so the short codes alone needed ~640 rows read per query. This second code, indexed by
image id, encodes each vector's residual after the FastScan code (x - decode(code)); a candidate's refined score
is the FastScan score plus the query's inner product with that residual (one table lookup per sub-quantizer), so
the true top 10 lie within the first few dozen of a thousand candidates and only those rows are read ("re-ranking
with source coding", Jegou et al. 2011). FAISS's own IndexRefine/IndexIVFPQR cannot remove ids or need
sequential ids, and the index's ids are the database's image ids: hence this small class.

It lives beside the FAISS file (`<file>.refine.npz`): `save` / `load`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ._files import replace_atomically
from .errors import StorageError

REFINE_BITS = 8
REFINE_TRAIN = 65_536  # residuals that train the 8-bit codebooks (256 centroids x 256 per sub-quantizer)


def sidecar(path: str | os.PathLike[str]) -> Path:
    """Where the refine code of the FAISS file `path` is kept."""
    return Path(os.fspath(path) + ".refine.npz")


class Refiner:
    """8-bit PQ codes of the residual of each vector after the scan index's PQ code, by image id."""

    def __init__(self, scan_pq: Any, pq: Any, codes: np.ndarray | None = None) -> None:
        self.scan_pq, self.pq = scan_pq, pq
        self.m, self.dim = int(pq.M), int(pq.d)
        self.codes = codes if codes is not None else np.zeros((0, self.m), dtype=np.uint8)
        self._centroids: np.ndarray | None = None

    @classmethod
    def train(cls, scan_pq: Any, m: int, sample: np.ndarray, seed: int = 0) -> Refiner:
        """Codebooks for `m` 8-bit sub-quantizers, trained on the residuals of `sample` after `scan_pq`."""
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if len(sample) > REFINE_TRAIN:
            rows = np.sort(np.random.default_rng(seed).choice(len(sample), REFINE_TRAIN, replace=False))
            sample = sample[rows]
        pq = faiss.ProductQuantizer(sample.shape[1], m, REFINE_BITS)
        pq.train(np.ascontiguousarray(_residual(scan_pq, sample)))
        return cls(scan_pq, pq)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Encode `vectors` under their `ids` (the array grows to the largest id; replaced ids are overwritten)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("refine codes need non-negative ids")
        top = int(ids.max()) + 1
        if top > len(self.codes):  # grow by a quarter at least: adds come in chunks
            grown = np.zeros((max(top, len(self.codes) + len(self.codes) // 4), self.m), dtype=np.uint8)
            grown[: len(self.codes)] = self.codes
            self.codes = grown
        for s in range(0, len(ids), 50_000):
            x = np.ascontiguousarray(vectors[s : s + 50_000], dtype=np.float32)
            self.codes[ids[s : s + 50_000]] = self.pq.compute_codes(np.ascontiguousarray(_residual(self.scan_pq, x)))

    def scores(self, query: np.ndarray, ids: np.ndarray, approx: np.ndarray) -> np.ndarray:
        """Refined inner products of one `query` with candidate `ids` whose scan-code scores are `approx`
        (-inf for -1 ids and ids never encoded)."""
        if self._centroids is None:
            self._centroids = faiss.vector_to_array(self.pq.centroids).reshape(self.m, 1 << REFINE_BITS, -1)
        lut = np.einsum("msd,md->ms", self._centroids, np.asarray(query, dtype=np.float32).reshape(self.m, -1))
        known = (ids >= 0) & (ids < len(self.codes))
        out = np.full(len(ids), -np.inf, dtype=np.float32)
        if known.any():
            codes = self.codes[ids[known]]
            out[known] = approx[known] + lut[np.arange(self.m)[None, :], codes].sum(axis=1)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the codebooks and codes beside the FAISS file `path` (temp file, fsync, rename)."""

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, centroids=faiss.vector_to_array(self.pq.centroids), m=np.int64(self.m),
                         dim=np.int64(self.dim), codes=self.codes)  # fmt: skip

        return replace_atomically(sidecar(path), write)

    @classmethod
    def load(cls, path: str | os.PathLike[str], scan_pq: Any) -> Refiner | None:
        """The refine code kept beside the FAISS file `path`, or None when there is none (older files)."""
        target = sidecar(path)
        try:
            with np.load(target) as z:
                m, dim = int(z["m"]), int(z["dim"])
                centroids = np.ascontiguousarray(z["centroids"], dtype=np.float32)
                codes = np.ascontiguousarray(z["codes"], dtype=np.uint8)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # torn or foreign file
            raise StorageError(
                f"The refine code {str(target)!r} of the FAISS file is damaged ({e}): rebuild it with "
                "`ruclip-index reindex`."
            ) from None
        pq = faiss.ProductQuantizer(dim, m, REFINE_BITS)
        if centroids.size != pq.centroids.size() or codes.ndim != 2 or codes.shape[1] != m:
            raise StorageError(
                f"The refine code {str(target)!r} of the FAISS file is damaged (its sizes disagree): rebuild it "
                "with `ruclip-index reindex`."
            )
        faiss.copy_array_to_vector(centroids, pq.centroids)
        return cls(scan_pq, pq, codes)


def _residual(scan_pq: Any, x: np.ndarray) -> np.ndarray:
    """What the scan index's (non-residual) PQ code of `x` leaves out."""
    return x - scan_pq.decode(scan_pq.compute_codes(x))
