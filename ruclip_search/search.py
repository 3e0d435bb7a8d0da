"""`Index`: query an index built by `ruclip_search.build` with Russian text, images or both, and add,
replace and remove photos by key while it serves.

Opening loads only what text search needs (text tower, memory-mapped FAISS file); the image tower is loaded
on the first image query and metadata is read from SQLite per result. `refresh()` hot-swaps a rebuilt index,
its model included. Filters are one `SearchFilters` value; the store turns it into SQL.

Freshness is LSM-style: the FAISS file covers the store's changes up to its `faiss_seq`; every id changed
since then is a *tombstone* (the FAISS file's vector for it is stale or gone), and those that still exist
form a *recent segment* searched exactly. A search merges both. The segment follows the store's change log:
at once after this Index's own writes, within `defaults.REFRESH_INTERVAL` for other processes' writes and
folder builds. `compact()` rewrites the FAISS file and empties the segment (a writable Index does it in the
background once the segment exceeds `defaults.SEGMENT_MAX`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import faiss
import numpy as np
from PIL import Image

from . import defaults, faiss_index, scoped
from .errors import IndexNotFoundError, ModelMismatchError, QueryError, RuclipSearchError, StorageError
from .filters import NO_FILTERS, SearchFilters, parse_when, validate_key, validate_name
from .group_commit import GroupCommit
from .store import ImageRecord, IndexLock, PhotosWritten, PhotoWrite, Store, decode_embeddings, encode_embedding
from .vector_file import VectorFile

if TYPE_CHECKING:
    from .encoder import ModelCache

# The reference Predictor's Russian prompt templates (ruclip==0.0.2), the default for zero-shot tags.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "фото, на котором изображено {}",
    "изображение с {}",
    "картинка с {}",
    "фото с {}",
    "на фото видно {}",
)
log = logging.getLogger(__name__)

EXACT_FALLBACK_MAX = 200_000  # filtered ANN search that misses hits is redone exactly below this many ids
#: Up to this many recent rows an unfiltered search scores them all (~1 ms); above it, as the IVF file's lists,
#: only the rows in the lists the query probes (see _Coarse).
SEGMENT_EXACT_MAX = 2048
#: New recent rows get their IVF list in batches of this many (one matrix product: ~0.1 ms a row against 4,000
#: centroids, ~0.4 ms a row one at a time); the rows not yet assigned are scored by every search.
ASSIGN_BATCH = 256
VIDEO_OVERFETCH = 4  # with videos, a search asks for this many times the hits (frames collapse to their video)
TEXT_CACHE_SIZE = defaults.TEXT_CACHE_SIZE  # text query embeddings kept per loaded model
TOMBSTONE_SELECTOR_MIN = 256  # above this many tombstones the FAISS search excludes them by an id selector


def _tombstone_selector(tombs: np.ndarray, lineage: _Rows | None = None) -> tuple[Any, int]:
    """A FAISS selector excluding the first tombstones of `tombs` and how many it covers (the rest, at most
    TOMBSTONE_SELECTOR_MIN, are the caller's to over-fetch and drop). Within one segment lineage (its `rows`)
    tombstones only grow, each snapshot's a superset of the one before: a selector built for an earlier snapshot
    is reused until TOMBSTONE_SELECTOR_MIN more have come, not rebuilt per write (O(tombstones) each time,
    paid by the next search: at 200 writes/s almost every search)."""
    last = lineage.selector if lineage is not None else None  # one read: another thread may replace it
    if last is not None and 0 <= len(tombs) - last[0] <= TOMBSTONE_SELECTOR_MIN:
        return last[1], last[0]
    selector = faiss_index.excluding(tombs)
    if lineage is not None:
        lineage.selector = (len(tombs), selector)
    return selector, len(tombs)


ADD_FIELDS = frozenset({"key", "image", "embedding", "collection", "labels", "taken_at"})

ImageLike = Image.Image | bytes | os.PathLike
Term = str | ImageLike | tuple[Any, float]
Query = str | ImageLike | Sequence[Term]


@dataclass
class Hit:
    """One search result: an indexed image, its cosine similarity to the query, and its metadata."""

    id: int
    path: str
    score: float
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    format: str | None = None
    key: str | None = None  # the application's id of a photo added by key (None for folder-built ones)
    collection: str | None = None
    labels: tuple[str, ...] = ()
    media: str = "photo"  # "photo" (RAW pairs and Live Photos too) or "video"
    t: float | None = None  # a video hit: the time (s) of the frame that matched best (its thumbnail's frame)
    duration: float | None = None  # a video's length (s)
    raw_path: str | None = None  # the RAW file of a RAW+JPEG pair
    live_path: str | None = None  # the video of a Live Photo

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (taken_at as an ISO string)."""
        return {
            "id": self.id,
            "path": self.path,
            "score": round(float(self.score), 6),
            "width": self.width,
            "height": self.height,
            "taken_at": self.taken_at.isoformat() if self.taken_at else None,
            "format": self.format,
            "key": self.key,
            "collection": self.collection,
            "labels": list(self.labels),
            "media": self.media,
            "t": self.t,
            "duration": self.duration,
            "raw_path": self.raw_path,
            "live_path": self.live_path,
        }


def _parse_taken(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _hit(record: ImageRecord, score: float, t: float | None = None) -> Hit:
    video = record.media == "video"
    return Hit(record.id, record.path, float(score), record.width, record.height, _parse_taken(record.taken_at),
               record.format, record.key, record.collection, tuple(record.labels), "video" if video else "photo",
               (t if t is not None else record.t) if video else None, record.duration, record.raw_path,
               record.live_path)  # fmt: skip


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through torch: numpy's BLAS threads keep spinning after a call and slow the next query's text
    encoding, which runs on torch's own thread pool (measured: 60 -> 135 ms per query on 2 cores)."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def _normalise(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(norm < 1e-12):
        raise QueryError("The query terms cancel out (their weighted sum is zero): change the weights.")
    return (v / norm).astype(np.float32)


def label_embeddings(model: Any, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
    """(L, D) zero-shot label embeddings, averaged over prompt templates exactly as the reference Predictor does.

    Like Predictor.get_text_latents: each template filled with label.lower().strip(), raw text latents
    averaged over the templates, then L2-normalised.
    """
    import torch

    labels = [str(label) for label in labels]
    if not labels or any(not label.strip() for label in labels):
        raise QueryError("Give at least one non-empty label.")
    templates = list(templates or DEFAULT_TEMPLATES)
    if any("{}" not in t for t in templates):
        raise QueryError("Each template must contain '{}' where the label goes, e.g. 'фото с {}'.")
    model._need("text")
    total = None
    with torch.inference_mode():
        for template in templates:
            texts = [template.format(label.lower().strip()) for label in labels]
            ids = torch.from_numpy(model.tokenize(texts)).to(model.device)
            raw = model.net.encode_text(ids).float()
            total = raw if total is None else total + raw
        mean = total / len(templates)
        return torch.nn.functional.normalize(mean, dim=-1).cpu().numpy().astype(np.float32)


def zero_shot(
    model: Any, images: Iterable[Any], labels: Sequence[str], templates: Sequence[str] | None = None
) -> list[tuple[str, float]]:
    """Best label and its cosine score for each image (PIL, path or bytes), with a model that has both towers."""
    text = label_embeddings(model, labels, templates)
    vecs = np.atleast_2d(images) if isinstance(images, np.ndarray) else model.encode_images(list(images))
    return _best_labels(vecs, text, labels)


def _best_labels(vecs: np.ndarray, text: np.ndarray, labels: Sequence[str]) -> list[tuple[str, float]]:
    if len(vecs) == 0:
        return []
    scores = _matmul(vecs, text.T)
    best = scores.argmax(1)
    return [(labels[j], float(scores[i, j])) for i, j in enumerate(best)]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(store: Store, threshold: float = defaults.DUPLICATE_THRESHOLD) -> list[list[str]]:
    """Near-duplicate groups from the stored embeddings alone (no model): range search + union-find."""
    if not -1.0 <= threshold <= 1.0:
        raise QueryError(f"The threshold is a cosine similarity between -1 and 1, got {threshold}.")
    ids, vecs = store.all_embeddings(frames=False)  # a video by its own (first) frame
    if len(ids) < 2:
        return []
    vecs = _normalise(vecs)  # float16 storage leaves norms ~1e-3 off 1: exact copies must score 1.0
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs)
    uf = _UnionFind()
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))  # range_search keeps score > radius
    for start in range(0, len(vecs), 4096):
        lims, dist, labels = flat.range_search(vecs[start : start + 4096], radius)
        for q in range(len(lims) - 1):
            a = start + q
            for j, d in zip(labels[lims[q] : lims[q + 1]], dist[lims[q] : lims[q + 1]], strict=True):
                if j > a and d >= threshold - 1e-6:
                    uf.union(int(ids[a]), int(ids[j]))
    groups: dict[int, list[int]] = {}
    for i in list(uf.parent):
        groups.setdefault(uf.find(i), []).append(i)
    records = store.get_images([i for g in groups.values() for i in g])
    out = [sorted(records[i].path for i in g if i in records) for g in groups.values()]
    return sorted((g for g in out if len(g) > 1), key=lambda g: g[0])


