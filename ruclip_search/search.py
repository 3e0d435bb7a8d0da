"""`Index`: query an index built by `ruclip_search.build` with Russian text, images or both.

Opening loads only what text search needs (text tower, memory-mapped FAISS file); the image tower is loaded
on the first image query and metadata is read from SQLite per result. `refresh()` hot-swaps a rebuilt index.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import sqlalchemy as sa
from PIL import Image

from . import faiss_index
from .errors import IndexNotFoundError, ModelMismatchError, QueryError, RuclipSearchError, StorageError
from .store import ImageRecord, Store, images_table

# The reference Predictor's Russian prompt templates (ruclip==0.0.2), the default for zero-shot tags.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "фото, на котором изображено {}",
    "изображение с {}",
    "картинка с {}",
    "фото с {}",
    "на фото видно {}",
)
EXACT_FALLBACK_MAX = 200_000  # filtered ANN search that misses hits is redone exactly below this many ids
TEXT_CACHE_SIZE = 512  # text query embeddings kept per open index

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
        }


def _parse_taken(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _hit(record: ImageRecord, score: float) -> Hit:
    return Hit(record.id, record.path, float(score), record.width, record.height, _parse_taken(record.taken_at),
               record.format)  # fmt: skip


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


def find_duplicates(store: Store, threshold: float = 0.95) -> list[list[str]]:
    """Near-duplicate groups from the stored embeddings alone (no model): range search + union-find."""
    if not -1.0 <= threshold <= 1.0:
        raise QueryError(f"The threshold is a cosine similarity between -1 and 1, got {threshold}.")
    ids, vecs = store.all_embeddings()
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


@dataclass(frozen=True)
class _State:
    """What one index version consists of; swapped as a whole by `refresh` (searches keep their own)."""

    faiss: Any
    version: int
    count: int
    index_type: str | None


class Index:
    """A built index opened for searching. Thread-safe for concurrent searches; see the module docstring."""

    def __init__(self, store: Store, state: _State, text_model: Any, model_name: str, device: str) -> None:
        self.store = store
        self._state = state
        self._text_model = text_model
        self._image_model: Any = None
        self._model_name = model_name
        self._device = device
        self._lock = threading.Lock()
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # paging and repeats skip the encoder

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], *, model: Any = None, device: str = "auto") -> Index:
        """Open an index: the text tower of its model, its FAISS file memory-mapped, the metadata database.

        `model`: None (the index's own model), a name or folder, or an already loaded RuCLIP.
        """
        from .encoder import load_model

        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise IndexNotFoundError(
                f"No index at {os.fspath(index_dir)!r}: build one with `ruclip-index build PHOTOS_DIR`, "
                "or pass the folder of an existing one with --index."
            )
        store = Store.open(index_dir, readonly=True)
        try:
            state = cls._load_state(store)
            stored = store.model_name
            if model is None:
                if not stored:
                    raise IndexNotFoundError(f"Index {str(index_dir)!r} has no model recorded: build it first.")
                name = stored
                text_model = load_model(stored, device=device, parts=("text",))
            elif isinstance(model, (str, os.PathLike)):
                from .indexer import model_key

                name = model_key(model)
                if stored and name != stored:
                    raise ModelMismatchError(
                        f"Index {str(index_dir)!r} was built with model {stored!r}, not {name!r}: "
                        "omit --model to search with the index's own model."
                    )
                text_model = load_model(model, device=device, parts=("text",))
            else:
                text_model, name = model, stored or str(model.name)
            dim = store.dim
            if dim is not None and text_model.dim != dim:
                raise ModelMismatchError(
                    f"Model {name!r} makes {text_model.dim}-d embeddings but index {str(index_dir)!r} holds "
                    f"{dim}-d ones: search with the model the index was built with."
                )
        except BaseException:
            store.close()
            raise
        return cls(store, state, text_model, name, device)

    @staticmethod
    def _load_state(store: Store, attempts: int = 5) -> _State:
        """Read meta and load the FAISS file it names (retrying if a concurrent build replaced it meanwhile)."""
        import json

        for _ in range(attempts):
            meta = store.meta()
            name = meta.get("faiss_file")
            if not name:
                raise IndexNotFoundError(
                    f"Index {str(store.dir)!r} has no search index yet (its first build has not finished): "
                    "run `ruclip-index build PHOTOS_DIR` and wait for it to finish."
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
            return _State(index, int(meta.get("index_version", "0") or 0), int(index.ntotal), meta.get("index_type"))
        raise StorageError(f"Index {str(store.dir)!r} keeps changing while being opened: try again.")

    def close(self) -> None:
        """Release the database connections (the models and FAISS index go with the object)."""
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.store.dir)!r}, images={self._state.count}, model={self._model_name!r})"

    # -- state ---------------------------------------------------------------------------------------
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
        return self._text_model

    def refresh(self) -> bool:
        """Swap in the newest FAISS index if a build finished since; True if swapped.

        Searches already running finish on the old index (they hold a reference to the old state).
        """
        if self.store.index_version() == self._state.version:
            return False
        with self._lock:
            if self.store.index_version() == self._state.version:
                return False
            self._state = self._load_state(self.store)
        return True

    def info(self) -> dict[str, Any]:
        """The store's summary plus what this process has loaded."""
        data = self.store.info()
        data.update(
            loaded_version=self._state.version,
            loaded_count=self._state.count,
            image_tower_loaded=self._image_model is not None,
        )
        return data

    # -- models --------------------------------------------------------------------------------------
    def image_model(self) -> Any:
        """The image tower, loaded on first use (a search process that only gets text never loads it)."""
        if "image" in getattr(self._text_model, "parts", ()):
            return self._text_model
        if self._image_model is None:
            with self._lock:
                if self._image_model is None:
                    from .encoder import load_model

                    self._image_model = load_model(self._model_name, device=self._device, parts=("image",))
        return self._image_model

    def truncated(self, text: str) -> bool:
        """True if `text` is longer than the model's context and will be cut (as the reference does)."""
        return len(self._text_model.tokenizer.encode(text.lower())) > self._text_model.context_length - 2

    def embed_text(self, text: str) -> np.ndarray:
        """(D,) embedding of one text query; QueryError when empty."""
        if not isinstance(text, str) or not text.strip():
            raise QueryError("The query is empty: type what to look for, e.g. 'кот на диване'.")
        text = text.strip()
        with self._lock:
            cached = self._text_cache.get(text)
            if cached is not None:
                self._text_cache.move_to_end(text)
                return cached
        vec = self._text_model.encode_text([text])[0]
        vec.setflags(write=False)  # shared between callers through the cache
        with self._lock:
            self._text_cache[text] = vec
            if len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return vec

    def embed_image(self, image: ImageLike | str) -> np.ndarray:
        """(D,) embedding of one image (path, PIL image or encoded bytes)."""
        from .errors import ImageError

        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
            raise QueryError(f"No such image file: {os.fspath(image)!r}.")
        try:
            return self.image_model().encode_images([image])[0]
        except ImageError as e:
            raise QueryError(f"Cannot use this image as a query: {e}") from e
        except OSError as e:
            raise QueryError(f"Cannot read the query image: {e}.") from e

    def embed_query(self, query: Query) -> np.ndarray:
        """(D,) normalised query vector: a text, an image, or a weighted sum of terms (renormalised).

        Terms: str (text), PIL image / bytes / os.PathLike (image), or (term, weight) with any weight sign.
        """
        if isinstance(query, str):
            return self.embed_text(query)
        if isinstance(query, (Image.Image, bytes, os.PathLike)):
            return self.embed_image(query)
        if isinstance(query, np.ndarray):
            return _normalise(np.asarray(query, dtype=np.float32).reshape(-1))
        terms = list(query)
        if not terms:
            raise QueryError("The query is empty: give at least one text or image term.")
        total = np.zeros(self._text_model.dim, dtype=np.float32)
        positive = False
        for term in terms:
            weight = 1.0
            if isinstance(term, tuple):
                if len(term) != 2:
                    raise QueryError(f"A weighted term is (text or image, weight), got {term!r}.")
                term, weight = term
                weight = float(weight)
            vec = self.embed_text(term) if isinstance(term, str) else self.embed_image(term)
            total += weight * vec
            positive = positive or weight > 0
        if not positive:
            raise QueryError("A combined query needs at least one term with a positive weight.")
        return _normalise(total)

    # -- filtering -----------------------------------------------------------------------------------
    def _under_clause(self, under: str | os.PathLike[str]) -> Any:
        path = os.path.abspath(os.fspath(under)).rstrip(os.sep) or os.sep
        clauses = []
        for rid, root in self.store.roots().items():
            root_n = root.rstrip(os.sep) or os.sep
            if path == root_n or root_n.startswith(path.rstrip(os.sep) + os.sep):
                clauses.append(images_table.c.root_id == rid)  # the whole root lies under `under`
            elif path.startswith(root_n.rstrip(os.sep) + os.sep):
                rel = os.fsencode(os.path.relpath(path, root_n))
                prefix = rel + os.fsencode(os.sep)
                clauses.append(
                    sa.and_(
                        images_table.c.root_id == rid,
                        sa.or_(
                            images_table.c.relpath == rel,
                            sa.func.substr(images_table.c.relpath, 1, len(prefix)) == prefix,
                        ),
                    )
                )
        return sa.or_(*clauses) if clauses else sa.false()

    @staticmethod
    def _bound(value: date | datetime | str, end: bool) -> str:
        """ISO string bound on taken_at; a bare date as the upper bound includes that whole day."""
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value) if "T" in value or " " in value else date.fromisoformat(value)
            except ValueError:
                raise QueryError(f"Bad date {value!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS.") from None
        if isinstance(value, datetime):
            return value.replace(tzinfo=None).isoformat()
        if end:
            return datetime.combine(value + timedelta(days=1), time()).isoformat()
        return value.isoformat()

    def filter_ids(
        self,
        under: str | os.PathLike[str] | None = None,
        date_from: date | datetime | str | None = None,
        date_to: date | datetime | str | None = None,
        formats: Iterable[str] | None = None,
    ) -> np.ndarray | None:
        """Ids of indexed images passing the filters (int64, sorted), or None when no filter is set."""
        conds = []
        if under is not None:
            conds.append(self._under_clause(under))
        if date_from is not None:
            conds.append(images_table.c.taken_at >= self._bound(date_from, end=False))
        if date_to is not None:
            bound = self._bound(date_to, end=True)
            is_day = (
                isinstance(date_to, date)
                and not isinstance(date_to, datetime)
                or (isinstance(date_to, str) and "T" not in date_to and " " not in date_to)
            )
            conds.append(images_table.c.taken_at < bound if is_day else images_table.c.taken_at <= bound)
        if formats is not None:
            wanted = sorted({f.upper().lstrip(".") for f in formats})
            wanted += ["JPEG"] if "JPG" in wanted else []
            conds.append(images_table.c.format.in_(wanted))
        if not conds:
            return None
        query = sa.select(images_table.c.id).where(images_table.c.embedding.is_not(None), *conds)
        with self.store.engine.connect() as conn:
            ids = np.fromiter((r[0] for r in conn.execute(query)), dtype=np.int64)
        return np.sort(ids)

    # -- searching -----------------------------------------------------------------------------------
    def _search_vector(
        self,
        vec: np.ndarray,
        k: int,
        offset: int = 0,
        min_score: float | None = None,
        exclude: Iterable[int] = (),
        under: str | os.PathLike[str] | None = None,
        date_from: date | datetime | str | None = None,
        date_to: date | datetime | str | None = None,
        formats: Iterable[str] | None = None,
    ) -> list[Hit]:
        if int(k) < 1 or int(offset) < 0:
            raise QueryError(f"k must be at least 1 and offset at least 0 (got k={k}, offset={offset}).")
        state = self._state  # one consistent version for the whole query, whatever refresh does meanwhile
        exclude = {int(i) for i in exclude}
        allowed = self.filter_ids(under, date_from, date_to, formats)
        if exclude and allowed is not None:
            allowed = allowed[~np.isin(allowed, list(exclude))]
        want = int(k) + int(offset)
        fetch = want + (len(exclude) if allowed is None else 0)
        if allowed is not None and len(allowed) == 0:
            return []
        query = np.ascontiguousarray(vec.reshape(1, -1), dtype=np.float32)
        scores, ids = faiss_index.search(state.faiss, query, fetch, allowed)
        pairs = [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0 and i not in exclude]
        pool = len(allowed) if allowed is not None else state.count - len(exclude)
        if len(pairs) < min(want, pool) and allowed is not None and len(allowed) <= EXACT_FALLBACK_MAX:
            pairs = self._exact(state, query, allowed, want)  # ANN probing missed some: be exact on the subset
        pairs = pairs[int(offset) : want]
        if min_score is not None:
            pairs = [(i, s) for i, s in pairs if s >= min_score]
        records = self.store.get_images([i for i, _ in pairs])
        return [_hit(records[i], s) for i, s in pairs if i in records]

    def _exact(self, state: _State, query: np.ndarray, allowed: np.ndarray, want: int) -> list[tuple[int, float]]:
        vecs = self.store.get_embeddings(allowed.tolist())
        scores = _matmul(vecs, query[0])
        order = np.lexsort((allowed, -scores))[:want]
        return [(int(allowed[j]), float(scores[j])) for j in order]

    def search(
        self,
        query: Query,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        under: str | os.PathLike[str] | None = None,
        date_from: date | datetime | str | None = None,
        date_to: date | datetime | str | None = None,
        formats: Iterable[str] | None = None,
    ) -> list[Hit]:
        """Top-k images for a text, an image, or a weighted list of terms, best first, after the filters.

        `under` is a folder (absolute or relative to cwd); dates filter EXIF taken_at (a bare date as
        date_to includes that day); `formats` e.g. {"JPEG", "PNG"}; `min_score` drops weaker hits.
        """
        vec = self.embed_query(query)
        return self._search_vector(vec, k, offset, min_score, (), under, date_from, date_to, formats)

    def search_image(self, image: ImageLike | str, k: int = 10, offset: int = 0, **filters: Any) -> list[Hit]:
        """Images most like `image` (path, PIL image or encoded bytes); same filters as `search`."""
        return self._search_vector(self.embed_image(image), k, offset, exclude=(), **filters)

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
        self, path_or_id: int | str | os.PathLike[str], k: int = 10, offset: int = 0, **filters: Any
    ) -> list[Hit]:
        """Indexed images most like an indexed one (by path or id), the image itself excluded."""
        image_id = self._resolve_id(path_or_id)
        try:
            vec = self.store.get_embeddings([image_id])[0]
        except KeyError:
            raise QueryError(f"Image {image_id} has no embedding (it failed to decode when indexed).") from None
        return self._search_vector(_normalise(vec), k, offset, exclude=(image_id,), **filters)

    # -- whole-collection tasks ----------------------------------------------------------------------
    def classify(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> list[tuple[str, str, float]]:
        """(path, best label, cosine score) for every indexed image, by zero-shot prompt templates."""
        labels = list(labels)
        text = label_embeddings(self._text_model, labels, templates)
        out: list[tuple[str, str, float]] = []
        for ids, vecs in self.store.iter_embeddings():
            records = self.store.get_images(ids.tolist())
            for i, (label, score) in zip(ids.tolist(), _best_labels(vecs, text, labels), strict=True):
                out.append((records[i].path, label, score))
        return out

    def duplicates(self, threshold: float = 0.95) -> list[list[str]]:
        """Groups of near-duplicate images (cosine >= threshold, linked transitively), each a sorted path list."""
        return find_duplicates(self.store, threshold)

    # -- metadata ------------------------------------------------------------------------------------
    def get(self, image_id: int) -> Hit | None:
        """Metadata of one indexed image as a Hit with score 0.0, or None."""
        record = self.store.get_image(int(image_id))
        return _hit(record, 0.0) if record is not None else None

    def file_path(self, image_id: int) -> Path:
        """Absolute path of an indexed image (QueryError for an unknown id)."""
        record = self.store.get_image(int(image_id))
        if record is None:
            raise QueryError(f"No image with id {int(image_id)} in this index.")
        return Path(record.path)


__all__ = ["DEFAULT_TEMPLATES", "Hit", "Index", "RuclipSearchError", "find_duplicates", "label_embeddings", "zero_shot"]
