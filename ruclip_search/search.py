"""`Index`: query an index built by `ruclip_search.build` with Russian text, images or both.

Opening loads only what text search needs (text tower, memory-mapped FAISS file); the image tower is loaded
on the first image query and metadata is read from SQLite per result. `refresh()` hot-swaps a rebuilt index,
its model included. Filters are one `SearchFilters` value; the store turns it into SQL.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from PIL import Image

from . import defaults, faiss_index
from .errors import IndexNotFoundError, ModelMismatchError, QueryError, RuclipSearchError, StorageError
from .filters import NO_FILTERS, SearchFilters
from .store import ImageRecord, Store

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
EXACT_FALLBACK_MAX = 200_000  # filtered ANN search that misses hits is redone exactly below this many ids
TEXT_CACHE_SIZE = defaults.TEXT_CACHE_SIZE  # text query embeddings kept per loaded model

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


def find_duplicates(store: Store, threshold: float = defaults.DUPLICATE_THRESHOLD) -> list[list[str]]:
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


def _check_dim(state: _State, towers: _Towers, where: str) -> None:
    """ModelMismatchError unless the model, meta and the FAISS file agree on the embedding dimension."""
    dims = {towers.dim, int(state.faiss.d)} | ({state.dim} if state.dim else set())
    if len(dims) > 1:
        raise ModelMismatchError(
            f"Model {towers.name!r} makes {towers.dim}-d embeddings but index {where!r} holds "
            f"{int(state.faiss.d)}-d ones: search with the model the index was built with."
        )


class Index:
    """A built index opened for searching. Thread-safe for concurrent searches; see the module docstring."""

    def __init__(
        self, store: Store, state: _State, *, device: str = "auto", models: ModelCache | None = None,
        pinned: str | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self._state = state
        self._device = device
        self._models = models
        self._pinned = pinned  # the model the caller insisted on (open's model=), if any
        self._refresh_lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike[str],
        *,
        model: Any = None,
        device: str = "auto",
        models: ModelCache | None = None,
    ) -> Index:
        """Open an index: the text tower of its model, its FAISS file memory-mapped, the metadata database.

        `model`: None (the index's own model, followed across rebuilds by `refresh`), a name or folder, or an
        already loaded RuCLIP (both pin the model: `refresh` then refuses an index rebuilt with another one).
        `models`: a ModelCache to take towers from, so that several indexes share one loaded model.
        """
        from .registry import model_key

        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise IndexNotFoundError(
                f"No index at {os.fspath(index_dir)!r}: build one with `ruclip-index build PHOTOS_DIR`, "
                "or pass the folder of an existing one with --index."
            )
        store = Store.open(index_dir, readonly=True)
        try:
            state = cls._load_state(store)
            stored = state.model_name
            pinned = None
            if model is None:
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
        return cls(store, replace(state, towers=towers), device=device, models=models, pinned=pinned)

    @staticmethod
    def _load_state(store: Store, attempts: int = 5) -> _State:
        """Read meta and load the FAISS file it names (retrying if a concurrent build replaced it meanwhile)."""
        import json

        for _ in range(attempts):
            meta = store.meta()  # one read: model, dim and FAISS file of the same version
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
            return _State(
                index, int(meta.get("index_version", "0") or 0), int(index.ntotal), meta.get("index_type"),
                meta.get("model") or None, int(meta["dim"]) if meta.get("dim") else None,
            )  # fmt: skip
        raise StorageError(f"Index {str(store.dir)!r} keeps changing while being opened: try again.")

    def close(self) -> None:
        """Release the database connections (the models and FAISS index go with the object)."""
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
        """The state to search with; ModelMismatchError while the index is built with a model we cannot use
        (searching the old FAISS file against the rebuilt database would give wrong results)."""
        state = self._state
        if state.error is not None:
            raise ModelMismatchError(state.error)
        return state

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
        fetch = want + (len(exclude) if allowed is None else 0)
        if allowed is not None and len(allowed) == 0:
            return []
        scores, ids = faiss_index.search(state.faiss, query, fetch, allowed)
        pairs = [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0 and i not in exclude]
        pool = len(allowed) if allowed is not None else state.count - len(exclude)
        if len(pairs) < min(want, pool) and allowed is not None and len(allowed) <= EXACT_FALLBACK_MAX:
            pairs = self._exact(query, allowed, want)  # ANN probing missed some: be exact on the subset
        pairs = pairs[int(offset) : want]
        if filters.min_score is not None:
            pairs = [(i, s) for i, s in pairs if s >= filters.min_score]
        records = self.store.get_images([i for i, _ in pairs])
        return [_hit(records[i], s) for i, s in pairs if i in records]

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
        image_id = self._resolve_id(path_or_id)
        try:
            vec = self.store.get_embeddings([image_id])[0]
        except KeyError:
            raise QueryError(f"Image {image_id} has no embedding (it failed to decode when indexed).") from None
        return self._search_vector(state, _normalise(vec), k, offset, f, exclude=(image_id,))

    # -- whole-collection tasks ----------------------------------------------------------------------
    def classify(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> list[tuple[str, str, float]]:
        """(path, best label, cosine score) for every indexed image, by zero-shot prompt templates."""
        labels = list(labels)
        text = label_embeddings(self._towers(self._live_state()).text, labels, templates)
        out: list[tuple[str, str, float]] = []
        for ids, vecs in self.store.iter_embeddings():
            records = self.store.get_images(ids.tolist())
            for i, (label, score) in zip(ids.tolist(), _best_labels(vecs, text, labels), strict=True):
                out.append((records[i].path, label, score))
        return out

    def duplicates(self, threshold: float = defaults.DUPLICATE_THRESHOLD) -> list[list[str]]:
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


_LOOSE_FILTERS = frozenset({"under", "date_from", "date_to", "formats", "min_score"})

__all__ = [
    "DEFAULT_TEMPLATES", "Hit", "Index", "RuclipSearchError", "SearchFilters", "find_duplicates",
    "label_embeddings", "zero_shot",
]  # fmt: skip
