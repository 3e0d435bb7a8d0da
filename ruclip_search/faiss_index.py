"""FAISS indexes over L2-normalised embeddings (inner product = cosine), whose ids are the database's image ids.

`build` streams vectors from a `VectorSource` (the store's snapshot, or arrays): it trains on a random
sample, adds in chunks and tunes the search parameters until recall@10 against exact search reaches the bar
on *text-like* queries, so no more than one chunk of vectors is ever in memory besides the index itself.
`update` folds changes into a trained index without retraining. `save_atomic` / `load` move an index to and
from disk safely, and `search` runs queries with an optional id filter and IVF-PQ re-ranking.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from . import defaults
from ._files import replace_atomically
from ._threads import shared_pool
from .pq_refine import Refiner

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_BELOW = 50_000  # `auto` uses exact search below this many vectors
IVF_MAX = 3_000_000  # `auto` uses IVF-Flat up to this many vectors (when they fit the memory budget)
RECALL_SAMPLE = 500  # text-like queries used to measure recall@10: 250 of each kind, so their recall is within
# ~0.005 (one standard error) of other such queries'
MIN_RECALL = 0.95
TUNE_MARGIN = 0.01  # tuning aims this far above the bar: about two standard errors of RECALL_SAMPLE's recall (at
# 10M, four sets of 500 such queries gave 0.958-0.966 at one setting, where held-out queries gave 0.962)
SINGLE_THREAD_BELOW = 8  # query batches up to this size search on one thread (per part of the lists: SCAN_PARTS)
SCAN_PARTS = max(1, min(4, os.cpu_count() or 1))  # a few queries' IVF scan: parts of the probed lists scanned at once
SCAN_PART_MIN_LISTS = 16  # ... of at least this many lists each (shorter scans: the threads cost more than they save)
TRAIN_PER_LIST = 40  # k-means training vectors per IVF list
MIN_ANN = 1000  # below this many vectors an IVF/IVF-PQ request builds an exact flat index instead
RETRAIN_GROWTH = 4.0  # an IVF index is retrained once the collection has grown past this many times its training
RERANK_STEPS = (20, 40, 80, 160, 320, 640, 1000)  # IVF-PQ candidates re-ranked on the stored vectors (tried)
REFINED_STEPS = (10, 15, 20, 30, 40, 60, 80, 120, 160, 240, 320)  # the same, after the in-memory refine code
FETCH_NS = 25_000  # re-ranking one candidate: its row read from the vector file and scored (10M, not in the page
# cache: 160 rows in ~4 ms, 16 reads at a time; bench_scale.py)
REFINE_DEPTH = 1000  # IVF-PQ candidates whose scores the in-memory refine code corrects (see pq_refine)
REFINE_NS = 600  # refining one candidate: a table lookup per 8-bit sub-quantizer
REFINE_DIMS_PER_CODE = 16  # dimensions per 8-bit refine sub-quantizer (48 bytes for 768-d: 0.5 GB at 10M)
SCAN_NS_PER_BYTE = {4: 0.075, 8: 0.3}  # scanning one byte of PQ code, by bits per sub-quantizer: 4-bit FastScan
# (SIMD) scanned 885k 192-byte codes in ~12.9 ms on 2 cores (10M, bench_scale.py); 8-bit: 4x that, as before
PQ_NBITS = 4  # IVF-PQ codes: 4-bit sub-quantizers scanned with SIMD (FastScan), several times faster than 8-bit
PQ_DIMS_PER_CODE = 2  # dimensions per 4-bit sub-quantizer (192 bytes for 768-d): text-like queries' top scores
# lie within a few hundredths, so 48-byte codes needed 1,000 re-ranked rows for recall 0.9 (tune_pq.py), and
# 64-byte codes lost a quarter of the true top 10 beyond the first 1,000 candidates (1M, CLIP-like synth data)
MAX_IVFPQ_LISTS = 8192  # at 10M, 2,048 lists needed 1/8 of them probed for the bar (44 ms); 8,192 needed 1/11
# (16-18 ms). Flat k-means and exact assignment stay affordable: 100k 768-d vectors to 8,192 lists in 8.6 s on 2
# cores (BLAS), a 10M build in ~35 min
TOPICS = 20_000  # stored vectors that text-like queries take their topics from (see _topics)
PROBE_QUERIES = 100  # held-out text-like queries whose exact top-10 an IVF index keeps: folds measure its recall
PROBE_MIN = 30  # a fold measures recall only while this many of them still have a known exact top-10
KMEANS_ITERATIONS = 10  # IVF centroids: FAISS's default 25 costs 2.5x the time for no recall once nprobe is tuned


log = logging.getLogger(__name__)

# IVF-PQ re-ranking depth, refine depth and refine code per loaded index (FAISS objects take no new attributes;
# dropped with the index)
_RERANK: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_REFINE_DEPTH: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_REFINER: weakref.WeakKeyDictionary[Any, Refiner] = weakref.WeakKeyDictionary()


def rerank_depth(index: faiss.Index) -> int:
    """How many IVF-PQ candidates `search` re-ranks on the stored vectors for `index` (0: none)."""
    return _RERANK.get(index, 0)


def refiner_of(index: faiss.Index) -> Refiner | None:
    """The in-memory refine code of an IVF-PQ `index` (built or loaded with one), else None."""
    return _REFINER.get(index)


class VectorSource(Protocol):
    """Where a build reads vectors: all of them in id-ordered chunks, a random sample, and some by id."""

    count: int
    dim: int

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...  # (ids int64, vectors float32) in id order

    def sample(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]: ...

    def fetch(self, ids: np.ndarray) -> np.ndarray: ...  # float32 (len(ids), dim), NaN rows for unknown ids


class ArraySource:
    """A VectorSource over in-memory arrays (tests, benchmarks, small indexes)."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, chunk: int = 50_000) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.count, self.dim = self.vectors.shape
        self.chunk = chunk
        self._rows: dict[int, int] | None = None

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, self.count, self.chunk):
            yield self.ids[s : s + self.chunk], self.vectors[s : s + self.chunk]

    def sample(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if count >= self.count:
            return self.ids, self.vectors
        rows = np.sort(np.random.default_rng(seed).choice(self.count, size=count, replace=False))
        return self.ids[rows], self.vectors[rows]

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        if self._rows is None:
            self._rows = {int(i): r for r, i in enumerate(self.ids)}
        out = np.full((len(ids), self.dim), np.nan, dtype=np.float32)
        for j, i in enumerate(ids):
            r = self._rows.get(int(i))
            if r is not None:
                out[j] = self.vectors[r]
        return out


def parse_bytes(text: str | int) -> int:
    """'4G', '500M', '2.5GB', '1024' -> bytes (powers of 1024); ValueError for anything else."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 4G, 500M or 2.5GB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def exact_knn(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the exact top-k by inner product (ground truth for recall)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)[1]


class _TopK:
    """Running exact top-k ids of fixed queries over streamed chunks (the ground truth a build tunes against)."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0 or len(self.q) == 0:
            return
        scores, rows = faiss.knn(self.q, vectors, min(self.k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.hstack([self.scores, scores])
        found = np.hstack([self.ids, ids[rows]])
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores, self.ids = np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)


def text_like_queries(topics: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Queries that sit where text queries do, far from every image vector (best cosine about 0.2-0.4), in two
    kinds that alternate by row (even, odd), since each is hard for other indexes (tuning asks the bar of both):
    - near a topic direction (an IVF centroid), weight 0.25-0.5, plus isotropic noise of norm 1;
    - across CLIP's modality gap: mostly along one text axis (orthogonal to the images' mean direction) shared
      by all of them, with a topic (a centroid's deviation from the images' mean) and noise. On CLIP-like data
      the first kind alone was easier: tuned to 0.965 on it, IVF-PQ gave 0.95 on these (tune_pq.py, 1M).
    Tuning on them meets the bar for real queries, not only for copies of indexed vectors (much easier)."""
    rng = np.random.default_rng(seed)
    dim = topics.shape[1]
    unit = topics / np.maximum(np.linalg.norm(topics, axis=1, keepdims=True), 1e-12)
    weight = rng.uniform(0.25, 0.5, size=(n, 1))
    near = unit[rng.integers(len(unit), size=n)] * weight + rng.normal(scale=1.0 / math.sqrt(dim), size=(n, dim))
    axis = unit.mean(axis=0)
    axis /= max(float(np.linalg.norm(axis)), 1e-12)
    own = unit - (unit @ axis)[:, None] * axis
    own /= np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-12)
    gap = np.random.default_rng(0).normal(size=dim)  # one text axis for every seed, as all text queries share one
    gap -= (gap @ axis) * axis
    gap /= max(float(np.linalg.norm(gap)), 1e-12)
    noise = rng.normal(scale=1.0 / math.sqrt(dim), size=(n, dim))
    across = 0.9 * gap + 0.12 * axis + 0.3 * own[rng.integers(len(unit), size=n)] + 0.55 * noise
    q = np.where((np.arange(n) % 2 == 0)[:, None], near, across)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _topics(sample: np.ndarray, seed: int) -> np.ndarray:
    """Topic directions for text-like queries: up to TOPICS of the sampled stored vectors themselves.

    Not the IVF centroids (as before): a query aimed at a centroid finds its neighbours in that list, so with
    8,192 lists at 10M such queries reached the bar at 362 lists where bench_scale.py's held-out queries (topics:
    its generator's cluster centres) needed 724. Stored images as topics do not depend on the lists, follow the
    library's density (what people photograph is what they search for), and needed at least as many lists as
    the held-out queries at every setting measured (256-1,448 of 8,192 lists, 80-480 rows)."""
    if len(sample) <= TOPICS:
        return np.ascontiguousarray(sample, dtype=np.float32)
    pick = np.random.default_rng(seed).choice(len(sample), size=TOPICS, replace=False)
    return np.ascontiguousarray(sample[np.sort(pick)], dtype=np.float32)


def _legacy_topics(index: faiss.Index) -> np.ndarray:
    """The IVF centroids: the topics of the kept probe queries of indexes built before those were stored."""
    ivf = _ivf_of(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _pack(queries: np.ndarray) -> str:
    """Queries as base64 float16 (kept with an index's probe: 150 KB for 100 x 768)."""
    return base64.b64encode(np.ascontiguousarray(queries, dtype=np.float16).tobytes()).decode("ascii")


def _unpack(text: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float16).reshape(-1, dim).astype(np.float32)


def recall_at_k(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, k: int = 10, seed: int = 0,
                fetch: Callable[[np.ndarray], np.ndarray] | None = None) -> float:  # fmt: skip
    """Mean recall@k of `index` against exact search over (vectors, ids), with text-like queries (`seed`)."""
    n = len(vectors)
    if n == 0:
        return 1.0
    k = min(k, n)
    topics = _topics(vectors[np.random.default_rng(seed).choice(n, size=min(n, TOPICS), replace=False)], seed)
    queries = text_like_queries(topics, RECALL_SAMPLE, seed)
    truth = ids[exact_knn(vectors, queries, k)]
    found = search(index, queries, k, fetch=fetch)[1]
    return _recall(found, truth)


def _recall(found: np.ndarray, truth: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Recall@k of text-like queries: the lower of its two kinds' (even and odd `rows` of text_like_queries)."""
    k = truth.shape[1]
    kind = (np.arange(len(truth)) if rows is None else np.asarray(rows)) % 2
    hits = np.array([len(set(t.tolist()) & set(f[:k].tolist())) for t, f in zip(truth, found, strict=True)])
    return min((float(hits[kind == c].sum()) / (int((kind == c).sum()) * k) for c in (0, 1) if (kind == c).any()),
               default=1.0)  # fmt: skip


def _ivf_of(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index: faiss.Index) -> Any:
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return inner if hasattr(inner, "hnsw") else None


def _pq_of(index: faiss.Index) -> Any:
    """The IVF-PQ index inside `index` (FastScan, or the 8-bit IndexIVFPQ of older indexes), or None."""
    ivf = _ivf_of(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    return ivf if isinstance(ivf, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)) else None


@dataclass(frozen=True)
class Plan:
    """What `build` makes: the type and its sizes (nlist for IVF, m sub-quantizers for IVF-PQ)."""

    kind: str
    nlist: int = 0
    m: int = 0
    nbits: int = PQ_NBITS
    refine: int = 0  # 8-bit sub-quantizers of the in-memory refine code (IVF-PQ; 0: none)

    def memory(self, n: int, dim: int) -> int:
        """Bytes the index holds in memory for `n` vectors."""
        if self.kind == "ivfpq":
            return n * (self.m * self.nbits // 8 + 8 + self.refine) + self.nlist * dim * 4
        if self.kind == "hnsw":
            return n * (dim * 4 + 32 * 2 * 4 + 8)
        return n * (dim * 4 + 8) + self.nlist * dim * 4


def _pq_m(dim: int, n: int, budget: int) -> tuple[int, int]:
    """(4-bit scan sub-quantizers, 8-bit refine sub-quantizers) for IVF-PQ: one per PQ_DIMS_PER_CODE and per
    REFINE_DIMS_PER_CODE dimensions (192 + 48 bytes for 768-d, so that a few dozen re-ranked rows reach the
    recall bar); when they would not fit the budget the refine code shrinks first (to none), then the scan code.
    FastScan needs an even count."""
    divisors = [m for m in range(2, dim + 1, 2) if dim % m == 0] or [dim]
    m = max([d for d in divisors if d <= max(2, dim // PQ_DIMS_PER_CODE)] or [divisors[0]])
    fine = [d for d in range(1, dim + 1) if dim % d == 0 and dim // d <= 4 * REFINE_DIMS_PER_CODE]
    r = max([d for d in fine if d <= max(1, dim // REFINE_DIMS_PER_CODE)] or [0])
    while r and n * (m * PQ_NBITS // 8 + 8 + r) > budget:
        r = max([d for d in fine if d < r] or [0])
    while n * (m * PQ_NBITS // 8 + 8) > budget and m > divisors[0]:
        m = max(d for d in divisors if d < m)
    return m, r


def plan(n: int, dim: int, kind: str = "auto", *, memory_budget: int | None = None, flat_below: int | None = None,
         min_ann: int | None = None) -> Plan:  # fmt: skip
    """The index `build` makes for `n` vectors of `dim`: `auto` is exact below FLAT_BELOW, IVF-Flat up to IVF_MAX
    while the vectors fit `memory_budget` (default defaults.MEMORY_BUDGET), IVF-PQ beyond."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index type {kind!r}: use one of {', '.join(INDEX_KINDS)}")
    budget = defaults.MEMORY_BUDGET if memory_budget is None else memory_budget
    if kind == "auto":
        kind = choose_kind(n, flat_below, dim=dim, memory_budget=budget)
    if kind in ("ivf", "ivfpq") and n < (MIN_ANN if min_ann is None else min_ann):
        kind = "flat"  # too few vectors to train centroids: exact search is better and instant
    if kind == "ivf":
        return Plan("ivf", nlist=max(1, min(int(4 * math.sqrt(n)), n // 39)))
    if kind == "ivfpq":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39, MAX_IVFPQ_LISTS))
        m, refine = _pq_m(dim, n, budget)
        return Plan("ivfpq", nlist=nlist, m=m, refine=refine)
    return Plan(kind)


def choose_kind(n: int, flat_below: int | None = None, *, dim: int = 768, memory_budget: int | None = None) -> str:
    """`auto`: exact flat search for small collections, IVF-Flat (tuned for recall) up to a few million vectors
    while they fit the memory budget, IVF-PQ with re-ranking beyond."""
    if n < (FLAT_BELOW if flat_below is None else flat_below):
        return "flat"
    budget = defaults.MEMORY_BUDGET if memory_budget is None else memory_budget
    if n <= IVF_MAX and Plan("ivf", nlist=int(4 * math.sqrt(n))).memory(n, dim) <= budget:
        return "ivf"
    return "ivfpq"


def _empty_index(p: Plan, dim: int) -> faiss.Index:
    metric = faiss.METRIC_INNER_PRODUCT
    if p.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if p.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, 32, metric)
        hnsw.hnsw.efConstruction = 80
        return faiss.IndexIDMap2(hnsw)
    quantizer = faiss.IndexFlatIP(dim)
    if p.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, p.nlist, metric)
    else:
        # Inner product for the lists too: L2 lists (which would let FastScan code residuals) lose text-like
        # queries' neighbours, since a query far from every image is nearest to the loosest clusters' centroids
        index = faiss.IndexIVFPQFastScan(quantizer, dim, p.nlist, p.m, p.nbits, metric)
    index.cp.niter = KMEANS_ITERATIONS
    index.own_fields = True
    quantizer.this.disown()
    return index


def _train_size(p: Plan, n: int) -> int:
    if p.kind == "ivf":
        return TRAIN_PER_LIST * p.nlist
    if p.kind == "ivfpq":
        return max(TRAIN_PER_LIST * p.nlist, 256 * 39)  # PQ codebooks need ~39 vectors per code too
    return 20_000  # flat / HNSW: only the text-like queries' topics come from the sample


def _train(index: faiss.Index, sample: np.ndarray) -> None:
    """Train the IVF centroids (and PQ codebooks), on the GPU when the GPU build of FAISS sees one."""
    if index.is_trained:
        return
    try:
        gpu = faiss.get_num_gpus() > 0
    except AttributeError:  # CPU-only build
        gpu = False
    ivf = _ivf_of(index)
    if gpu and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(index.d))
    index.train(sample)


def build(
    source: VectorSource,
    kind: str = "auto",
    *,
    min_recall: float = MIN_RECALL,
    memory_budget: int | None = None,
    flat_below: int | None = None,
    min_ann: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build an index over everything `source` holds; returns it and its info {type, n, dim, recall_at_10,
    params, trained_n}. `keep(ids, vectors)` gets every chunk when the index re-ranks its candidates on the
    stored vectors (IVF-PQ): the caller keeps them where they read fast (vector_file).

    Streams: a random sample (TRAIN_PER_LIST per IVF list) trains it, then the vectors are added one chunk at
    a time while the exact top-10 of RECALL_SAMPLE text-like queries is gathered from the same chunks; ANN
    types are then tuned until their recall@10 on those queries reaches `min_recall` + TUNE_MARGIN (or cannot
    go higher).
    """
    n, dim = int(source.count), int(source.dim)
    p = plan(n, dim, kind, memory_budget=memory_budget, flat_below=flat_below, min_ann=min_ann)
    log.info("building %s over %d vectors of %d dimensions", p, n, dim)
    t0 = time.perf_counter()
    index = _empty_index(p, dim)
    sample = np.zeros((0, dim), np.float32)
    if p.kind != "flat" and n:
        sample = np.ascontiguousarray(source.sample(min(n, _train_size(p, n)), seed=0)[1], dtype=np.float32)
        log.info("sampled %d vectors in %.1f s", len(sample), time.perf_counter() - t0)
    refiner = None
    if p.kind in ("ivf", "ivfpq") and n:
        _train(index, sample)
        if p.refine and _pq_of(index) is not None:
            refiner = Refiner.train(_pq_of(index).pq, p.refine, sample)
            _REFINER[index] = refiner
        log.info("trained in %.1f s", time.perf_counter() - t0)
    truth = probe = None
    if p.kind != "flat" and n:
        topics = _topics(sample, 0)
        truth = _TopK(text_like_queries(topics, RECALL_SAMPLE), min(10, n))
        if p.kind in ("ivf", "ivfpq"):  # other queries than tuning's, kept with the index (see fold_probe)
            held = text_like_queries(topics, PROBE_QUERIES, seed=1).astype(np.float16).astype(np.float32)
            probe = _TopK(held, min(10, n))  # (as kept: float16)
    del sample
    added = 0
    for ids, vectors in source.chunks():
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        index.add_with_ids(vectors, ids)
        if keep is not None and p.kind == "ivfpq":
            keep(ids, vectors)
        if refiner is not None:
            refiner.add(ids, vectors)
        for top in (truth, probe):
            if top is not None:
                top.add(ids, vectors)
        added += len(ids)
        if progress is not None:
            progress(added, n)
        if added % 1_000_000 < len(ids):
            log.info("added %d in %.1f s", added, time.perf_counter() - t0)
    recall, params = 1.0, {}
    if truth is not None:
        recall, params = _tune(index, truth.q, truth.ids, min(1.0, min_recall + TUNE_MARGIN), source.fetch)
        log.info("tuned in %.1f s: recall@10 %.4f at %s", time.perf_counter() - t0, recall, params)
    info = {"type": p.kind, "n": int(index.ntotal), "dim": dim, "recall_at_10": round(float(recall), 4),
            "params": params, "trained_n": int(index.ntotal)}  # fmt: skip
    if probe is not None:
        found = search(index, probe.q, probe.k, fetch=source.fetch)[1]
        info["probe_recall"] = round(_recall(found, probe.ids), 4)
        info["recall_probe"] = {"seed": 1, "queries": _pack(probe.q), "ids": probe.ids.tolist(),
                                "scores": probe.scores.tolist(), "valid": [True] * len(probe.q)}  # fmt: skip
        log.info("held-out recall@10 %.4f", info["probe_recall"])
    return index, info


def build_faiss(
    vectors: np.ndarray,
    ids: np.ndarray,
    kind: str = "auto",
    *,
    min_recall: float = MIN_RECALL,
    flat_below: int | None = None,
    min_ann: int | None = None,
    memory_budget: int | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """`build` over in-memory arrays. `flat_below` / `min_ann` override FLAT_BELOW / MIN_ANN (tests build ANN
    indexes from a few thousand vectors)."""
    return build(ArraySource(vectors, ids), kind, min_recall=min_recall, memory_budget=memory_budget,
                 flat_below=flat_below, min_ann=min_ann)  # fmt: skip


def _tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, target: float,
          fetch: Callable[[np.ndarray], np.ndarray] | None) -> tuple[float, dict]:  # fmt: skip
    """Cheapest nprobe (IVF; and re-ranking depth, IVF-PQ) or efSearch (HNSW) whose recall@10 on the text-like
    `queries` reaches `target`; returns (recall, params)."""
    k = truth.shape[1]
    ivf, hnsw = _ivf_of(index), _hnsw_of(index)
    if _pq_of(index) is not None and fetch is not None:
        return _tune_pq(index, _pq_of(index), queries, truth, target, fetch)
    if ivf is not None:
        nprobe, best = 1, None
        while True:
            ivf.nprobe = nprobe
            recall = _recall(search(index, queries, k)[1], truth)
            if recall >= target or nprobe >= ivf.nlist:
                best = (recall, nprobe)
                break
            nprobe = min(nprobe * 2, ivf.nlist)
        lo = nprobe // 2 + 1  # the doubling overshot: the smallest sufficient nprobe lies above nprobe / 2
        if best[0] >= target:
            while lo < best[1]:
                mid = (lo + best[1]) // 2
                ivf.nprobe = mid
                recall = _recall(search(index, queries, k)[1], truth)
                if recall >= target:
                    best = (recall, mid)
                else:
                    lo = mid + 1
        ivf.nprobe = best[1]
        return best[0], {"nprobe": best[1], "nlist": int(ivf.nlist)}
    if hnsw is not None:
        ef = 16
        while True:
            hnsw.hnsw.efSearch = ef
            recall = _recall(search(index, queries, k)[1], truth)
            if recall >= target or ef >= 4096:
                return recall, {"efSearch": ef}
            ef *= 2
    return _recall(search(index, queries, k)[1], truth), {}


def _rerank(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of candidate `ids` (Q, R) by exact inner product with their `vectors` (Q, R, D); NaN rows (unknown
    ids) and -1 ids drop out. Ties go to the smaller id, as in exact search."""
    scores = np.einsum("qd,qrd->qr", queries, vectors)
    scores = np.where(np.isnan(scores) | (ids < 0), -np.inf, scores).astype(np.float32)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    top_s, top_i = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    top_i = np.where(np.isfinite(top_s), top_i, -1)
    top_s = np.where(np.isfinite(top_s), top_s, -np.inf).astype(np.float32)
    return top_s, top_i


def _fetch_rows(fetch: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, dim: int) -> np.ndarray:
    """(Q, R, D) stored vectors of candidate ids (Q, R), each distinct id read once."""
    flat = ids.reshape(-1)
    uniq, inverse = np.unique(flat, return_inverse=True)
    vecs = np.full((len(uniq), dim), np.nan, dtype=np.float32)
    known = uniq >= 0
    if known.any():
        vecs[known] = fetch(uniq[known])
    return vecs[inverse].reshape(ids.shape[0], ids.shape[1], dim)


def _tune_pq(index: faiss.Index, ivf: Any, queries: np.ndarray, truth: np.ndarray, target: float,
             fetch: Callable[[np.ndarray], np.ndarray]) -> tuple[float, dict]:  # fmt: skip
    """IVF-PQ: for nprobe = nlist/64, times sqrt(2) each step, the recall of re-ranking the top R PQ candidates
    for each R in RERANK_STEPS; the cheapest sufficient (nprobe, R) by the time of scanning codes and reading R
    rows. No headroom on top: queries with stored images as topics (_topics) needed at least as many lists and
    rows as other text-like queries at every setting measured at 10M.

    Text-like queries never reach the bar at 1/64 of the lists, so the search starts there; stored vectors
    are read once (cached across steps) and only as deep as the R being tried: at 10M they come from disk."""
    k = truth.shape[1]
    n, nlist = max(1, index.ntotal), int(ivf.nlist)
    refiner = refiner_of(index)
    steps = REFINED_STEPS if refiner is not None else RERANK_STEPS
    depth = min(REFINE_DEPTH if refiner is not None else RERANK_STEPS[-1], n)
    scan_ns = ivf.code_size * SCAN_NS_PER_BYTE.get(int(ivf.pq.nbits), 1.0)
    refine_ns = REFINE_NS * depth if refiner is not None else 0
    cache: dict[int, np.ndarray] = {}

    def rows(ids: np.ndarray) -> np.ndarray:  # (Q, R) candidate ids -> (Q, R, D) stored vectors
        want = [i for i in np.unique(ids[ids >= 0]).tolist() if i not in cache]
        if want:
            got = fetch(np.array(want, dtype=np.int64)).astype(np.float16)
            cache.update(zip(want, got, strict=True))
        nan = np.full(index.d, np.nan, dtype=np.float16)
        flat = np.stack([cache.get(i, nan) for i in ids.reshape(-1).tolist()])
        return flat.astype(np.float32).reshape(ids.shape[0], ids.shape[1], index.d)

    options: list[tuple[float, float, int, int]] = []  # (cost, recall, nprobe, R)
    fallback = (0.0, 1, depth)
    nprobe, after = max(1, nlist // 64), 0
    while True:
        ivf.nprobe = nprobe
        approx, cand = _search_plain(index, queries, depth)
        if refiner is not None:
            cand = _refined(refiner, queries, approx, cand, depth)
        for r in [s for s in steps if s < depth] + [depth]:
            recall = _recall(_rerank(queries, cand[:, :r], rows(cand[:, :r]), k)[1], truth)
            if recall > fallback[0]:
                fallback = (recall, nprobe, r)
            if recall >= target:
                options.append((nprobe * n / nlist * scan_ns + refine_ns + FETCH_NS * r, recall, nprobe, r))
                break
        log.info("nprobe %d: best recall@10 %.4f", nprobe, max(fallback[0], options[-1][1] if options else 0))
        after += bool(options)
        if after >= 2 or nprobe >= nlist:  # one more step after the first sufficient setting
            break
        nprobe = _next_nprobe(nprobe, nlist)
    if options:
        _, recall, nprobe, r = min(options)
    else:
        recall, nprobe, r = fallback
    ivf.nprobe = nprobe
    _RERANK[index] = r
    if refiner is None:
        return recall, {"nprobe": nprobe, "nlist": nlist, "rerank": r}
    _REFINE_DEPTH[index] = depth
    return recall, {"nprobe": nprobe, "nlist": nlist, "rerank": r, "refine": depth}


def _next_nprobe(nprobe: int, nlist: int) -> int:
    """The next nprobe tuning tries: sqrt(2) times more lists, not 2: the scan costs in proportion to nprobe, and
    doubling past the least sufficient setting could scan up to twice the lists it needs."""
    return min(max(nprobe + 1, round(nprobe * math.sqrt(2))), nlist)


def _refined(refiner: Refiner, queries: np.ndarray, approx: np.ndarray, ids: np.ndarray, keep: int) -> np.ndarray:
    """The first `keep` of each query's candidate `ids` (Q, R) by their refined scores (pq_refine), best first;
    -1 where fewer."""
    out = np.full((len(ids), min(keep, ids.shape[1])), -1, dtype=np.int64)
    for j, (q, a, i) in enumerate(zip(queries, approx, ids, strict=True)):
        s = refiner.scores(q, i, a)
        order = np.argsort(-s, kind="stable")[: out.shape[1]]
        out[j] = np.where(np.isfinite(s[order]), i[order], -1)
    return out


def update(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, gone: np.ndarray) -> faiss.Index:
    """Fold changes into a built index without retraining: `gone` ids and the old vectors of `ids` removed,
    the new `vectors` of `ids` added (IVF: into the lists of the trained centroids). HNSW cannot remove:
    ValueError (rebuild it)."""
    if _hnsw_of(index) is not None:
        raise ValueError("an HNSW index cannot remove vectors: rebuild it")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    drop = np.union1d(ids, np.asarray(gone, dtype=np.int64))
    if len(drop):
        ivf = _ivf_of(index)
        before = _list_sizes(ivf) if ivf is not None else None
        index.remove_ids(faiss.IDSelectorBatch(len(drop), faiss.swig_ptr(drop)))
        if before is not None:
            _clear_block_tails(ivf, np.flatnonzero(_list_sizes(ivf) < before))
    for s in range(0, len(ids), 50_000):
        index.add_with_ids(np.ascontiguousarray(vectors[s : s + 50_000], dtype=np.float32), ids[s : s + 50_000])
    refiner = refiner_of(index)
    if refiner is not None:  # removed ids keep their stale codes: the scan no longer returns them
        refiner.add(ids, vectors)
    return index


def _list_sizes(ivf: Any) -> np.ndarray:
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def _clear_block_tails(ivf: Any, lists: np.ndarray) -> None:
    """Zero the codes past the end of `lists` in their last FastScan block, after a removal.

    FastScan packs 32 codes per block, and its add ORs the new codes' 4-bit halves into the block (FAISS 1.15,
    pq4_pack_codes_range), assuming zeros there; remove_ids leaves the removed codes past the list's new end.
    So the next add to that list stored codes that scored wrong: in tests, 22-37 % of vectors added after a
    removal found themselves; at 10M a changed photo was not found by its own vector. No FAISS call clears
    them, hence this: each stale slot set to a zero code through the lists' own packer."""
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(invlists, faiss.BlockInvertedLists) or not len(lists):
        return
    packer, per_block, block = invlists.packer, int(invlists.n_per_block), int(invlists.block_size)
    zero = np.zeros(packer.code_size, dtype=np.uint8)
    for i in lists.tolist():
        size = invlists.list_size(i)
        blocks = -(-size // per_block)
        if size % per_block == 0:
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(i), blocks * block).reshape(blocks, block)
        for slot in range(size, blocks * per_block):
            packer.pack_1(zero, slot, codes)


def fold_probe(index: faiss.Index, probe: dict[str, Any], ids: np.ndarray, vectors: np.ndarray, gone: np.ndarray,
               fetch: Callable[[np.ndarray], np.ndarray] | None) -> tuple[float | None, dict[str, Any]]:  # fmt: skip
    """After `update`: the recall@10 of `index` on its kept held-out queries (`probe`, from `build`) and the probe
    brought up to date: the exact top-10 takes the added vectors in (cheap: only they are scored); a query
    whose top-10 held a changed or removed id no longer has a known top-10 and is left out from then on.
    The recall is None once fewer than PROBE_MIN queries are left (then only growth triggers a retrain)."""
    top_ids = np.asarray(probe["ids"], dtype=np.int64).reshape(len(probe["ids"]), -1)
    if "queries" in probe:
        queries = _unpack(probe["queries"], index.d)
    else:  # kept by an older build: regenerated from its topics then, the IVF centroids
        queries = text_like_queries(_legacy_topics(index), len(top_ids), probe["seed"])
    top = _TopK(queries, top_ids.shape[1])
    top.ids, top.scores = top_ids, np.asarray(probe["scores"], dtype=np.float32).reshape(top_ids.shape)
    touched = np.union1d(np.asarray(ids, dtype=np.int64), np.asarray(gone, dtype=np.int64))
    valid = np.asarray(probe["valid"], dtype=bool) & ~np.isin(top.ids, touched).any(axis=1)
    top.add(np.asarray(ids, dtype=np.int64), np.ascontiguousarray(vectors, dtype=np.float32))
    out = {**probe, "ids": top.ids.tolist(), "scores": top.scores.tolist(), "valid": valid.tolist()}
    if valid.sum() < PROBE_MIN:
        return None, out
    found = search(index, queries[valid], top.k, fetch=fetch)[1]
    return _recall(found, top.ids[valid], np.flatnonzero(valid)), out


def needs_retrain(info_type: str | None, trained_n: int, n: int) -> bool:
    """Whether an index of `info_type` trained on `trained_n` vectors must be rebuilt to hold `n`: IVF lists
    trained on a quarter of the collection or less have grown too long (RETRAIN_GROWTH)."""
    if info_type not in ("ivf", "ivfpq"):
        return False
    return n > RETRAIN_GROWTH * max(trained_n, 1)


def apply_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set the recorded search parameters (nprobe, efSearch, IVF-PQ re-ranking depth) on a loaded index."""
    ivf, hnsw = _ivf_of(index), _hnsw_of(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
    if hnsw is not None and "efSearch" in params:
        hnsw.hnsw.efSearch = int(params["efSearch"])
    if "rerank" in params:
        _RERANK[index] = int(params["rerank"])
    if "refine" in params:
        if refiner_of(index) is not None:
            _REFINE_DEPTH[index] = int(params["refine"])
        else:  # tuned with a refine code that is missing: re-rank all the candidates it would have refined
            _RERANK[index] = max(int(params.get("rerank", 0)), int(params["refine"]))


def max_id(index: faiss.Index) -> int | None:
    """The largest id `index` holds (-1: none), read from its IVF lists or id map; None for another layout."""
    ivf = _ivf_of(index)
    if ivf is not None:
        lists, top = ivf.invlists, -1
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if size:
                ids = lists.get_ids(number)
                top = max(top, int(faiss.rev_swig_ptr(ids, size).max()))
                lists.release_ids(number, ids)
        return top
    if hasattr(index, "id_map"):
        ids = faiss.vector_to_array(index.id_map)
        return int(ids.max()) if len(ids) else -1
    return None


def recorded_max_id(meta: dict[str, str], file_name: str) -> int | None:
    """`max_id` of the FAISS file `file_name` as meta `faiss_max_id` records it ("NAME ID"), or None when meta
    records it for another file (or not at all): then no id can be ruled out of the file."""
    name, _, value = (meta.get("faiss_max_id") or "").partition(" ")
    return int(value) if name == file_name and value.lstrip("-").isdigit() else None


def save_atomic(index: faiss.Index, path: str | os.PathLike[str]) -> Path:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder (an IVF-PQ index's
    refine code first, beside it: pq_refine.sidecar)."""
    path = Path(path)
    refiner = refiner_of(index)
    if refiner is not None:  # before the FAISS file: a file that is there always has its refine code
        refiner.save(path)
    replace_atomically(path, lambda tmp: faiss.write_index(index, tmp))
    return path


def load(path: str | os.PathLike[str], *, mmap: bool = True, params: dict[str, Any] | None = None) -> faiss.Index:
    """Read an index file, memory-mapped where FAISS allows it for the type; `params` from the index's meta."""
    path = os.fspath(path)
    index = None
    if mmap:
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except (RuntimeError, AttributeError):
            index = None
    if index is None:
        index = faiss.read_index(path)
    pq = _pq_of(index)
    if pq is not None:
        refiner = Refiner.load(path, pq.pq)
        if refiner is not None:
            _REFINER[index] = refiner
    if params:
        apply_params(index, params)
    return index


def _search_params(index: faiss.Index, selector: Any, nprobe: int | None = None) -> Any:
    ivf, hnsw = _ivf_of(index), _hnsw_of(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(nprobe or ivf.nprobe))
    if hnsw is not None:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=hnsw.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def excluding(ids: np.ndarray) -> Any:
    """An id selector that passes every id except `ids` (deleted or stale vectors), for `search`."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
    selector = faiss.IDSelectorNot(batch)
    selector.referenced_objects = [batch, ids]  # the selectors hold raw pointers: keep both alive with it
    return selector


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    id_selector: Any = None,
    *,
    fetch: Callable[[np.ndarray], np.ndarray] | None = None,
    coarse: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores float32 (Q,k), ids int64 (Q,k), -1 where fewer hits) for L2-normalised queries.

    `id_selector` limits hits to some ids: a faiss.IDSelector or an array of allowed ids. `fetch` (ids ->
    stored float32 vectors, NaN rows for unknown ids) re-ranks an IVF-PQ index's top `rerank` candidates by
    their exact scores. An IVF search that finds fewer than k hits in its nprobe lists probes more lists
    (up to all) for those queries, so a page is full whenever k vectors pass the filter. `coarse`: the
    queries' nearest lists as `nearest_lists_scored` gave them, when the caller needed them too (the recent
    segment probes the same lists): the quantizer is not searched twice.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(int(k), max(index.ntotal, 1)))
    rerank = rerank_depth(index) if fetch is not None else 0
    depth = max(k, min(rerank, index.ntotal))
    refiner = refiner_of(index) if rerank else None
    if refiner is not None:  # the scan's candidates, refined in memory: only the best `rerank` are read
        depth = max(depth, min(_REFINE_DEPTH.get(index, REFINE_DEPTH), index.ntotal))
    if len(queries) > SINGLE_THREAD_BELOW:
        scores, ids = _search(index, queries, depth, id_selector, k)
    else:
        # A few queries gain nothing from threads, and FAISS's OpenMP threads keep spinning after a parallel
        # search, stealing a core from the text encoder of the next query (one query: 56 -> 70 ms on 2 cores).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, ids = _search(index, queries, depth, id_selector, k, coarse)
        finally:
            faiss.omp_set_num_threads(threads)
    if refiner is not None:
        ids = _refined(refiner, queries, scores, ids, max(rerank, k))
    if rerank:
        scores, ids = _rerank(queries, ids, _fetch_rows(fetch, ids, index.d), k)
    return scores[:, :k], ids[:, :k]


def nearest_lists(ivf: Any, vectors: np.ndarray, n: int) -> np.ndarray:
    """int64 (len(vectors), n): the `n` IVF lists nearest each vector, as `ivf`'s quantizer ranks them (what a
    search probes, n = nprobe; where an add puts it, n = 1). On this thread alone (see `search`)."""
    vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return nearest_lists_scored(ivf.quantizer, vectors, n)[1]
    finally:
        faiss.omp_set_num_threads(threads)


def _filtered_nprobe(nprobe: int, nlist: int, fraction: float) -> int:
    """nprobe for a filter passing `fraction` of the vectors: its top k lie as deep as the top k / fraction of
    all, so more lists are probed (by 1 / sqrt(fraction): text-like queries at 20 % keep recall@10 >= 0.95)."""
    return min(nlist, math.ceil(nprobe / math.sqrt(min(1.0, max(fraction, 1e-9)))))


def _search_plain(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidates of an ANN search (no filter, no re-ranking), with the index's own parameters."""
    return _search(index, queries, k, None, 1)


def _search(index: faiss.Index, queries: np.ndarray, depth: int, id_selector: Any, k: int,
            coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    keep, nprobe = None, None
    ivf = _ivf_of(index)
    if id_selector is not None and not isinstance(id_selector, faiss.IDSelector):
        keep = np.ascontiguousarray(id_selector, dtype=np.int64)  # the selector holds a raw pointer to it
        id_selector = faiss.IDSelectorBatch(len(keep), faiss.swig_ptr(keep))
        if ivf is not None and len(keep):
            # the top k of a fraction f of the vectors lie as deep as the top k / f of all: probe more lists
            nprobe = _filtered_nprobe(int(ivf.nprobe), int(ivf.nlist), len(keep) / max(index.ntotal, 1))
    if id_selector is None and ivf is None:
        return index.search(queries, depth)
    if ivf is None:
        return index.search(queries, depth, params=_search_params(index, id_selector, nprobe))
    nprobe = int(nprobe or ivf.nprobe)
    scores, ids = _ivf_search(index, queries, depth, id_selector, nprobe, coarse)
    # lists too short or filtered out: probe 4x more lists for the queries that came up short
    short = np.flatnonzero((ids[:, :k] < 0).any(axis=1))
    while len(short) and nprobe < ivf.nlist:
        nprobe = min(4 * nprobe, int(ivf.nlist))
        more_s, more_i = _ivf_search(index, queries[short], depth, id_selector, nprobe)
        scores[short], ids[short] = more_s, more_i
        short = short[(more_i[:, :k] < 0).any(axis=1)]
    del keep
    return scores, ids


def _ivf_search(index: faiss.Index, queries: np.ndarray, depth: int, selector: Any, nprobe: int,
                coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """An IVF `index`'s top-`depth` over its `nprobe` nearest lists. A few queries (SINGLE_THREAD_BELOW) scan
    SCAN_PARTS parts of those lists at once: FAISS splits a search by query, never one query's lists, so on
    its own one query uses one core (the 10M IVF-PQ scan: 44 -> 29 ms p50 on 2 cores, bench_scale.py).
    `coarse` (the queries' `nprobe` nearest lists, scored) is used where it fits, else the quantizer ranks."""
    ivf = faiss.downcast_index(index)
    parts = min(SCAN_PARTS, nprobe // SCAN_PART_MIN_LISTS)
    if coarse is not None and (coarse[1].shape != (len(queries), nprobe)):
        coarse = None  # another nprobe (a filter's, or more lists for short results)
    if len(queries) > SINGLE_THREAD_BELOW or not isinstance(ivf, faiss.IndexIVF) or (parts < 2 and coarse is None):
        return index.search(queries, depth, params=_search_params(index, selector, nprobe))
    return _split_scan(ivf, queries, depth, selector, nprobe, max(parts, 1), coarse)


def nearest_lists_scored(quantizer: Any, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, lists) float32/int64 (Q, n): the `n` lists nearest each query as an IVF index's `quantizer`
    ranks them, the lists and order its search probes at nprobe `n`."""
    return quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), int(n))


def _split_scan(ivf: Any, queries: np.ndarray, depth: int, selector: Any, nprobe: int, parts: int,
                coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`ivf.search` over `nprobe` lists, as `parts` threads that each scan every parts-th of the ranked lists (so
    each gets near and far lists alike) and a merge of their top-`depth` lists: the same scores as one scan;
    hits of equal score may come in another order (by id here) or, tied at the last place, be another one.
    One part runs on this thread (a search whose lists the caller ranked already)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    # what ivf.search would rank, once for all parts
    coarse_s, coarse_i = coarse if coarse is not None else nearest_lists_scored(ivf.quantizer, queries, nprobe)

    def scan(h: int) -> tuple[np.ndarray, np.ndarray]:
        faiss.omp_set_num_threads(1)  # this pool thread's own setting: one part, one core
        assign = np.ascontiguousarray(coarse_i[:, h::parts])
        dis = np.ascontiguousarray(coarse_s[:, h::parts])
        scores = np.empty((n, depth), dtype=np.float32)
        ids = np.empty((n, depth), dtype=np.int64)
        params = faiss.SearchParametersIVF(sel=selector, nprobe=assign.shape[1])
        ivf.search_preassigned_c(n, faiss.swig_ptr(queries), depth, faiss.swig_ptr(assign), faiss.swig_ptr(dis),
                                 faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)  # fmt: skip
        return scores, ids

    if parts == 1:
        return scan(0)
    found = list(shared_pool("ruclip-scan", SCAN_PARTS).map(scan, range(parts)))  # parts of one query's lists
    scores = np.hstack([f[0] for f in found])
    ids = np.hstack([f[1] for f in found])
    key = -scores if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else scores
    order = np.lexsort((ids, key), axis=-1)[:, :depth]  # best first, ties by id (empty slots score worst)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