def _embedding(value: Any, dim: int, key: str) -> np.ndarray:
    """A given embedding as an L2-normalised float32 (dim,) vector; QueryError for a wrong size or values."""
    try:
        vec = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise QueryError(f"Photo {key!r}: the embedding must be a list or array of {dim} numbers.") from None
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1 or vec.shape[0] != dim:
        raise QueryError(
            f"Photo {key!r}: the embedding has shape {tuple(vec.shape)} but this index holds {dim}-d embeddings: "
            "give one vector made by the index's model."
        )
    if not np.all(np.isfinite(vec)):
        raise QueryError(f"Photo {key!r}: the embedding holds NaN or infinite values.")
    norm = float(np.linalg.norm(vec))
    if norm < 1e-12:
        raise QueryError(f"Photo {key!r}: the embedding is all zeros.")
    return vec / norm


def _image_bytes(image: Any, key: str) -> bytes | None:
    """The encoded bytes of an image given as bytes or a path (read now); None for a PIL image."""
    if isinstance(image, Image.Image):
        return None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise QueryError(f"Photo {key!r}: no such image file {os.fspath(image)!r}.")
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError as e:
            raise QueryError(f"Photo {key!r}: cannot read {os.fspath(image)!r}: {e.strerror or e}.") from e
    else:
        raise QueryError(
            f"Photo {key!r}: image must be encoded bytes, a path or a PIL image, not {type(image).__name__}."
        )
    if not data:
        raise QueryError(f"Photo {key!r}: the image is empty (0 bytes).")
    return data


def _load_model(name: str | os.PathLike[str], parts: tuple[str, ...], device: str, models: ModelCache | None) -> Any:
    """One tower (or both) of a model: from the shared cache when there is one, else loaded for this index."""
    if models is not None:
        return models.get(name, parts)
    from .encoder import load_model

    return load_model(name, device=device, parts=parts)


class _Towers:
    """One model's loaded towers and its text-query cache; replaced whole when the index's model changes,
    so a cached text vector can only ever come from the model that will be searched with it."""

    def __init__(self, name: str, text: Any, device: str, models: ModelCache | None) -> None:
        self.name, self.text, self.device, self.models = name, text, device, models
        self.dim = int(text.dim)
        self.image: Any = None
        self.text_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # paging and repeats skip the encoder
        self.cache_lock = threading.Lock()
        self.load_lock = threading.Lock()

    def image_model(self) -> Any:
        """The image tower, loaded on first use (a search process that only gets text never loads it)."""
        if "image" in getattr(self.text, "parts", ()):
            return self.text
        if self.image is None:
            with self.load_lock:
                if self.image is None:
                    self.image = _load_model(self.name, ("image",), self.device, self.models)
        return self.image

    def embed_text(self, text: str) -> np.ndarray:
        with self.cache_lock:
            cached = self.text_cache.get(text)
            if cached is not None:
                self.text_cache.move_to_end(text)
                return cached
        vec = self.text.encode_text([text])[0]
        vec.setflags(write=False)  # shared between callers through the cache
        with self.cache_lock:
            self.text_cache[text] = vec
            if len(self.text_cache) > TEXT_CACHE_SIZE:
                self.text_cache.popitem(last=False)
        return vec


