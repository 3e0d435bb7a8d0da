"""Synthetic CLIP-like embeddings for the benchmarks: harder than isotropic noise around a few centres.

    from synth import Synth
    s = Synth(dim=768, n=10_000_000)
    for start, vecs in s.images(0, 10_000_000):   # chunks, deterministic per chunk
        ...
    queries = s.text_queries(500)                  # held out: never copies of indexed vectors

What makes it like real CLIP image embeddings (and hard for ANN indexes):
- a common mean direction (CLIP image embeddings sit in a narrow cone: random pairs have cosine ~0.3-0.5);
- an anisotropic spectrum: cluster centres and within-cluster noise both follow a power law over a random
  orthonormal basis (a few directions carry most of the variance, a long tail the rest), not isotropic noise;
- many clusters (one per ~500 images) of log-normal sizes and spreads that vary by 3x.
Text-like queries cross CLIP's modality gap: a text mean direction (nearly orthogonal to the image cone),
a topic (a cluster's direction) and text noise. Their best cosine to any image is ~0.2-0.35, far below the
image-image similarity of neighbours, so an index tuned with copies of indexed vectors as queries
overestimates its recall on them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 100_000


class Synth:
    """A seeded generator of image embeddings and text-like queries (float32, L2-normalised rows)."""

    def __init__(self, dim: int = 768, n: int = 1_000_000, seed: int = 0, per_cluster: int = 500,
                 alpha: float = 0.5) -> None:  # fmt: skip
        rng = np.random.default_rng(seed)
        self.dim, self.seed = dim, seed
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.basis = q.astype(np.float32)  # rows: the spectrum's directions
        scale = (1.0 + np.arange(dim)) ** -alpha
        self.scale = (scale / np.sqrt((scale**2).sum())).astype(np.float32)  # unit expected norm
        self.k = max(64, n // per_cluster)
        self.mean_img = self.basis[0]  # the image cone's axis
        gap = rng.standard_normal(dim).astype(np.float32)
        gap -= (gap @ self.mean_img) * self.mean_img
        self.mean_txt = (gap / np.linalg.norm(gap)).astype(np.float32)  # the text cone's axis, ~orthogonal
        topics = self._colored(rng, self.k)
        self.centres = _unit(1.0 * self.mean_img + topics)  # (k, dim)
        w = rng.lognormal(0.0, 1.0, self.k)
        self.cluster_p = w / w.sum()
        self.spread = rng.uniform(0.45, 1.35, self.k).astype(np.float32)  # noise norm relative to the centre

    def _colored(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """(m, dim) Gaussian vectors with the power-law spectrum over the random basis (expected norm 1)."""
        z = rng.standard_normal((m, self.dim), dtype=np.float32) * self.scale
        return z @ self.basis

    def image_chunk(self, start: int, m: int) -> np.ndarray:
        """Images start..start+m-1 (start a multiple of CHUNK: chunks are seeded by their number)."""
        rng = np.random.default_rng([self.seed, 1, start // CHUNK])
        c = rng.choice(self.k, size=m, p=self.cluster_p)
        x = self.centres[c] + self._colored(rng, m) * self.spread[c, None]
        return _unit(x)

    def images(self, start: int, stop: int, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, vectors) chunks of images start..stop-1."""
        for s in range(start, stop, chunk):
            yield s, self.image_chunk(s, min(chunk, stop - s))

    def text_queries(self, m: int, seed: int = 7) -> np.ndarray:
        """`m` text-like queries: text cone axis + a topic (a cluster direction) + text noise."""
        rng = np.random.default_rng([self.seed, 2, seed])
        c = rng.choice(self.k, size=m, p=self.cluster_p)
        topic = self.centres[c] - (self.centres[c] @ self.mean_img)[:, None] * self.mean_img
        noise = rng.standard_normal((m, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        q = 0.9 * self.mean_txt + 0.12 * self.mean_img + 0.3 * _unit(topic) + 0.55 * noise
        return _unit(q)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the exact top-k by inner product (a chunk's part of a streamed ground truth)."""
    s = queries @ vectors.T
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)


class TopK:
    """Running exact top-k of fixed queries over streamed chunks of (ids, vectors)."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        s, rows = exact_top(vectors, self.q, self.k)
        scores = np.hstack([self.scores, s])
        allids = np.hstack([self.ids, ids[rows]])
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores, self.ids = np.take_along_axis(scores, order, 1), np.take_along_axis(allids, order, 1)


def stats(vectors: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """How CLIP-like a sample is: neighbour and random-pair cosines, queries' best cosines, spectrum share."""
    rng = np.random.default_rng(0)
    sub = vectors[rng.choice(len(vectors), size=min(len(vectors), 2000), replace=False)]
    sim = sub @ vectors.T
    nn = np.sort(sim, axis=1)[:, -2]  # best other than itself
    pairs = (sub[:1000] * sub[1000:2000]).sum(1) if len(sub) >= 2000 else np.zeros(1)
    top = (queries @ vectors.T).max(1)
    ev = np.linalg.svd(vectors[:20000] - vectors[:20000].mean(0), compute_uv=False) ** 2
    return {
        "image_nn_cos_median": float(np.median(nn)),
        "image_pair_cos_median": float(np.median(pairs)),
        "query_best_cos_median": float(np.median(top)),
        "query_best_cos_max": float(top.max()),
        "variance_top_10pct_dims": float(ev[: len(ev) // 10].sum() / ev.sum()),
    }


if __name__ == "__main__":
    s = Synth(n=200_000)
    v = np.vstack([c for _, c in s.images(0, 200_000)])
    print(stats(v, s.text_queries(200)))
