"""FAISS indexes over L2-normalised embeddings (inner product = cosine), whose ids are the database's image ids.

`build_faiss` picks and tunes the index type, `save_atomic` / `load` move it to and from disk safely, and
`search` runs queries with an optional id filter.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_BELOW = 50_000  # `auto` uses exact search below this many vectors
RECALL_SAMPLE = 1000  # queries used to measure recall@10
MIN_RECALL = 0.95
SINGLE_THREAD_BELOW = 8  # query batches up to this size search on one thread
TRAIN_PER_LIST = 40  # k-means training vectors per IVF list
MIN_ANN = 1000  # below this many vectors an IVF/IVF-PQ request builds an exact flat index instead


def _gpu_available() -> bool:
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # CPU-only build
        return False


def exact_knn(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the exact top-k by inner product (ground truth for recall)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)[1]


def recall_at_k(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, k: int = 10, seed: int = 0) -> float:
    """Mean recall@k of `index` against exact search, with a sample of the collection's own vectors as queries."""
    n = len(vectors)
    if n == 0:
        return 1.0
    k = min(k, n)
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(RECALL_SAMPLE, n), replace=False)
    queries = vectors[sample]
    truth = ids[exact_knn(vectors, queries, k)]
    _, found = index.search(queries, k)
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
    return hits / (len(sample) * k)


def _ivf_of(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index: faiss.Index) -> Any:
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return inner if hasattr(inner, "hnsw") else None


def _train_add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Train and add, on the GPU when the GPU build of FAISS sees one (then copied back to the CPU)."""
    if _gpu_available() and _ivf_of(index) is not None:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, index)
        gpu.train(vectors)
        gpu.add_with_ids(vectors, ids)
        return faiss.index_gpu_to_cpu(gpu)
    if not index.is_trained:
        index.train(_training_sample(index, vectors))
    index.add_with_ids(vectors, ids)
    return index


def _training_sample(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """At most TRAIN_PER_LIST vectors per IVF list (a fixed random sample): k-means on all of a large
    collection costs minutes more and gives no better recall once nprobe is tuned."""
    ivf = _ivf_of(index)
    limit = TRAIN_PER_LIST * int(ivf.nlist) if ivf is not None else len(vectors)
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), size=limit, replace=False))
    return vectors[rows]


def _tune(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, target: float) -> tuple[float, dict]:
    """Raise nprobe (IVF) or efSearch (HNSW) until recall@10 reaches `target`; returns (recall, params)."""
    ivf, hnsw = _ivf_of(index), _hnsw_of(index)
    if ivf is not None:
        nprobe = 1
        while True:
            ivf.nprobe = nprobe
            recall = recall_at_k(index, vectors, ids)
            if recall >= target or nprobe >= ivf.nlist:
                return recall, {"nprobe": nprobe, "nlist": int(ivf.nlist)}
            nprobe = min(nprobe * 2, ivf.nlist)
    if hnsw is not None:
        ef = 16
        while True:
            hnsw.hnsw.efSearch = ef
            recall = recall_at_k(index, vectors, ids)
            if recall >= target or ef >= 4096:
                return recall, {"efSearch": ef}
            ef *= 2
    return recall_at_k(index, vectors, ids), {}


def choose_kind(n: int, flat_below: int | None = None) -> str:
    """`auto`: exact flat search for small collections, IVF (tuned for recall) for large ones."""
    return "flat" if n < (FLAT_BELOW if flat_below is None else flat_below) else "ivf"


def build_faiss(
    vectors: np.ndarray,
    ids: np.ndarray,
    kind: str = "auto",
    *,
    min_recall: float = MIN_RECALL,
    flat_below: int | None = None,
    min_ann: int | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build an index of `kind` over (vectors, ids); returns it and info {type, n, dim, recall_at_10, params}.

    ANN types are tuned until recall@10 against exact search reaches `min_recall` (or cannot go higher).
    `flat_below` / `min_ann` override FLAT_BELOW / MIN_ANN (tests build ANN indexes from a few thousand vectors).
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index type {kind!r}: use one of {', '.join(INDEX_KINDS)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = vectors.shape
    chosen = choose_kind(n, flat_below) if kind == "auto" else kind
    if chosen in ("ivf", "ivfpq") and n < (MIN_ANN if min_ann is None else min_ann):
        chosen = "flat"  # too few vectors to train centroids: exact search is better and instant
    metric = faiss.METRIC_INNER_PRODUCT
    if chosen == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif chosen == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, 32, metric)
        hnsw.hnsw.efConstruction = 80
        index = faiss.IndexIDMap2(hnsw)
    else:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        if chosen == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        else:
            # about 8 dimensions per sub-quantizer: 96 codes for 768-d, 64 for 512-d
            m = next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, metric)
        index.own_fields = True
        quantizer.this.disown()
    index = _train_add(index, vectors, ids) if n else index
    if chosen == "flat":
        recall, params = 1.0, {}
    else:
        recall, params = _tune(index, vectors, ids, min_recall)
    info = {"type": chosen, "n": int(n), "dim": int(dim), "recall_at_10": round(float(recall), 4),
            "params": params}  # fmt: skip
    return index, info


def apply_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set the recorded search parameters (nprobe, efSearch) on a loaded index."""
    ivf, hnsw = _ivf_of(index), _hnsw_of(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
    if hnsw is not None and "efSearch" in params:
        hnsw.hnsw.efSearch = int(params["efSearch"])


def save_atomic(index: faiss.Index, path: str | os.PathLike[str]) -> Path:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
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
    if params:
        apply_params(index, params)
    return index


def _search_params(index: faiss.Index, selector: Any) -> Any:
    ivf, hnsw = _ivf_of(index), _hnsw_of(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
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


def search(index: faiss.Index, queries: np.ndarray, k: int, id_selector: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores float32 (Q,k), ids int64 (Q,k), -1 where fewer hits) for L2-normalised queries.

    `id_selector` limits hits to some ids: a faiss.IDSelector or an array of allowed ids.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(int(k), max(index.ntotal, 1)))
    if len(queries) > SINGLE_THREAD_BELOW:
        return _search(index, queries, k, id_selector)
    # A few queries gain nothing from threads, and FAISS's OpenMP threads keep spinning after a parallel
    # search, stealing a core from the text encoder of the next query (one query: 56 -> 70 ms on 2 cores).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _search(index, queries, k, id_selector)
    finally:
        faiss.omp_set_num_threads(threads)


def _search(index: faiss.Index, queries: np.ndarray, k: int, id_selector: Any) -> tuple[np.ndarray, np.ndarray]:
    if id_selector is None:
        return index.search(queries, k)
    if not isinstance(id_selector, faiss.IDSelector):
        allowed = np.ascontiguousarray(id_selector, dtype=np.int64)
        id_selector = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
        keep = allowed  # the selector holds a raw pointer: keep the array alive during the search
    else:
        keep = None
    scores, ids = index.search(queries, k, params=_search_params(index, id_selector))
    del keep
    return scores, ids