class _Rows:
    """Append-only row storage shared by the successive snapshots of one segment: rows below a snapshot's
    length are never written again, so a search keeps reading its snapshot while writes append. Each row also
    keeps the IVF list of the FAISS file it falls in (-1 without an IVF file), so that a search can score only
    the rows in the lists it probes."""

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.vecs = np.zeros((capacity, dim), dtype=np.float32)
        self.lists = np.full(capacity, -1, dtype=np.int32)
        self.n = 0
        #: the latest tombstone selector built in this lineage: (how many tombstones it covers, it)
        self.selector: tuple[int, Any] | None = None

    def append(self, ids: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add rows (their lists -1: assigned later, see _Segment.apply); returns (ids, vecs, lists) views of
        every row so far (the new snapshot's)."""
        m = len(ids)
        if self.n + m > len(self.ids):  # grow into new arrays: older snapshots keep viewing the old ones
            capacity = max(2 * len(self.ids), self.n + m)
            grown_ids = np.zeros(capacity, dtype=np.int64)
            grown_vecs = np.zeros((capacity, self.vecs.shape[1]), dtype=np.float32)
            grown_lists = np.full(capacity, -1, dtype=np.int32)
            grown_ids[: self.n], grown_vecs[: self.n] = self.ids[: self.n], self.vecs[: self.n]
            grown_lists[: self.n] = self.lists[: self.n]
            self.ids, self.vecs, self.lists = grown_ids, grown_vecs, grown_lists
        self.ids[self.n : self.n + m], self.vecs[self.n : self.n + m] = ids, vecs
        self.lists[self.n : self.n + m] = -1
        self.n += m
        return self.ids[: self.n], self.vecs[: self.n], self.lists[: self.n]


class _Coarse:
    """The IVF lists of a FAISS file, for the recent segment: the list a new row falls in (at write time) and
    the lists a query probes (the file's own nprobe), both as the file's quantizer picks them. A large segment
    is then searched like the file's lists, over the rows in the probed lists only: scoring every row made each
    search's cost grow with the writes since the last compaction (py-spy at 1M: 12k recent rows cost 3x the
    FAISS search itself)."""

    def __init__(self, index: Any, ivf: Any) -> None:
        self.index = index  # keeps the SWIG object `ivf` points into alive
        self.ivf = ivf
        # read once: every access to a SWIG attribute releases and retakes the GIL, which under concurrent
        # writes costs a wait each time (the file's nprobe is set when it is loaded)
        self.quantizer, self.nlist, self.nprobe = ivf.quantizer, int(ivf.nlist), max(1, int(ivf.nprobe))

    @classmethod
    def of(cls, index: Any) -> _Coarse | None:
        """The lists of an IVF file (IVF-Flat, IVF-PQ), or None for a flat or HNSW one."""
        ivf = faiss_index._ivf_of(index)
        if ivf is None or ivf.nlist < 2:
            return None
        return cls(index, ivf)

    def assign(self, vecs: np.ndarray) -> np.ndarray:
        """int32 (m,): the list each vector falls in."""
        if not len(vecs):
            return np.zeros(0, dtype=np.int32)
        return faiss_index.nearest_lists(self.ivf, vecs, 1)[:, 0].astype(np.int32)

    def nearest(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, lists) (1, nprobe): the lists a search of the file for `query` (1, d) probes at its nprobe,
        in its order; handed to the file's search too, so that the quantizer is searched once per query. (One
        query: FAISS searches it on this thread, no OpenMP team to hold back.)"""
        return faiss_index.nearest_lists_scored(self.quantizer, query, min(self.nprobe, self.nlist))

    def probed(self, lists: np.ndarray) -> np.ndarray:
        """bool (nlist,): `lists` (list numbers, -1 for none) as a mask."""
        mask = np.zeros(self.nlist, dtype=bool)
        mask[lists[lists >= 0]] = True
        return mask


class _Grow:
    """An array that successive snapshots share, each viewing a prefix of it: only the latest snapshot appends,
    past every view, so a search keeps reading its own snapshot while writes append."""

    def __init__(self, data: np.ndarray, n: int) -> None:
        self.data, self.n = data, n

    @staticmethod
    def extend(buf: _Grow | None, view: np.ndarray, values: np.ndarray) -> tuple[_Grow, np.ndarray]:
        """`view` (a prefix of `buf`, or any array) followed by `values`: (its buffer, it)."""
        m = len(values)
        if buf is None or buf.n != len(view) or buf.n + m > len(buf.data):  # a new buffer, twice as large
            data = np.empty(max(64, 2 * (len(view) + m)), dtype=view.dtype)
            data[: len(view)] = view
            buf = _Grow(data, len(view))
        buf.data[buf.n : buf.n + m] = values
        buf.n += m
        return buf, buf.data[: buf.n]


@dataclass(frozen=True)
class _Segment:
    """Everything changed since the FAISS file was written: the current vectors of those ids (searched
    exactly) and the tombstones (ids whose FAISS vector must not be returned). Immutable snapshot."""

    seq: int  # the last change (store seq) applied
    ids: np.ndarray  # int64 (n,): one row per applied write; a replaced or deleted id's older rows are dead
    vecs: np.ndarray  # float32 (n, dim)
    live: np.ndarray  # bool (n,)
    tombs: np.ndarray  # sorted int64: every id changed since the FAISS file's seq
    rows: _Rows
    lists: np.ndarray | None = None  # int32 (n,): each row's IVF list in the FAISS file (with `coarse`)
    coarse: _Coarse | None = None  # the FAISS file's IVF centroids (None: flat or HNSW file, rows all scored)
    assigned: int = 0  # rows [0, assigned) have their list in `lists` (never written again); the rest: -1
    tomb_buf: _Grow | None = None  # the buffer `tombs` is a prefix of, if it may grow in place
    live_buf: _Grow | None = None  # the buffer `live` is a prefix of, if it may grow in place
    # the last change that may have added or removed a video: every change read back from the change log (a
    # folder build's among them); an app's keyed photo writes applied from memory (`apply`) never do
    media_seq: int = 0

    @classmethod
    def empty(cls, seq: int, dim: int, coarse: _Coarse | None = None) -> _Segment:
        rows = _Rows(dim)
        return cls(seq, rows.ids[:0], rows.vecs[:0], np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64), rows,
                   rows.lists[:0], coarse, media_seq=seq)  # fmt: skip

    @property
    def size(self) -> int:
        """Ids changed since the FAISS file (what compaction folds into it)."""
        return len(self.tombs)

    def apply(self, ids: np.ndarray, vecs: np.ndarray, gone: np.ndarray, seq: int) -> _Segment:
        """A new snapshot with `ids` now holding `vecs` and `gone` deleted (only the latest snapshot may apply)."""
        ids = np.asarray(ids, dtype=np.int64)
        gone = np.asarray(gone, dtype=np.int64)
        touched = np.unique(np.concatenate((ids, gone)) if len(gone) else ids)
        tombs, tomb_buf, flips = self.tombs, self.tomb_buf, None
        if len(touched) and (not len(tombs) or touched[0] > tombs[-1]):
            # New photos (ids only grow): none changed before, the tombstones grow at their end, in place. A write
            # group touches a few ids and the segment holds up to SEGMENT_MAX: copying or re-sorting the whole
            # segment per group (np.insert, union1d, isin) was a fifth of the server's CPU per write (py-spy).
            tomb_buf, tombs = _Grow.extend(tomb_buf, tombs, touched)
        elif len(touched):
            at = np.searchsorted(tombs, touched)
            known = at < len(tombs)
            known[known] = tombs[at[known]] == touched[known]
            if known.any() and len(self.ids):  # only an id already changed since the FAISS file has live rows
                flips = touched[known]
            if (~known).any():
                tombs, tomb_buf = np.insert(tombs, at[~known], touched[~known]), None
        if flips is None:  # no older row dies: the live flags grow in place too
            live_buf, live = _Grow.extend(self.live_buf, self.live, np.ones(len(ids), dtype=bool))
        else:  # older snapshots keep their flags: a copy
            live = np.ones(len(self.live) + len(ids), dtype=bool)
            live[: len(self.live)] = self.live
            live[: len(self.live)][np.isin(self.ids, flips)] = False
            live_buf = None
        all_ids, all_vecs, all_lists = self.rows.append(ids, vecs) if len(ids) else (self.ids, self.vecs, self.lists)
        assigned = self.assigned
        if self.coarse is not None and len(all_ids) - assigned >= ASSIGN_BATCH:
            # rows no snapshot has read a list of yet (older ones read only below their own `assigned`)
            all_lists[assigned:] = self.coarse.assign(all_vecs[assigned:])
            assigned = len(all_ids)
        return _Segment(max(seq, self.seq), all_ids, all_vecs, live, tombs, self.rows, all_lists, self.coarse,
                        assigned, tomb_buf, live_buf, self.media_seq)  # fmt: skip

    def probes(self, allowed: np.ndarray | None) -> bool:
        """Whether a search (with this filter) scores only the rows in the lists its query probes."""
        return allowed is None and self.coarse is not None and len(self.ids) > SEGMENT_EXACT_MAX

    def search(self, query: np.ndarray, want: int, allowed: np.ndarray | None, exclude: set[int],
               lists: np.ndarray | None = None) -> list[tuple[int, float]]:  # fmt: skip
        """Top-`want` (id, score) among the live rows passing the filter: exact, or above SEGMENT_EXACT_MAX rows
        (unfiltered, IVF file: `probes`) among the rows in the lists the query probes, as the file's own search
        does (`lists`: those lists, from `_Coarse.nearest`, if the caller has them)."""
        keep = self.live
        if allowed is not None and len(self.ids):
            keep = keep & np.isin(self.ids, allowed)
        elif self.probes(allowed):
            assert self.coarse is not None and self.lists is not None
            if lists is None:
                lists = self.coarse.nearest(query)[1][0]
            probed = np.ones(len(self.ids), dtype=bool)  # the rows not assigned yet: all scored
            probed[: self.assigned] = self.coarse.probed(lists)[self.lists[: self.assigned]]
            keep = keep & probed
        rows = np.flatnonzero(keep)
        if exclude and len(rows):  # a few ids (a /similar query's own): dropped from the candidates only
            rows = rows[~np.isin(self.ids[rows], list(exclude))]
        if len(rows) == 0:
            return []
        ids = self.ids[rows]
        if len(rows) <= 64:
            scores = self.vecs[rows] @ query[0]
        elif 4 * len(rows) < len(self.ids) and len(rows) <= 4096:  # a few rows: gathered, scored on this thread
            # (torch's thread pool, under concurrent writes, made 300 rows cost milliseconds of waiting)
            scores = np.einsum("ij,j->i", self.vecs[rows], query[0])
        elif 4 * len(rows) < len(self.ids):  # a few rows pass the filter: gather them
            scores = _matmul(self.vecs[rows], query[0])
        else:  # score every row in place: gathering them copied the whole segment per search (44 MB at 14k rows)
            scores = _matmul(self.vecs, query[0])[rows]
        if len(rows) > want:  # the top `want` and every row tying with the last of them, then sorted exactly
            kth = np.partition(scores, len(scores) - want)[len(scores) - want]
            top = np.flatnonzero(scores >= kth)
            ids, scores = ids[top], scores[top]
        order = np.lexsort((ids, -scores))[:want]
        return [(int(ids[j]), float(scores[j])) for j in order]


@dataclass(frozen=True)
class _State:
    """What one index version consists of, models included; swapped as a whole by `refresh`, so a search
    that took a reference uses all-old or all-new parts, whatever refresh does meanwhile."""

    faiss: Any
    version: int
    count: int
    index_type: str | None
    model_name: str | None  # the model meta records for this version
    dim: int | None  # the dimension meta records for this version
    towers: _Towers | None = None  # attached by open/refresh
    error: str | None = None  # why this index cannot be searched now (refresh met a model it cannot use)
    faiss_seq: int = 0  # the last store change the FAISS file covers
    segment: _Segment | None = None  # what changed since (attached by _load_state)
    faiss_max_id: int | None = None  # the largest id the FAISS file holds (None: not recorded)
    vectors: VectorFile | None = None  # IVF-PQ: the file its candidates' stored vectors are read from

    def stored_vectors(self, store: Store, ids: np.ndarray) -> np.ndarray:
        """Candidates' stored vectors for re-ranking: from the vector file, the rows it lacks from the store."""
        if self.vectors is None:
            return store.embeddings_or_nan(ids)
        out = self.vectors.read(ids)
        missing = np.flatnonzero(np.isnan(out[:, 0]))
        if len(missing):
            out[missing] = store.embeddings_or_nan(np.asarray(ids)[missing])
        return out

    def file_tombs(self) -> np.ndarray:
        """The segment's tombstones that can be in the FAISS file: a photo added since (a larger id) cannot, so
        the file's search neither excludes it nor asks for extra hits to drop it. (Under a photo app's writes
        every new photo was a tombstone: each search over-fetched up to TOMBSTONE_SELECTOR_MIN more hits, and
        every 256 writes one search rebuilt the selector over all of them.)"""
        assert self.segment is not None
        tombs = self.segment.tombs
        if self.faiss_max_id is None:
            return tombs
        return tombs[: int(np.searchsorted(tombs, self.faiss_max_id, side="right"))]


def _check_dim(state: _State, towers: _Towers, where: str) -> None:
    """ModelMismatchError unless the model, meta and the FAISS file agree on the embedding dimension."""
    dims = {towers.dim, int(state.faiss.d)} | ({state.dim} if state.dim else set())
    if len(dims) > 1:
        raise ModelMismatchError(
            f"Model {towers.name!r} makes {towers.dim}-d embeddings but index {where!r} holds "
            f"{int(state.faiss.d)}-d ones: search with the model the index was built with."
        )


def _caught_up(store: Store, segment: _Segment) -> _Segment | None:
    """`segment` with the store's changes after its seq applied; None when a changed row changed again
    between reading the change log and reading its embedding (the caller tries again)."""
    ids, gone, seq = store.changes_since(segment.seq)
    if seq <= segment.seq and not len(ids) and not len(gone):
        return segment
    try:
        vecs = store.get_embeddings(ids.tolist()) if len(ids) else np.zeros((0, segment.vecs.shape[1]), np.float32)
    except KeyError:
        return None
    return replace(segment.apply(ids, vecs, gone, seq), media_seq=seq)


class Committed(NamedTuple):
    """What an Index needs of a committed `Store.write_photos` to make it searchable from memory
    (`follow_commit`): the ids put (in order), the ids deleted, the change seqs logged (first, last; 0, 0: none)
    and the FAISS file version written against. A writer process pickles one per group to the server, not the
    whole PhotosWritten: its records (one per photo) took 12 µs to pickle and 16 µs to unpickle per group of two
    writes, this 3 and 2 µs with the embeddings."""

    ids: list[int]
    deleted: list[int]
    first_seq: int
    last_seq: int
    index_version: int

    @classmethod
    def of(cls, done: PhotosWritten) -> Committed:
        return cls([r.id for r in done.records], list(done.deleted.values()), done.first_seq, done.last_seq,
                   done.index_version)  # fmt: skip


#: One caller's share of a group commit: (photos to put, keys to delete) -> (their records, deleted ids).
_WriteOp = tuple[list[PhotoWrite], list[str]]
_WriteResult = tuple[list[ImageRecord], list[int]]


class Index:
    """An index opened for searching (and, opened writable, for adding photos by key). Thread-safe for
    concurrent searches and writes; see the module docstring."""

    def __init__(
        self, store: Store, state: _State, *, device: str = "auto", models: ModelCache | None = None,
        pinned: str | None = None, writable: bool = False,
    ) -> None:  # fmt: skip
        self.store = store
        self._state = state
        self._device = device
        self._models = models
        self._pinned = pinned  # the model the caller insisted on (open's model=), if any
        self._refresh_lock = threading.Lock()
        self.writable = writable
        self._checked = time.monotonic()  # when the store's change log was last looked at
        self._compactor: threading.Thread | None = None
        self.compact_error: str | None = None  # why the last background compaction failed, if it did
        self._videos: tuple[tuple[int, int], bool] | None = None  # (state stamp, whether videos are stored)
        # concurrent add/remove calls are committed together (one transaction and one catch-up per group)
        self._writes: GroupCommit[_WriteOp, _WriteResult] = GroupCommit(self._commit_group)
        #: called with (the embeddings put, Committed) after each commit: how a writer process tells the
        #: server what it committed, so the server's searches see it without reading it back (`follow_commit`)
        self.on_commit: Callable[[list[bytes], Committed], None] | None = None
        #: False in a process that only commits (a server's writer process): its writes are not made searchable
        #: here and it never catches up with the store (the server's Index does both)
        self.searchable = True

    @classmethod
    def create(
        cls,
        index_dir: str | os.PathLike[str],
        model: Any = defaults.MODEL,
        device: str = "auto",
        models: ModelCache | None = None,
        db: str | None = None,
    ) -> Index:
        """An empty index bound to `model` (name, folder or loaded RuCLIP), opened writable, to add photos to.

        A folder that already holds an index with the same model is opened writable as it is; one with
        another model raises ModelMismatchError. `db`: a PostgreSQL URL for the metadata (None: SQLite).
        """
        from .indexer import model_key, write_faiss

        name = model_key(model)
        index_dir = Path(index_dir)
        text_model = None
        with IndexLock(index_dir, create=True):
            store = Store.create(index_dir, db=db)
            try:
                stored = store.model_name
                if stored and stored != name:
                    raise ModelMismatchError(
                        f"{str(index_dir)!r} already holds an index built with model {stored!r}, not {name!r}: "
                        "open it with Index.open, or create the new index in another folder."
                    )
                path = store.faiss_path()
                if not stored or path is None or not path.exists():
                    text_model = model if not isinstance(model, (str, os.PathLike)) else None
                    text_model = text_model or _load_model(model, ("text",), device, models)
                    with store.transaction() as conn:
                        store.set_model(conn, name, int(text_model.dim))
                    write_faiss(store)  # an empty FAISS file, so that readers can open the index
            finally:
                store.close()
        pinned = model if not isinstance(model, (str, os.PathLike)) else None
        if text_model is not None and pinned is None:
            return cls._open(index_dir, writable=True, device=device, models=models, text_model=(name, text_model),
                             db=db)  # fmt: skip
        return cls.open(index_dir, writable=True, model=pinned, device=device, models=models, db=db)

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike[str],
        *,
        writable: bool = False,
        model: Any = None,
        device: str = "auto",
        models: ModelCache | None = None,
        db: str | None = None,
    ) -> Index:
        """Open an index: the text tower of its model, its FAISS file memory-mapped, the metadata database.

        `writable`: allow add/remove/compact (else they raise QueryError). `model`: None (the index's own
        model, followed across rebuilds by `refresh`), a name or folder, or an already loaded RuCLIP (both
        pin the model: `refresh` then refuses an index rebuilt with another one). `models`: a ModelCache to
        take towers from, so that several indexes share one loaded model. `db`: the PostgreSQL URL of an index
        whose metadata lives there (`index_dir` holds its FAISS files); None: SQLite in `index_dir`.
        """
        return cls._open(index_dir, writable=writable, model=model, device=device, models=models, db=db)

    @classmethod
    def _open(
        cls, index_dir: str | os.PathLike[str], *, writable: bool, model: Any = None, device: str = "auto",
        models: ModelCache | None = None, text_model: tuple[str, Any] | None = None, db: str | None = None,
    ) -> Index:  # fmt: skip
        from .registry import model_key

        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise IndexNotFoundError(
                f"No index at {os.fspath(index_dir)!r}: build one with `ruclip-index build PHOTOS_DIR`, "
                "or pass the folder of an existing one with --index."
            )
        store = Store.open(index_dir, readonly=not writable, db=db)
        try:
            state = cls._load_state(store)
            stored = state.model_name
            pinned = None
            if text_model is not None:  # create() loaded the index's own model already
                name, text_model = text_model
            elif model is None:
                if not stored:
                    raise IndexNotFoundError(f"Index {str(index_dir)!r} has no model recorded: build it first.")
                name = stored
                text_model = _load_model(stored, ("text",), device, models)
            elif isinstance(model, (str, os.PathLike)):
                name = pinned = model_key(model)
                if stored and name != stored:
                    raise ModelMismatchError(
                        f"Index {str(index_dir)!r} was built with model {stored!r}, not {name!r}: "
                        "omit --model to search with the index's own model."
                    )
                text_model = _load_model(model, ("text",), device, models)
            else:
                text_model, name = model, stored or str(model.name)
                pinned = name
            towers = _Towers(name, text_model, device, models)
            _check_dim(state, towers, str(index_dir))
        except BaseException:
            store.close()
            raise
        return cls(store, replace(state, towers=towers), device=device, models=models, pinned=pinned,
                   writable=writable)  # fmt: skip

    @staticmethod
    def _load_state(store: Store, attempts: int = 5) -> _State:
        """Read meta and load the FAISS file it names (retrying if a concurrent build replaced it meanwhile)."""
        import json

        for _ in range(attempts):
            meta = store.meta()  # one read: model, dim and FAISS file of the same version
            name = meta.get("faiss_file")
            if not name:
                raise IndexNotFoundError(
                    f"Index {str(store.dir)!r} has no search index yet: its first build has not finished, or "
                    "found no photo it could index. Run `ruclip-index build PHOTOS_DIR` on a folder with photos "
                    "and wait for it to finish (`ruclip-index info --errors` lists files that failed)."
                )
            params = json.loads(meta.get("index_params") or "{}")
            try:
                index = faiss_index.load(store.dir / name, mmap=True, params=params)
            except RuntimeError:
                if not (store.dir / name).exists():
                    continue  # replaced by a newer build between reading meta and opening the file
                raise StorageError(
                    f"The FAISS file {str(store.dir / name)!r} is corrupt: rebuild it with `ruclip-index reindex`."
                ) from None
            faiss_seq = int(meta.get("faiss_seq") or 0)
            segment = _caught_up(store, _Segment.empty(faiss_seq, int(index.d), _Coarse.of(index)))
            if segment is None:
                continue  # rows changed between reading the change log and their embeddings
            return _State(
                index, int(meta.get("index_version", "0") or 0), int(index.ntotal), meta.get("index_type"),
                meta.get("model") or None, int(meta["dim"]) if meta.get("dim") else None,
                faiss_seq=faiss_seq, segment=segment, faiss_max_id=faiss_index.recorded_max_id(meta, name),
                vectors=VectorFile.open(store.dir, int(index.d)) if meta.get("index_type") == "ivfpq" else None,
            )  # fmt: skip
        raise StorageError(f"Index {str(store.dir)!r} keeps changing while being opened: try again.")

    def close(self) -> None:
        """Wait for a background compaction, release the database connections (the models and FAISS index go
        with the object)."""
        compactor = self._compactor
        if compactor is not None:
            compactor.join()
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.store.dir)!r}, images={self._state.count}, model={self._towers().name!r})"

    # -- state ---------------------------------------------------------------------------------------
    def _towers(self, state: _State | None = None) -> _Towers:
        towers = (state or self._state).towers
        assert towers is not None  # open and refresh always attach them
        return towers

    def _live_state(self) -> _State:
        """The state to search with, caught up with the store at most every REFRESH_INTERVAL; ModelMismatchError
        while the index is built with a model we cannot use (searching the old FAISS file against the rebuilt
        database would give wrong results)."""
        if not self.searchable and time.monotonic() - self._checked >= defaults.REFRESH_INTERVAL:
            self._checked = time.monotonic()
            try:  # only a new FAISS file (so that a replaced one is not kept open), not the changes
                self.refresh()
            except RuclipSearchError:
                log.debug("index %s: refresh failed", self.store.dir, exc_info=True)
        elif time.monotonic() - self._checked >= defaults.REFRESH_INTERVAL:
            try:
                self._catch_up()
            except RuclipSearchError:  # e.g. a build is mid-way: keep the state we have (refresh tells why)
                log.debug("index %s: catching up failed", self.store.dir, exc_info=True)
        state = self._state
        if state.error is not None:
            raise ModelMismatchError(state.error)
        return state

    def _catch_up(self, *, wait: bool = False) -> None:
        """Swap in a new FAISS file if one was written, else extend the segment with the store's new changes.

        `wait`: after this Index's own write (it must be visible on return); else a search skips the check
        when another thread is doing it.
        """
        if not self._refresh_lock.acquire(blocking=wait):
            return
        try:
            self._checked = time.monotonic()
            if self.store.index_version() != self._state.version:
                self._refresh_locked()
                return
            state = self._state
            segment = state.segment
            assert segment is not None
            if self.store.max_seq() <= segment.seq:
                return
            for _ in range(5):
                newer = _caught_up(self.store, segment)
                if newer is not None:
                    self._state = replace(state, segment=newer)
                    break
        finally:
            self._refresh_lock.release()
        self._maybe_compact()

    @property
    def version(self) -> int:
        """Version stamp of the FAISS index in use."""
        return self._state.version

    @property
    def name(self) -> str:
        """The index folder's name."""
        return self.store.dir.resolve().name

    @property
    def model(self) -> Any:
        """The loaded text-tower model."""
        return self._towers().text

    @property
    def model_name(self) -> str:
        """The model this index searches with (registry name or absolute folder)."""
        return self._towers().name

    def refresh(self) -> bool:
        """Swap in the newest FAISS index if a build finished since; True if swapped.

        If the rebuild switched models, the new model's text tower comes with it (the text cache and image
        tower of the old one are dropped). If `open` was given a model the rebuilt index no longer uses, or
        the new model cannot be used, this raises ModelMismatchError (or the loading error), and so does every
        search until a refresh succeeds: never results ranked by the wrong model. Searches already running
        finish on the state they started with.
        """
        if self.store.index_version() == self._state.version:
            return False
        with self._refresh_lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        """`refresh` under the refresh lock."""
        old = self._state
        if self.store.index_version() == old.version:
            return False
        state = self._load_state(self.store)
        towers = self._towers(old)
        if (state.model_name and state.model_name != towers.name) or (state.dim and state.dim != towers.dim):
            name = state.model_name or towers.name
            if self._pinned is not None:
                message = (
                    f"Index {str(self.store.dir)!r} was rebuilt with model {name!r}, but it was opened "
                    f"with {self._pinned!r}: open it again without a model to follow the index's own."
                )
                # this version can never be served here: remember it, so refresh does not retry it
                self._state = replace(old, version=state.version, error=message)
                raise ModelMismatchError(message)
            try:
                towers = _Towers(name, _load_model(name, ("text",), self._device, self._models), self._device,
                                 self._models)  # fmt: skip
            except RuclipSearchError as e:  # e.g. the model folder is gone: retried by the next refresh
                self._state = replace(old, error=f"Cannot load model {name!r} of the rebuilt index: {e}")
                raise
        try:
            _check_dim(state, towers, str(self.store.dir))
        except ModelMismatchError as e:
            self._state = replace(old, error=str(e))
            raise
        self._state = replace(state, towers=towers)
        return True

    def info(self) -> dict[str, Any]:
        """The store's summary plus what this process has loaded."""
        state = self._state
        data = self.store.info()
        data.update(
            loaded_version=state.version,
            loaded_count=state.count,
            loaded_model=self._towers(state).name,
            image_tower_loaded=self._towers(state).image is not None,
            error=state.error,
            writable=self.writable,
            faiss_seq=state.faiss_seq,
            segment_seq=state.segment.seq if state.segment is not None else state.faiss_seq,
            segment_size=state.segment.size if state.segment is not None else 0,
        )
        return data

    # -- models --------------------------------------------------------------------------------------
    def image_model(self) -> Any:
        """The image tower, loaded on first use (a search process that only gets text never loads it)."""
        return self._towers().image_model()

    def truncated(self, text: str) -> bool:
        """True if `text` is longer than the model's context and will be cut (as the reference does)."""
        model = self._towers().text
        return len(model.tokenizer.encode(text.lower())) > model.context_length - 2

    def embed_text(self, text: str, *, _state: _State | None = None) -> np.ndarray:
        """(D,) embedding of one text query; QueryError when empty."""
        if not isinstance(text, str) or not text.strip():
            raise QueryError("The query is empty: type what to look for, e.g. 'кот на диване'.")
        return self._towers(_state or self._live_state()).embed_text(text.strip())

    def embed_image(self, image: ImageLike | str, *, _state: _State | None = None) -> np.ndarray:
        """(D,) embedding of one image (path, PIL image or encoded bytes)."""
        from .errors import ImageError

        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
            raise QueryError(f"No such image file: {os.fspath(image)!r}.")
        try:
            return self._towers(_state or self._live_state()).image_model().encode_images([image])[0]
        except ImageError as e:
            raise QueryError(f"Cannot use this image as a query: {e}") from e
        except OSError as e:
            raise QueryError(f"Cannot read the query image: {e}.") from e

    def embed_query(self, query: Query, *, _state: _State | None = None) -> np.ndarray:
        """(D,) normalised query vector: a text, an image, or a weighted sum of terms (renormalised).

        Terms: str (text), PIL image / bytes / os.PathLike (image), or (term, weight) with any weight sign.
        """
        state = _state or self._live_state()
        if isinstance(query, str):
            return self.embed_text(query, _state=state)
        if isinstance(query, (Image.Image, bytes, os.PathLike)):
            return self.embed_image(query, _state=state)
        if isinstance(query, np.ndarray):
            return _normalise(np.asarray(query, dtype=np.float32).reshape(-1))
        terms = list(query)
        if not terms:
            raise QueryError("The query is empty: give at least one text or image term.")
        total = np.zeros(self._towers(state).dim, dtype=np.float32)
        positive = False
        for term in terms:
            weight = 1.0
            if isinstance(term, tuple):
                if len(term) != 2:
                    raise QueryError(f"A weighted term is (text or image, weight), got {term!r}.")
                term, weight = term
                weight = float(weight)
            if isinstance(term, str):
                vec = self.embed_text(term, _state=state)
            else:
                vec = self.embed_image(term, _state=state)
            total += weight * vec
            positive = positive or weight > 0
        if not positive:
            raise QueryError("A combined query needs at least one term with a positive weight.")
        return _normalise(total)

    # -- filtering -----------------------------------------------------------------------------------
    @staticmethod
    def _filters(filters: SearchFilters | None, loose: dict[str, Any]) -> SearchFilters:
        """One SearchFilters from either a value or the loose keywords (under=, date_from=, ...), not both."""
        if loose:
            unknown = sorted(set(loose) - _LOOSE_FILTERS)
            if unknown:
                raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
            if filters is not None:
                raise QueryError(
                    f"Pass filters either as filters=SearchFilters(...) or as keywords ({', '.join(sorted(loose))}), "
                    "not both."
                )
            return SearchFilters.parse(**loose)
        if filters is None:
            return NO_FILTERS
        if not isinstance(filters, SearchFilters):
            raise QueryError(
                f"filters must be a SearchFilters (from SearchFilters.parse), got {type(filters).__name__}."
            )
        return filters

    def filter_ids(self, filters: SearchFilters | None = None, **loose: Any) -> np.ndarray | None:
        """Ids of indexed images passing the filters (int64, sorted), or None when they restrict nothing."""
        return self.store.filter_ids(self._filters(filters, loose))

    # -- searching -----------------------------------------------------------------------------------
    def _search_vector(
        self,
        state: _State,
        vec: np.ndarray,
        k: int,
        offset: int,
        filters: SearchFilters,
        exclude: Iterable[int] = (),
    ) -> list[Hit]:
        if int(k) < 1 or int(offset) < 0:
            raise QueryError(f"k must be at least 1 and offset at least 0 (got k={k}, offset={offset}).")
        query = np.ascontiguousarray(vec.reshape(1, -1), dtype=np.float32)
        if query.shape[1] != state.faiss.d:  # never let FAISS assert (it would abort the request with a 500)
            raise ModelMismatchError(
                f"The query has {query.shape[1]} dimensions but index {str(self.store.dir)!r} holds "
                f"{int(state.faiss.d)}-d embeddings: it was rebuilt with another model; reopen or refresh it."
            )
        exclude = {int(i) for i in exclude}
        allowed = self.store.filter_ids(filters)
        if exclude and allowed is not None:
            allowed = allowed[~np.isin(allowed, list(exclude))]
        want = int(k) + int(offset)
        if allowed is not None and len(allowed) == 0:
            return []
        segment = state.segment
        assert segment is not None
        pool = len(allowed) if allowed is not None else state.count + len(segment.ids) - len(exclude)
        if not self._has_videos(state):
            pairs = self._ranked(state, query, want, allowed, exclude)[int(offset) : want]
            triples = [(i, s, None) for i, s in pairs]
        else:  # frames are rows of their own: over-fetch, keep each video's best frame (and its time)
            fetch = want * VIDEO_OVERFETCH
            while True:
                pairs = self._ranked(state, query, fetch, allowed, exclude)
                triples = self._collapse(pairs, exclude)
                if len(triples) >= want or len(pairs) < fetch or fetch >= pool:
                    break
                fetch *= VIDEO_OVERFETCH
            triples = triples[int(offset) : want]
        if filters.min_score is not None:
            triples = [p for p in triples if p[1] >= filters.min_score]
        records = self.store.get_images([i for i, _, _ in triples])
        return [_hit(records[i], s, t) for i, s, t in triples if i in records]

    def _has_videos(self, state: _State) -> bool:
        """`store.has_videos()`, asked again only when the state this search uses may have changed it (a new
        FAISS file, or changes caught up from the change log): every search asked the database (two queries, ~1 ms
        at 1M photos) while nothing had changed, and under an app's writes (keyed photos, never videos) nearly
        every search did, since each write changed the segment."""
        segment = state.segment
        stamp = (state.version, segment.media_seq if segment is not None else state.faiss_seq)
        cached = self._videos
        if cached is not None and cached[0] == stamp:
            return cached[1]
        found = self.store.has_videos()
        self._videos = (stamp, found)
        return found

    def _ranked(self, state: _State, query: np.ndarray, want: int, allowed: np.ndarray | None,
                exclude: set[int]) -> list[tuple[int, float]]:  # fmt: skip
        """Top-`want` (id, score) rows: the FAISS file and the recent segment merged (frames are rows too)."""
        segment = state.segment
        assert segment is not None
        flat = scoped.FlatVectors.of(state.faiss) if allowed is not None and len(allowed) <= scoped.EXACT_MAX else None
        if flat is not None:  # a small scope (one user's photos): exact over the IVF-Flat file's own vectors
            pairs = scoped.top(flat, state.file_tombs(), query, want, allowed)
            if len(segment.ids):
                pairs += segment.search(query, want, allowed, exclude)
            return sorted(pairs, key=lambda p: (-p[1], p[0]))[:want]
        # a large segment probes the file's lists: the quantizer ranks them once, for both searches
        coarse = segment.coarse.nearest(query) if segment.probes(allowed) and segment.coarse is not None else None
        pairs = self._search_main(state.faiss, state.file_tombs(), query, want, allowed, exclude,
                                  fetch=functools.partial(state.stored_vectors, self.store), lineage=segment.rows,
                                  coarse=coarse)  # fmt: skip
        if len(segment.ids):  # the recent segment, exactly, merged by score (ties by id, as exact search)
            found = segment.search(query, want, allowed, exclude, coarse[1][0] if coarse is not None else None)
            pairs = sorted(pairs + found, key=lambda p: (-p[1], p[0]))
        pool = len(allowed) if allowed is not None else state.count - len(exclude)
        if len(pairs) < min(want, pool) and allowed is not None and len(allowed) <= EXACT_FALLBACK_MAX:
            pairs = self._exact(query, allowed, want)  # ANN probing missed some: be exact on the subset
        return pairs[:want]

    def _collapse(self, pairs: list[tuple[int, float]], exclude: set[int]) -> list[tuple[int, float, float | None]]:
        """Ranked rows -> ranked (photo or video id, score, t): a frame stands for its video, whose first (best)
        frame in the ranking gives its score and `t`; a video whose id is in `exclude` is left out."""
        records = self.store.get_images([i for i, _ in pairs])
        out: list[tuple[int, float, float | None]] = []
        seen: set[int] = set()
        for i, score in pairs:
            record = records.get(i)
            if record is None:
                continue
            owner = record.parent_id if record.parent_id is not None else i
            if owner in seen or owner in exclude:
                continue
            seen.add(owner)
            out.append((owner, score, record.t))
        return out

    @staticmethod
    def _search_main(
        index: Any, tombs: np.ndarray, query: np.ndarray, want: int, allowed: np.ndarray | None, exclude: set[int],
        fetch: Any = None, lineage: _Rows | None = None, coarse: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[tuple[int, float]]:  # fmt: skip
        """Top-`want` (id, score) of the FAISS file, never a tombstoned (stale or deleted) or excluded id.
        `fetch` (the store's vectors by id) re-ranks IVF-PQ candidates on the stored vectors; `lineage` (the
        segment's rows) lets successive snapshots share one tombstone selector; `coarse` (an unfiltered
        query's lists, ranked) spares the file's search its quantizer."""
        if allowed is not None:
            if len(tombs):
                allowed = allowed[~np.isin(allowed, tombs)]
            if len(allowed) == 0 or index.ntotal == 0:
                return []
            scores, ids = faiss_index.search(index, query, want, allowed, fetch=fetch)
        elif index.ntotal == 0:
            return []
        elif len(tombs) + len(exclude) <= TOMBSTONE_SELECTOR_MIN:
            # a few tombstones: ask for that many more results and drop them (no selector: a plain search)
            scores, ids = faiss_index.search(index, query, want + len(tombs) + len(exclude), fetch=fetch,
                                             coarse=coarse)  # fmt: skip
        elif len(exclude) <= TOMBSTONE_SELECTOR_MIN:
            # the selector covers all but the newest tombstones (at most TOMBSTONE_SELECTOR_MIN): those and the
            # few excluded ids are asked for on top and dropped below
            selector, covered = _tombstone_selector(tombs, lineage)
            scores, ids = faiss_index.search(index, query, want + len(exclude) + len(tombs) - covered, selector,
                                             fetch=fetch, coarse=coarse)  # fmt: skip
        else:
            skip = np.union1d(tombs, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
            scores, ids = faiss_index.search(index, query, want, faiss_index.excluding(skip), fetch=fetch,
                                             coarse=coarse)  # fmt: skip
        dead = set(tombs.tolist()) if len(tombs) <= TOMBSTONE_SELECTOR_MIN else None
        pairs = []
        for s, i in zip(scores[0], ids[0], strict=True):
            i = int(i)
            if i < 0 or i in exclude or (dead is not None and i in dead):
                continue
            pairs.append((i, float(s)))
        if dead is None and pairs:  # every tombstone checked exactly (sorted: a binary search per hit)
            found = np.array([p[0] for p in pairs], dtype=np.int64)
            at = np.minimum(np.searchsorted(tombs, found), len(tombs) - 1)
            keep = tombs[at] != found
            pairs = [p for p, ok in zip(pairs, keep, strict=True) if ok]
        return pairs[:want]

    def _exact(self, query: np.ndarray, allowed: np.ndarray, want: int) -> list[tuple[int, float]]:
        vecs = self.store.get_embeddings(allowed.tolist())
        scores = _matmul(vecs, query[0])
        order = np.lexsort((allowed, -scores))[:want]
        return [(int(allowed[j]), float(scores[j])) for j in order]

    def search(
        self, query: Query, k: int = defaults.K, offset: int = 0, filters: SearchFilters | None = None, **loose: Any
    ) -> list[Hit]:
        """Top-k images for a text, an image, or a weighted list of terms, best first, after the filters.

        `filters`: a SearchFilters, or instead the keywords of `SearchFilters.parse` (under=, date_from=,
        date_to=, formats=, min_score=): `under` is a folder (absolute or relative to cwd); dates filter EXIF
        taken_at (a bare date as date_to includes that day); `formats` e.g. {"JPEG", "PNG"}; `min_score`
        drops weaker hits.
        """
        f = self._filters(filters, loose)
        state = self._live_state()  # one consistent version (model and FAISS file) for the whole query
        return self._search_vector(state, self.embed_query(query, _state=state), k, offset, f)

    def search_image(
        self,
        image: ImageLike | str,
        k: int = defaults.K,
        offset: int = 0,
        filters: SearchFilters | None = None,
        **loose: Any,
    ) -> list[Hit]:
        """Images most like `image` (path, PIL image or encoded bytes); same filters as `search`."""
        f = self._filters(filters, loose)
        state = self._live_state()
        return self._search_vector(state, self.embed_image(image, _state=state), k, offset, f)

    def _resolve_id(self, path_or_id: int | str | os.PathLike[str]) -> int:
        if isinstance(path_or_id, (int, np.integer)):
            if self.store.get_image(int(path_or_id)) is None:
                raise QueryError(f"No image with id {int(path_or_id)} in this index.")
            return int(path_or_id)
        record = self.store.find_path(path_or_id)
        if record is None:
            raise QueryError(
                f"{os.fspath(path_or_id)!r} is not in this index: give an indexed photo (or use --image "
                "to search with any picture)."
            )
        return record.id

    def similar(
        self,
        path_or_id: int | str | os.PathLike[str],
        k: int = defaults.K,
        offset: int = 0,
        filters: SearchFilters | None = None,
        **loose: Any,
    ) -> list[Hit]:
        """Indexed images most like an indexed one (by path or id), the image itself excluded."""
        f = self._filters(filters, loose)
        state = self._live_state()
        # by id: the embedding's one lookup says the image exists (the hot path of GET /similar); else tell why not
        image_id = int(path_or_id) if isinstance(path_or_id, (int, np.integer)) else self._resolve_id(path_or_id)
        try:
            vec = self.store.get_embeddings([image_id])[0]
        except KeyError:
            self._resolve_id(image_id)  # QueryError for an unknown id
            raise QueryError(f"Image {image_id} has no embedding (it failed to decode when indexed).") from None
        return self._search_vector(state, _normalise(vec), k, offset, f, exclude=(image_id,))

    # -- writing (opened writable) --------------------------------------------------------------------
    def _need_writable(self) -> None:
        if not self.writable:
            raise QueryError(
                f"Index {str(self.store.dir)!r} is open read-only: open the index with writable=True to add, "
                "replace or remove photos."
            )

    def add(
        self,
        key: str,
        image: ImageLike | str | None = None,
        embedding: np.ndarray | Sequence[float] | None = None,
        collection: str | None = None,
        labels: Iterable[str] = (),
        taken_at: Any = None,
    ) -> Hit:
        """Add the photo `key`, or replace the one with that key (keeping its id); searchable on return.

        Exactly one of `image` (encoded bytes, a path or a PIL image: encoded with the index's image tower,
        metadata from its EXIF) and `embedding` (a vector of the index's dimension; normalised here).
        `taken_at` (date, datetime or ISO text) overrides the EXIF capture time.
        """
        item = {"key": key, "image": image, "embedding": embedding, "collection": collection, "labels": labels,
                "taken_at": taken_at}  # fmt: skip
        return self.add_many([item])[0]

    def add_many(self, items: Iterable[dict[str, Any]]) -> list[Hit]:
        """`add` for many photos (dicts of add's arguments), committed in transactions of defaults.WRITE_BATCH.

        A bad item raises QueryError before its batch is written; the batches before it stay written.
        """
        self._need_writable()
        hits: list[Hit] = []
        batch: list[dict[str, Any]] = []
        for item in items:
            batch.append(item)
            if len(batch) >= defaults.WRITE_BATCH:
                hits += self._write_batch(batch)
                batch = []
        if batch:
            hits += self._write_batch(batch)
        return hits

    def _write_batch(self, items: list[dict[str, Any]]) -> list[Hit]:
        state = self._live_state()
        writes = [self._photo_write(item, state) for item in items]
        self._encode_pending(writes, state)  # in the caller's thread: concurrent writers encode in parallel
        records, _ = self._writes.submit(([w for w, _ in writes], []))
        return [_hit(r, 0.0) for r in records]

    def write_many(
        self, requests: Sequence[tuple[Sequence[dict[str, Any]], Sequence[str]]]
    ) -> list[tuple[list[Hit], int] | RuclipSearchError]:
        """Several callers' writes committed together: how a server coalesces concurrent requests without a
        thread per request. Each request is (photos to add, as dicts of add()'s arguments; keys to remove);
        each gets (its records, how many of its keys were removed) or its own error: a bad request writes
        nothing and fails alone, the others are committed in one transaction. Images are encoded here, one
        after another: for uploads that need encoding, concurrent `add` calls encode in parallel."""
        self._need_writable()
        state = self._live_state()
        out: list[Any] = [None] * len(requests)
        ready: list[tuple[int, _WriteOp]] = []
        for i, (items, keys) in enumerate(requests):
            try:
                writes = [self._photo_write(dict(item), state) for item in items]
                self._encode_pending(writes, state)
                ready.append((i, ([w for w, _ in writes], [validate_key(k) for k in keys])))
            except RuclipSearchError as e:
                out[i] = e
        try:
            done = self._commit_group([op for _, op in ready]) if ready else []
        except RuclipSearchError as e:
            done = [e] if len(ready) == 1 else []
            for _, op in ready if len(ready) > 1 else ():  # find the bad one(s): each alone
                try:
                    done.append(self._commit_group([op])[0])
                except RuclipSearchError as e:
                    done.append(e)
        for (i, _), result in zip(ready, done, strict=True):
            out[i] = result if isinstance(result, RuclipSearchError) else (
                [_hit(r, 0.0) for r in result[0]], len(result[1]))  # fmt: skip
        return out

    def _commit_group(self, ops: Sequence[_WriteOp]) -> list[_WriteResult]:
        """Commit the writes and deletes of concurrent callers in one transaction, then make them visible to
        this process's searches (each caller returns after this)."""
        puts = [w for p, _ in ops for w in p]
        done = self.store.write_photos(puts, [k for _, keys in ops for k in keys])
        out: list[_WriteResult] = []
        start = 0
        deleted = dict(done.deleted)
        for p, keys in ops:
            mine = {k: deleted.pop(k) for k in dict.fromkeys(keys) if k in deleted}  # a key deleted twice: once
            out.append((done.records[start : start + len(p)], list(mine.values())))
            start += len(p)
        embeddings = [w.embedding for w in puts]
        committed = Committed.of(done)
        if self.on_commit is not None:
            self.on_commit(embeddings, committed)
        if self.searchable:
            self.follow_commit(embeddings, committed)
        return out

    def follow_commit(self, embeddings: Sequence[bytes], done: Committed) -> None:
        """Make a committed write (this process's, or one a writer process reported) visible to this Index's
        searches on return: from memory when it directly follows what the segment holds, else by catching up
        with the store (which holds it: it was committed)."""
        try:
            if not self._apply_own(embeddings, done):
                self._catch_up(wait=True)
        except RuclipSearchError:  # committed all the same: the next search's catch-up tries again
            log.warning("index %s: catching up after a write failed", self.store.dir, exc_info=True)
        self._maybe_compact()

    def _apply_own(self, embeddings: Sequence[bytes], done: Committed) -> bool:
        """Put a committed write into the segment from memory, without reading the change log back: only when
        nothing else changed the index between the segment and this write (its seqs follow the segment's last
        and the FAISS file is the loaded one); False otherwise (the caller catches up)."""
        with self._refresh_lock:
            state = self._state
            segment = state.segment
            if segment is None or done.first_seq == 0:
                return done.first_seq == 0 and segment is not None
            if done.last_seq <= segment.seq and done.index_version == state.version:
                return True  # a catch-up has read it already
            if done.first_seq != segment.seq + 1 or done.index_version != state.version or state.dim is None:
                return False
            gone = set(done.deleted)
            live = {i: e for i, e in zip(done.ids, embeddings, strict=True) if i not in gone}
            vecs = decode_embeddings(list(live.values()), state.dim) if live else np.zeros((0, state.dim), np.float32)
            ids = np.fromiter(live, dtype=np.int64, count=len(live))
            gone_ids = np.array(sorted(gone), dtype=np.int64)
            self._state = replace(state, segment=segment.apply(ids, vecs, gone_ids, done.last_seq))
            return True

    def _photo_write(self, item: dict[str, Any], state: _State) -> tuple[PhotoWrite, Any]:
        """A validated PhotoWrite (embedding still empty for an image) and the pixels to encode, if any."""
        if not isinstance(item, dict):
            raise QueryError(f"Each photo to add is a dict of add()'s arguments, got {type(item).__name__}.")
        unknown = sorted(set(item) - ADD_FIELDS)
        if unknown:
            raise QueryError(f"Unknown photo field(s) {', '.join(unknown)}: use {', '.join(sorted(ADD_FIELDS))}.")
        key = validate_key(item.get("key"))
        collection = item.get("collection")
        if collection is not None:
            collection = validate_name(collection, "collection")
        labels = item.get("labels") or ()
        labels = tuple(sorted({validate_name(v, "label") for v in ([labels] if isinstance(labels, str) else labels)}))
        taken = item.get("taken_at")
        taken = parse_when(taken).isoformat() if taken is not None else None
        image, embedding = item.get("image"), item.get("embedding")
        if (image is None) == (embedding is None):
            raise QueryError(f"Photo {key!r}: give exactly one of image= (bytes, path or PIL image) and embedding=.")
        dim = self._towers(state).dim
        from .loader import FileMeta, file_hash

        if embedding is not None:
            vec = _embedding(embedding, dim, key)
            write = PhotoWrite(key, encode_embedding(vec), meta=FileMeta(taken_at=taken), collection=collection,
                               labels=labels)  # fmt: skip
            return write, None
        data = _image_bytes(image, key)
        source: Any = io.BytesIO(data) if data is not None else image
        model = self._towers(state).image_model()
        try:
            pixels, info = model.preprocessor.load_with_info(source, max_pixels=defaults.MAX_PIXELS)
        except RuclipSearchError as e:
            raise QueryError(f"Cannot add photo {key!r}: {e}") from e
        stamp = info.get("taken_at")
        meta = FileMeta(
            width=info.get("width"), height=info.get("height"), format=info.get("format"),
            taken_at=taken or (stamp.isoformat() if hasattr(stamp, "isoformat") else stamp),
            camera_make=info.get("camera_make"), camera_model=info.get("camera_model"),
        )  # fmt: skip
        digest = file_hash(data) if data is not None else None
        write = PhotoWrite(key, b"", content_hash=digest, meta=meta, collection=collection, labels=labels,
                           size=len(data) if data is not None else None)  # fmt: skip
        return write, pixels

    def _encode_pending(self, writes: list[tuple[PhotoWrite, Any]], state: _State) -> None:
        """Encode the images of a batch in one model call and put their embeddings into the writes."""
        pending = [i for i, (_, pixels) in enumerate(writes) if pixels is not None]
        if not pending:
            return
        import torch

        vectors = self._towers(state).image_model().encode_pixels(torch.stack([writes[i][1] for i in pending]))
        for i, vec in zip(pending, vectors, strict=True):
            writes[i] = (replace(writes[i][0], embedding=encode_embedding(vec)), None)

    def remove(self, key: str) -> bool:
        """Remove the photo `key`; True if it was there. Gone from this process's searches on return."""
        return self.remove_many([key]) > 0

    def remove_many(self, keys: Iterable[str]) -> int:
        """Remove photos by key in one transaction; returns how many were there (absent keys are ignored)."""
        self._need_writable()
        keys = [validate_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
        if not keys:
            return 0
        return len(self._writes.submit(([], keys))[1])

    def compact(self, memory_budget: int | None = None) -> dict[str, Any]:
        """Fold the segment into the FAISS file (under the index lock) and empty it; returns the new file's
        info plus `seconds` and `folded` (the segment's size before). The trained IVF index takes the changes
        without retraining until the collection has outgrown its training (then it is rebuilt, streamed);
        `memory_budget` (bytes) as for a build. Raises IndexLockedError while a build runs (the build
        updates the FAISS file itself when it ends)."""
        from .indexer import write_faiss

        self._need_writable()
        t0 = time.perf_counter()
        state = self._live_state()
        folded = state.segment.size if state.segment is not None else 0
        with IndexLock(self.store.dir, db=self.store.url):
            info = write_faiss(self.store, memory_budget=memory_budget)
        if info is None:
            raise QueryError(f"Index {str(self.store.dir)!r} has no model recorded yet: create it first.")
        with self._refresh_lock:
            self._checked = time.monotonic()
            self._refresh_locked()
        return {**info, "folded": folded, "seconds": round(time.perf_counter() - t0, 3)}

    def _maybe_compact(self) -> None:
        """Start a background compaction when the segment has grown past defaults.SEGMENT_MAX (writable only)."""
        segment = self._state.segment
        if not self.writable or segment is None or segment.size <= defaults.SEGMENT_MAX:
            return
        with self._refresh_lock:
            if self._compactor is not None and self._compactor.is_alive():
                return
            self._compactor = threading.Thread(target=self._compact_in_background, name="ruclip-compact",
                                               daemon=True)  # fmt: skip
            self._compactor.start()

    def _compact_in_background(self) -> None:
        try:
            self.compact()
            self.compact_error = None
        except Exception as e:  # a build holds the lock, the disk is full...: the next write tries again
            self.compact_error = f"{type(e).__name__}: {e}"
            log.warning("index %s: background compaction failed: %s", self.store.dir, e)

    # -- whole-collection tasks ----------------------------------------------------------------------
    def classify(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> list[tuple[str, str, float]]:
        """(path, best label, cosine score) for every indexed image, by zero-shot prompt templates."""
        labels = list(labels)
        text = label_embeddings(self._towers(self._live_state()).text, labels, templates)
        out: list[tuple[str, str, float]] = []
        for ids, vecs in self.store.iter_embeddings(frames=False):
            records = self.store.get_images(ids.tolist())
            for i, (label, score) in zip(ids.tolist(), _best_labels(vecs, text, labels), strict=True):
                out.append((records[i].path, label, score))
        return out

    def duplicates(self, threshold: float = defaults.DUPLICATE_THRESHOLD) -> list[list[str]]:
        """Groups of near-duplicate images (cosine >= threshold, linked transitively), each a sorted path list."""
        return find_duplicates(self.store, threshold)

    # -- metadata ------------------------------------------------------------------------------------
    def get(self, key_or_id: str | int) -> Hit | None:
        """Metadata of one indexed image, by key (str) or id (int), as a Hit with score 0.0, or None."""
        if isinstance(key_or_id, str):
            record = self.store.get_by_key(validate_key(key_or_id))
        else:
            record = self.store.get_image(int(key_or_id))
        return _hit(record, 0.0) if record is not None else None

    def file_path(self, image_id: int) -> Path:
        """Absolute path of an indexed image (QueryError for an unknown id)."""
        record = self.store.get_image(int(image_id))
        if record is None:
            raise QueryError(f"No image with id {int(image_id)} in this index.")
        return Path(record.path)


_LOOSE_FILTERS = frozenset({"under", "date_from", "date_to", "formats", "min_score", "collections", "labels", "media"})

__all__ = [
    "DEFAULT_TEMPLATES", "Hit", "Index", "RuclipSearchError", "SearchFilters", "find_duplicates",
    "label_embeddings", "zero_shot",
]  # fmt: skip
