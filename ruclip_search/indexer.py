"""`build`: walk photo folders, decode in worker processes ahead of the model, batch-encode, store, index.

Incremental (size + mtime_ns, content hash for moves and duplicates), crash-safe (each batch is one SQLite
transaction; the FAISS file is replaced atomically), and never stopped by one bad file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import defaults, faiss_index, vector_file
from .errors import ModelMismatchError, RuclipSearchError, StorageError
from .loader import MAIN_GUARD_HINT, FileMeta, Loaded, _Decoder, hash_file
from .pq_refine import sidecar as refine_sidecar
from .store import DB_NAME, ImageWrite, IndexLock, ScanRow, Store, encode_embedding
from .vector_file import VectorFile
from .walk import walk, walk_paths

log = logging.getLogger(__name__)

Progress = Callable[[str, int, "int | None"], None]


@dataclass
class BuildReport:
    """What a build did. `encoded` counts images run through the model; `reused` embeddings found by hash."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    encoded: int = 0
    reused: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    index: str = ""
    model: str = ""
    index_type: str | None = None
    recall_at_10: float | None = None
    decode: str | None = None  # how photos were decoded: "cpu" (worker processes), "gpu" or "tensor" (tensor_decode)
    tensor_decoded: int = 0  # photos decoded by the tensor path (the others by the CPU workers)
    errors: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("errors")
        return d


def default_index_dir(photos: Sequence[str | os.PathLike[str]]) -> Path:
    """`indexes/<name of the first photos folder>` under the current directory."""
    first = os.path.abspath(os.fspath(photos[0]))
    return Path("indexes") / (os.path.basename(first.rstrip(os.sep)) or "root")


def model_key(model: Any) -> str:
    """The name an index records for a model: registry name, or absolute folder path (as encoder names it)."""
    if not isinstance(model, (str, os.PathLike)):
        return str(model.name)
    from .registry import model_key as registry_key

    return registry_key(model)


@dataclass
class _Job:
    """One file to decode and encode: where it is, and its existing row if any."""

    root_id: int
    relpath: bytes
    path: str
    size: int
    mtime_ns: int
    row_id: int | None
    content_hash: bytes | None = None
    raw_name: bytes | None = None  # the RAW of a RAW+JPEG pair (a file name beside this one)
    live_name: bytes | None = None  # the video of a Live Photo


# -- the build ---------------------------------------------------------------------------------------
class _Build:
    def __init__(self, store: Store, report: BuildReport, model: Any, name: str, device: str, batch_size: int,
                 progress: Progress | None) -> None:  # fmt: skip
        self.store, self.report, self.model_arg, self.device = store, report, model, device
        self.name = name  # what the index records once this model's first batch is committed
        self.recorded = False
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self._model: Any = None
        self.batch: list[tuple[_Job, np.ndarray, bytes, FileMeta | None]] = []
        self.videos: list[tuple[_Job, Loaded]] = []  # encoded with the batch; never deduplicated by content
        self.frames = 0  # frames in self.videos
        self.followers: dict[bytes, list[tuple[_Job, FileMeta | None]]] = {}
        self.failures: list[tuple[_Job, bytes | None, str]] = []
        self.known: dict[bytes, bytes] = {}  # content hash -> float16 embedding encoded in this run
        self.done = 0
        self.total = 0

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self._load_model()
            stored = self.store.dim
            if stored is not None and stored != self._model.dim and self.store.has_embeddings():
                raise ModelMismatchError(
                    f"Index has {stored}-d embeddings but the model makes {self._model.dim}-d ones: "
                    "use the index's model, or --rebuild."
                )
        return self._model

    def _load_model(self) -> Any:
        """The model that encodes this build's batches (the Ray engine needs only its dim and preprocessor)."""
        if isinstance(self.model_arg, (str, os.PathLike)):
            from .encoder import load_model

            return load_model(self.model_arg, device=self.device, parts=("image",))
        return self.model_arg

    def preprocessor(self) -> Any:
        return self.model.preprocessor

    def _encode(self, pixels: list[Any]) -> np.ndarray:
        """(N, D) embeddings of a batch's pixels (the Ray engine's batches hold embeddings already).

        Pixels are numpy arrays (CPU workers) or tensors already on the model's device (the tensor decode path),
        mixed in any order: the arrays go over in one copy, from pinned memory to a GPU.
        """
        import torch

        on_device = [i for i, p in enumerate(pixels) if isinstance(p, torch.Tensor)]
        if not on_device:
            x = torch.from_numpy(np.stack(pixels))
            if str(getattr(self.model, "device", "cpu")).startswith("cuda"):
                x = x.pin_memory()  # encode_pixels copies it with non_blocking=True
            return self.model.encode_pixels(x)
        first = pixels[on_device[0]]
        x = torch.empty((len(pixels), *first.shape), dtype=first.dtype, device=first.device)
        x[on_device] = torch.stack([pixels[i] for i in on_device])
        on_host = [i for i, p in enumerate(pixels) if not isinstance(p, torch.Tensor)]
        if on_host:
            x[on_host] = torch.from_numpy(np.stack([pixels[i] for i in on_host])).to(first.device)
        return self.model.encode_pixels(x)

    def _count(self, job: _Job) -> None:
        if job.row_id is None:
            self.report.added += 1
        else:
            self.report.updated += 1

    @staticmethod
    def _row(job: _Job, digest: bytes | None, file_meta: FileMeta | None, emb: bytes | None,
             error: str | None, video: Loaded | None = None) -> ImageWrite:  # fmt: skip
        return ImageWrite(
            job.root_id, job.relpath, job.size, job.mtime_ns, content_hash=digest, meta=file_meta, embedding=emb,
            error=error, raw_name=job.raw_name, live_name=job.live_name,
            media="video" if video is not None else None,
            t=video.frame_times[0] if video is not None and video.frame_times else None,
            duration=video.duration if video is not None else None,
        )  # fmt: skip

    def add(self, job: _Job, result: Loaded) -> None:
        pixels, digest, info = result.pixels, result.content_hash, result.meta
        if pixels is None or digest is None:
            self.failures.append((job, digest, result.error or "cannot decode"))
        elif result.frame_times is not None:
            self.videos.append((job, result))
            self.frames += len(pixels)
        elif digest in self.known:
            self._commit_reused(job, digest, info)
        elif any(d == digest for _, _, d, _ in self.batch):
            self.followers.setdefault(digest, []).append((job, info))
        else:
            self.batch.append((job, pixels, digest, info))
        if len(self.batch) + self.frames >= self.batch_size or len(self.failures) >= 4 * self.batch_size:
            self.flush()

    def _commit_reused(self, job: _Job, digest: bytes, info: FileMeta | None) -> None:
        with self.store.transaction() as conn:
            self.store.upsert_image(conn, self._row(job, digest, info, self.known[digest], None), job.row_id)
        self._count(job)
        self.report.reused += 1
        self._tick(1)

    def flush(self) -> None:
        """Encode the batch and commit it, with failures, in one transaction."""
        rows: list[tuple[ImageWrite, int | None]] = []
        frames: dict[int, list[tuple[float, bytes]]] = {}  # index in rows -> a video's other frames
        if self.batch or self.videos:
            all_vectors = self._encode([b[1] for b in self.batch] + [f for _, r in self.videos for f in r.pixels])
            vectors, at = all_vectors[: len(self.batch)], len(self.batch)
            for job, result in self.videos:  # a video's first frame is its own embedding, the others frame rows
                n = len(result.pixels)
                embs = [encode_embedding(v) for v in all_vectors[at : at + n]]
                at += n
                rows.append((self._row(job, result.content_hash, result.meta, embs[0], None, result), job.row_id))
                frames[len(rows) - 1] = list(zip(result.frame_times[1:], embs[1:], strict=True))
                self._count(job)
                self.report.encoded += 1
            for (job, _, digest, info), vec in zip(self.batch, vectors, strict=True):
                emb = encode_embedding(vec)
                self.known[digest] = emb
                rows.append((self._row(job, digest, info, emb, None), job.row_id))
                self._count(job)
                self.report.encoded += 1
                for fjob, finfo in self.followers.pop(digest, []):
                    rows.append((self._row(fjob, digest, finfo, emb, None), fjob.row_id))
                    self._count(fjob)
                    self.report.reused += 1
        for job, digest, reason in self.failures:
            rows.append((self._row(job, digest, None, None, reason), job.row_id))
            self.report.failed += 1
            self.report.errors.append((job.path, reason))
        encoded = bool(self.batch or self.videos)
        if rows:
            with self.store.transaction() as conn:
                if encoded and not self.recorded:  # the index is bound to a model once it holds its vectors
                    self.store.set_model(conn, self.name, self.model.dim)
                for i, (row, row_id) in enumerate(rows):
                    image_id = self.store.upsert_image(conn, row, row_id)
                    if frames.get(i):
                        self.store.put_frames(conn, image_id, frames[i])
            self.recorded = self.recorded or encoded
        self._tick(len(rows))
        self.batch, self.failures, self.videos, self.frames = [], [], [], 0

    def _tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None and n:
            self.progress("encode", self.done, self.total)


def _share_cpus(model: Any, workers: int) -> int | None:
    """On the CPU, give the model the cores the decoding workers leave free (oversubscribed OpenMP threads
    spin against the workers and made a small model 17x slower); returns the old thread count to restore."""
    if str(getattr(model, "device", "cpu")).startswith("cuda") or workers <= 0:
        return None
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(old, (os.cpu_count() or 1) - workers)))
    return old


def _remove_faiss_file(path: Path) -> None:
    """Delete a replaced FAISS file and its IVF-PQ refine code, if still there (a reader may hold it open)."""
    for p in (path, refine_sidecar(path)):
        try:
            p.unlink()
        except OSError:
            pass


def _clean_stale_files(store: Store) -> None:
    """Remove FAISS files and temp files left by an interrupted build (not the one meta names)."""
    current = store.get_meta("faiss_file")
    keep = {current, refine_sidecar(current).name} if current else set()  # with its IVF-PQ refine code
    for p in store.dir.iterdir():
        if (p.name.startswith("faiss-") and p.name not in keep) or p.name.endswith(".tmp"):
            try:
                p.unlink()
            except OSError:
                pass


def write_faiss(
    store: Store, kind: str | None = None, *, memory_budget: int | None = None, rebuild: bool = False
) -> dict[str, Any] | None:
    """Bring the FAISS file up to date with the stored embeddings and switch meta to it atomically.

    The changes since the file was written are folded into it (no retraining) while it is of the type `kind`
    still picks and the collection has not outgrown what it was trained on (faiss_index.RETRAIN_GROWTH);
    otherwise, or with `rebuild`, it is built anew, streamed from one snapshot of the store (train on a
    sample, add in chunks). `memory_budget` (bytes) is remembered in meta for later writes.
    Returns the file's info (`retrained`: whether it was built anew; not the held-out recall probe, which
    stays in meta), None when no model is recorded yet.
    """
    kind = kind or store.get_meta("index_kind") or defaults.INDEX_TYPE
    if memory_budget is not None:
        store.set_meta(memory_budget=str(int(memory_budget)))
    stored_budget = store.get_meta("memory_budget")
    budget = int(stored_budget) if stored_budget else None
    if store.dim is None:
        return None
    data_version = store.data_version()
    folded = None if rebuild else _fold_changes(store, kind, budget)
    if folded is not None:
        index, info, seq = folded
    else:
        # IVF-PQ: the vectors it re-ranks on, where they read fast
        with _vector_rows(store, int(store.dim)) as keep, store.embedding_snapshot() as snapshot:
            index, info = faiss_index.build(snapshot, kind, memory_budget=budget, keep=keep)
            seq = snapshot.seq  # the file covers the changes up to its seq (faiss_seq)
        info["retrained"] = True
    version = store.index_version() + 1
    name = f"faiss-{version}.index"
    top = faiss_index.max_id(index)  # new photos' ids lie above it: searches need not exclude them from this file
    old = store.get_meta("faiss_file")
    try:
        faiss_index.save_atomic(index, store.dir / name)
    except OSError as e:
        raise StorageError(f"Cannot write the FAISS index in {str(store.dir)!r}: {e.strerror or e}.") from e
    store.analyze()  # the filters' planner statistics follow the data, as the FAISS file does
    store.set_meta(
        faiss_file=name, index_version=str(version), index_type=info["type"], index_kind=kind,
        recall_at_10=str(info["recall_at_10"]), index_params=json.dumps(info["params"]),
        faiss_data_version=str(data_version), index_count=str(info["n"]), faiss_seq=str(seq),
        index_trained_n=str(info["trained_n"]), faiss_max_id=f"{name} {top}" if top is not None else None,
    )  # fmt: skip
    probe = info.pop("recall_probe", None)  # internal (thousands of numbers): kept in meta for the next fold only
    if probe is not None or info["retrained"]:
        store.set_meta(recall_probe=json.dumps(probe) if probe is not None else None)
    if old and old != name:
        _remove_faiss_file(store.dir / old)
    # only IVF-PQ re-ranks from disk (n x 1.5 KB at 768-d); and no other dimension's file is read again
    vector_file.remove(store.dir, but=int(store.dim) if info["type"] == "ivfpq" else None)
    return info


@contextlib.contextmanager
def _vector_rows(store: Store, dim: int) -> Iterator[Callable[[np.ndarray, np.ndarray], None]]:
    """A writer of rows of the folder's vector file (opened at the first rows), synced when the block ends well,
    before the FAISS file that re-ranks on them is published; the file's OSError is a StorageError."""
    opened: list[VectorFile] = []

    def failed(e: OSError) -> StorageError:
        return StorageError(f"Cannot write the vector file in {str(store.dir)!r}: {e.strerror or e}.")

    def write(ids: np.ndarray, vectors: np.ndarray) -> None:
        try:
            if not opened:
                opened.append(VectorFile.for_writing(store.dir, dim))
            opened[0].write(ids, vectors)
        except OSError as e:
            raise failed(e) from e

    try:
        yield write
        for f in opened:
            try:
                f.sync()
            except OSError as e:
                raise failed(e) from e
    finally:
        for f in opened:
            f.close()


def _fold_changes(store: Store, kind: str, budget: int | None) -> tuple[Any, dict[str, Any], int] | None:
    """(index, info, seq) of the current FAISS file with the store's changes since its seq folded in, or None
    when it must be built anew: none yet, HNSW, another type than `kind` now picks, grown past its training, or
    not matching the store (a change log that does not cover every row)."""
    meta = store.meta()
    path = store.dir / meta["faiss_file"] if meta.get("faiss_file") else None
    kind_now = meta.get("index_type")
    if path is None or not path.exists() or kind_now not in ("flat", "ivf", "ivfpq") or not meta.get("dim"):
        return None
    dim = int(meta["dim"])
    with store.embedding_snapshot() as snapshot:
        n = snapshot.count  # every embedded row, videos' frames included (as the FAISS file holds them)
    if faiss_index.plan(n, dim, kind, memory_budget=budget).kind != kind_now:
        return None
    trained_n = int(meta.get("index_trained_n") or meta.get("index_count") or 0)
    if faiss_index.needs_retrain(kind_now, trained_n, n):
        return None
    ids, vectors, gone, seq = store.changed_embeddings(int(meta.get("faiss_seq") or 0))
    params = json.loads(meta.get("index_params") or "{}")
    try:
        index = faiss_index.load(path, mmap=False, params=params)
    except RuntimeError:
        return None  # unreadable: build it anew
    if index.d != dim:
        return None
    faiss_index.update(index, ids, vectors, gone)
    if kind_now == "ivfpq" and vector_file.path_for(store.dir, dim).exists():
        with _vector_rows(store, dim) as keep:
            keep(ids, vectors)
    if index.ntotal != n:  # rows the change log never recorded (an index older than the log): rebuild
        return None
    info = {"type": kind_now, "n": int(index.ntotal), "dim": dim, "recall_at_10": float(meta.get("recall_at_10") or 0),
            "params": params, "trained_n": trained_n, "folded": int(len(ids) + len(gone)), "retrained": False}  # fmt: skip
    if meta.get("recall_probe"):  # the recall on the kept held-out queries, after the fold: under the bar, retrain
        measured, info["recall_probe"] = faiss_index.fold_probe(
            index, json.loads(meta["recall_probe"]), ids, vectors, gone, store.embeddings_or_nan
        )
        info["probe_recall"] = None if measured is None else round(measured, 4)
        if measured is not None and measured < faiss_index.MIN_RECALL:
            log.info("recall@10 on the held-out queries fell to %.4f after the fold: retraining", measured)
            return None
    return index, info, seq


def build(
    photos: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    index: str | os.PathLike[str] | None = None,
    model: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    exclude: Iterable[str] = (),
    follow_symlinks: bool = False,
    max_pixels: int | None = defaults.MAX_PIXELS,
    rebuild: bool = False,
    index_type: str | None = None,
    progress: Progress | None = None,
    db: str | None = None,
    memory_budget: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    decode: str = defaults.DECODE,
) -> BuildReport:
    """Index (or update the index of) photo folders; returns counts and speed. See the module docstring.

    `model`: registry name, folder or loaded RuCLIP; default the index's own model, else the default model.
    `db`: a PostgreSQL URL for the metadata (the `index` folder then holds the FAISS files); None: SQLite.
    `rebuild`: re-encode everything into a new index that replaces this one when complete (readers keep the
    old one until then); the new index holds only the `photos` folders of this run.
    `memory_budget` (bytes): what `auto` may let the FAISS index take in RAM (remembered in the index).
    `engine="ray"`: decode and encode on a Ray cluster (`ray_address`: None joins a running one or starts a
    local one, "auto", "local" or an address; `ray_actors` encoder actors); see ray_engine.
    `decode`: "cpu" (worker processes), "gpu" (JPEGs decoded by nvJPEG on the model's GPU, see tensor_decode),
    "auto" (gpu when the model is on a GPU with nvJPEG, else cpu), or "tensor" (the gpu path's code on the CPU:
    what CI tests it with; slower than cpu).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuclipSearchError(MAIN_GUARD_HINT)
    t0 = time.perf_counter()
    if isinstance(photos, (str, os.PathLike)):
        photos = [photos]
    roots = [os.path.abspath(os.fspath(p)) for p in photos]
    if not roots:
        raise RuclipSearchError("No photo folder given: pass at least one PHOTOS_DIR.")
    for root in roots:
        if not os.path.isdir(root):
            raise RuclipSearchError(f"No such folder: {root!r}. Check the path and run again.")
    if index_type is not None and index_type not in defaults.INDEX_TYPES:
        raise RuclipSearchError(f"Unknown index type {index_type!r}: use one of {', '.join(defaults.INDEX_TYPES)}.")
    if decode not in (*defaults.DECODE_MODES, "tensor"):
        raise RuclipSearchError(f"Unknown decode mode {decode!r}: use one of {', '.join(defaults.DECODE_MODES)}.")
    if engine not in ("local", "ray"):
        raise RuclipSearchError(f"Unknown engine {engine!r}: use 'local' or 'ray'.")
    index_dir = Path(index) if index is not None else default_index_dir(roots)
    if workers is None:
        workers = max(1, (os.cpu_count() or 2) - 1)
    report = BuildReport(index=str(index_dir))
    opts = _Options(model, device, batch_size, workers, tuple(exclude), follow_symlinks, max_pixels, index_type,
                    progress, memory_budget=memory_budget, engine=engine, ray_address=ray_address,
                    ray_actors=ray_actors, decode=decode)  # fmt: skip
    with _writer(index_dir, db) as store:
        if rebuild:
            _rebuild(store, report, roots, opts)
        else:
            _run(store, report, roots, opts)
    return _timed(report, t0)


@contextlib.contextmanager
def _writer(index_dir: str | os.PathLike[str], db: str | None = None) -> Iterator[Store]:
    """The index's write lock and a writable store (created if new), for one build or sync."""
    with IndexLock(index_dir, create=True):
        store = Store.create(index_dir, db=db)
        try:
            yield store
        finally:
            store.close()


def _timed(report: BuildReport, t0: float) -> BuildReport:
    """Fill in the report's duration and speed (files added, updated, moved or failed per second)."""
    report.seconds = round(time.perf_counter() - t0, 3)
    work = report.added + report.updated + report.moved + report.failed
    report.images_per_s = round(work / report.seconds, 2) if report.seconds > 0 else 0.0
    return report


def sync_paths(
    index: str | os.PathLike[str],
    roots: Sequence[str | os.PathLike[str]],
    paths: Iterable[str | os.PathLike[str]],
    model: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int = 0,
    exclude: Iterable[str] = (),
    follow_symlinks: bool = False,
    max_pixels: int | None = defaults.MAX_PIXELS,
    write_index: bool | None = None,
    progress: Progress | None = None,
    decoder: _Decoder | None = None,
    db: str | None = None,
) -> BuildReport:
    """Bring the index in step with just `paths` (files or folders under `roots`, as they are now): added,
    changed, moved (old and new path both given) and deleted files, through build's own diff and commit path.

    Holds the index lock for this call only (IndexLockedError while a build runs: call again later).
    `write_index`: rewrite a stale FAISS file: True always, None only when that is cheap (a flat index; the
    first FAISS file of a new index too), False never (the caller compacts later). `decoder`: a started
    `_Decoder` reused across calls (the watcher keeps one); else `workers` processes (0: decode here).
    """
    t0 = time.perf_counter()
    abs_roots = [os.path.abspath(os.fspath(r)) for r in roots]
    for root in abs_roots:
        if not os.path.isdir(root):
            raise RuclipSearchError(f"No such folder: {root!r}. Check the path (is the drive mounted?) and run again.")
    scope = _scope(abs_roots, paths)
    report = BuildReport(index=os.fspath(index))
    opts = _Options(model, device, batch_size, workers, tuple(exclude), follow_symlinks, max_pixels, None, progress,
                    decoder)  # fmt: skip
    with _writer(index, db) as store:
        _run(store, report, sorted(scope), opts, scope=scope, write_index=write_index)
    return _timed(report, t0)


def _scope(roots: list[str], paths: Iterable[str | os.PathLike[str]]) -> dict[str, list[str]]:
    """root -> relpaths of `paths` (each under the deepest root holding it; "" for a root itself)."""
    scope: dict[str, list[str]] = {}
    by_depth = sorted(roots, key=len, reverse=True)
    for p in paths:
        path = os.path.abspath(os.fspath(p))
        for root in by_depth:
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                scope.setdefault(root, []).append(os.path.relpath(path, root) if path != root else "")
                break
        else:
            raise RuclipSearchError(f"{path!r} is not under any of the folders {roots}: pass its folder as a root.")
    return scope


def _cheap_faiss(store: Store, index_type: str | None) -> bool:
    """Whether rewriting the FAISS file is cheap: it is (or `auto` makes it) an exact flat index."""
    kind = index_type or store.get_meta("index_kind") or defaults.INDEX_TYPE
    if kind == "flat":
        return True
    return kind == "auto" and store.counts()["images"] < faiss_index.FLAT_BELOW


def _tensor_decoder(mode: str, b: _Build, fallback: _Decoder, max_pixels: int | None) -> Any:
    """The tensor decode path for `mode` (a TensorDecoder on the model's GPU, or on the CPU for "tensor"), or
    None for the CPU workers alone."""
    if mode == "cpu":
        return None
    from .tensor_decode import TensorDecoder, nvjpeg_available

    device = str(getattr(b.model, "device", "cpu"))
    on_gpu = device.startswith("cuda") and nvjpeg_available()
    if mode == "gpu" and not on_gpu:
        raise RuclipSearchError(
            f"--decode gpu needs the model on a CUDA GPU and torchvision's nvJPEG decoder (the model is on {device}): "
            "use --decode cpu, or --device cuda on a machine with one."
        )
    if mode == "auto" and not on_gpu:
        return None
    return TensorDecoder(b.preprocessor(), device if mode != "tensor" else "cpu", fallback, max_pixels,
                         batch=b.batch_size)  # fmt: skip


def default_batch_size(device: str) -> int:
    """defaults.GPU_BATCH_SIZE images per batch on a GPU, defaults.CPU_BATCH_SIZE on the CPU (where bigger
    batches are no faster and a small one lets encoding start early and overlap with decoding)."""
    from .encoder import pick_device

    return defaults.GPU_BATCH_SIZE if pick_device(device).type == "cuda" else defaults.CPU_BATCH_SIZE


@dataclass(frozen=True)
class _Options:
    """build()'s arguments that `_run` passes through unchanged."""

    model: Any
    device: str
    batch_size: int | None
    workers: int
    exclude: tuple[str, ...]
    follow_symlinks: bool
    max_pixels: int | None
    index_type: str | None
    progress: Progress | None
    decoder: _Decoder | None = None  # a started decoder kept across calls (the watcher's); else one per run
    memory_budget: int | None = None  # bytes the FAISS index may take (remembered in meta)
    engine: str = "local"  # "local" (worker processes + this process's model) or "ray" (ray_engine)
    ray_address: str | None = None  # engine="ray": None (running cluster, else a new local one), auto, local, ADDRESS
    ray_actors: int | None = None  # engine="ray": encoder actors (default: one per GPU, else about half the CPUs)
    decode: str = "cpu"  # "cpu", "gpu", "auto" or "tensor": see build()


def _model_name(store: Store, report: BuildReport, model: Any) -> str:
    """The model this build uses: the one asked for, else the index's, else the default.

    Only an index that holds embeddings is bound to its model: one whose builds never encoded anything (the
    model could not be loaded, every file failed) accepts any.
    """
    requested = model_key(model) if model is not None else None
    stored = store.model_name
    if stored and requested and requested != stored and store.has_embeddings():
        raise ModelMismatchError(
            f"Index {report.index!r} was built with model {stored!r}, not {requested!r}: "
            "omit --model to use the index's model, or pass --rebuild to re-encode everything."
        )
    if isinstance(model, (str, os.PathLike)):
        from .registry import CONFIGS, resolve

        if os.fspath(model) not in CONFIGS:
            resolve(model)  # a missing or incomplete model folder fails now, before any work
    return requested or stored or defaults.MODEL


def _run(
    store: Store, report: BuildReport, roots: list[str], opts: _Options, scope: dict[str, list[str]] | None = None,
    write_index: bool | None = True,
) -> None:  # fmt: skip
    """Diff, decode, encode, commit, then bring the FAISS file up to date.

    `scope` (sync_paths): root -> relpaths; only files at or under those are walked and diffed (the rest of
    the index is left alone). `write_index`: True rewrite a stale FAISS file, None only when cheap (flat),
    False never.
    """
    _clean_stale_files(store)
    name = _model_name(store, report, opts.model)
    model = opts.model if opts.model is not None else name
    report.model = name
    index_type, progress = opts.index_type, opts.progress
    if index_type is not None:
        store.set_meta(index_kind=index_type)
    if opts.memory_budget is not None:
        store.set_meta(memory_budget=str(int(opts.memory_budget)))

    # 1. Walk and diff by (size, mtime_ns).
    root_ids = {root: store.root_id(root) for root in roots}
    if scope is None:
        state = store.scan_state()
        entries = walk(roots, exclude=opts.exclude, follow_symlinks=opts.follow_symlinks)
    else:
        state = store.scan_state([(root_ids[r], os.fsencode(rel)) for r, rels in scope.items() for rel in rels])
        entries = (
            e
            for r, rels in scope.items()
            for e in walk_paths(r, rels, exclude=opts.exclude, follow_symlinks=opts.follow_symlinks)
        )
    seen: set[tuple[int, bytes]] = set()
    jobs: list[_Job] = []
    relinks: list[tuple[int, bytes | None, bytes | None]] = []  # unchanged stills whose RAW or video changed
    scanned = 0
    found: list[Any] = []
    for entry in entries:
        rid = root_ids[entry.root]
        key = (rid, os.fsencode(entry.relpath))
        if key in seen:  # scoped paths may overlap (a folder and a file in it)
            continue
        seen.add(key)
        found.append((key, entry))
    if scope is not None:  # a synced RAW or video may stand for its pair's still, outside the scope's rows
        missing = [key for key, _ in found if key not in state]
        if missing:
            state.update(store.scan_state(missing))
    for key, entry in found:
        rid = key[0]
        scanned += 1
        if progress is not None and scanned % 1000 == 0:
            progress("scan", scanned, None)
        row = state.get(key)
        raw_name = os.fsencode(entry.raw_name) if entry.raw_name else None
        live_name = os.fsencode(entry.live_name) if entry.live_name else None
        if (
            row is not None
            and (row.size, row.mtime_ns) == (entry.size, entry.mtime_ns)
            and (row.has_embedding or row.has_error)
        ):
            report.unchanged += 1
            if (row.raw_name, row.live_name) != (raw_name, live_name):
                relinks.append((row.id, raw_name, live_name))
            continue
        jobs.append(_Job(rid, key[1], entry.path, entry.size, entry.mtime_ns, row.id if row else None,
                         raw_name=raw_name, live_name=live_name))  # fmt: skip
    if progress is not None:
        progress("scan", scanned, scanned)
    wanted = set(root_ids.values())
    gone = {key: row for key, row in state.items() if key[0] in wanted and key not in seen}

    to_decode = _apply_known_content(store, report, state, jobs, gone, scope is not None) if jobs or gone else []
    if relinks:
        with store.transaction() as conn:
            for image_id, raw_name, live_name in relinks:
                store.set_companions(conn, image_id, raw_name, live_name)

    # 4. Decode ahead in worker processes, encode in batches, commit per batch.
    if to_decode and opts.engine == "ray":  # decode and encode on a Ray cluster; committed here all the same
        from .ray_engine import encode_on_ray

        to_decode = encode_on_ray(store, report, model, name, to_decode, opts)  # what it leaves: videos
    if to_decode:
        batch_size = opts.batch_size if opts.batch_size is not None else default_batch_size(opts.device)
        b = _Build(store, report, model, name, opts.device, batch_size, progress)
        b.total = len(to_decode)
        decoder = opts.decoder or _Decoder(None, opts.max_pixels, opts.workers, ahead=b.batch_size)
        decoder.prestart()  # worker processes boot while the model loads
        decoder.pre = b.preprocessor()
        threads = _share_cpus(b.model, decoder.workers)
        tensors = _tensor_decoder(opts.decode, b, decoder, opts.max_pixels)
        report.decode = "cpu" if tensors is None else "gpu" if tensors.device.type == "cuda" else "tensor"
        try:
            for job, result in (decoder if tensors is None else tensors).run(to_decode):
                b.add(job, result)
            if threads:  # decoding is over: the last batch gets every core
                import torch

                torch.set_num_threads(threads)
            b.flush()
        finally:
            if tensors is not None:
                report.tensor_decoded += tensors.decoded
            if opts.decoder is None:
                decoder.close()
            if threads:
                import torch

                torch.set_num_threads(threads)

    # 5. FAISS file, when the data changed since it was written (also after a crash at any point).
    faiss_file = store.faiss_path()
    stale = store.get_meta("faiss_data_version") != str(store.data_version())
    missing = faiss_file is None or not faiss_file.exists()
    wanted_now = write_index is True or (write_index is None and (missing or _cheap_faiss(store, index_type)))
    if (stale or missing or index_type is not None) and wanted_now:
        if progress is not None:
            progress("index", 0, 1)
        write_faiss(store, index_type)
        if progress is not None:
            progress("index", 1, 1)
    report.index_type = store.get_meta("index_type")
    recall = store.get_meta("recall_at_10")
    report.recall_at_10 = float(recall) if recall else None


STAGING_DIR = ".rebuild"  # inside the index folder: same filesystem, so the FAISS file moves atomically


def _rebuild(live: Store, report: BuildReport, roots: list[str], opts: _Options) -> None:
    """--rebuild: build a complete new index in <index>/.rebuild with the normal pipeline, then switch to it.

    Readers keep the previous index, complete, until the switch: one transaction that replaces the rows and
    the meta (model, dim, faiss_file, index_version) together. A killed or failed rebuild leaves the index as
    it was, and running the rebuild again resumes the staged one where it stopped (same model).
    """
    fileless = live.count_fileless()
    if fileless:  # their pixels were never kept: a rebuild would drop them for good
        raise RuclipSearchError(
            f"Index {str(live.dir)!r} holds {fileless} photos written through the API without a file on disk, "
            "which a rebuild cannot re-encode: re-add them with the new model into a new index "
            "(`ruclip-index create`), or remove them first."
        )
    _clean_stale_files(live)
    name = model_key(opts.model) if opts.model is not None else (live.model_name or defaults.MODEL)
    staged = _open_staging(live.dir / STAGING_DIR, name)
    try:
        kind = opts.index_type or live.get_meta("index_kind")
        if kind is not None:
            staged.set_meta(index_kind=kind)
        staged.keep_roots(roots)  # what a resumed rebuild staged for other folders goes
        _run(staged, report, roots, replace(opts, model=opts.model if opts.model is not None else name))
        _switch(live, staged)
    finally:
        staged.close()
    shutil.rmtree(live.dir / STAGING_DIR, ignore_errors=True)
    report.index_type = live.get_meta("index_type")


def _open_staging(folder: Path, name: str) -> Store:
    """The staged index of an interrupted rebuild with the same model, to resume; else a new one."""
    if folder.exists():
        try:
            staged = Store.create(folder)
            if staged.model_name in (None, name) or not staged.has_embeddings():
                return staged
            staged.close()
        except RuclipSearchError:
            pass
        shutil.rmtree(folder)
    return Store.create(folder)


def _switch(live: Store, staged: Store) -> None:
    """Make the staged index the live one: move its FAISS file in under a new name, then swap the rows."""
    version = max(live.index_version(), staged.index_version()) + 1
    source, name = staged.faiss_path(), None
    if source is not None and source.exists():
        name = f"faiss-{version}.index"
        try:
            if refine_sidecar(source).exists():  # an IVF-PQ file's refine code goes first, under its name
                os.replace(refine_sidecar(source), refine_sidecar(live.dir / name))
            os.replace(source, live.dir / name)  # before the commit; an orphan left by a crash is cleaned later
            # the live folder's vector file holds the old rows under ids the staged rows may reuse: the staged
            # one replaces it (readers of the old FAISS file keep the old one open), or none is left
            staged_vectors = vector_file.path_for(staged.dir, staged.dim or 0)
            if staged.dim and staged_vectors.exists():
                vector_file.remove(live.dir, but=staged.dim)
                os.replace(staged_vectors, vector_file.path_for(live.dir, staged.dim))
            else:
                vector_file.remove(live.dir)
        except OSError as e:
            raise StorageError(f"Cannot move the new FAISS index into {str(live.dir)!r}: {e.strerror or e}.") from e
    top = faiss_index.recorded_max_id(staged.meta(), source.name) if name is not None and source is not None else None
    old = live.get_meta("faiss_file")
    live.replace_with(staged, faiss_file=name, index_version=str(version),
                      faiss_max_id=f"{name} {top}" if top is not None else None)  # fmt: skip
    if old and old != name:
        _remove_faiss_file(live.dir / old)


def _apply_known_content(
    store: Store, report: BuildReport, state: dict[tuple[int, bytes], ScanRow], jobs: list[_Job],
    gone: dict[tuple[int, bytes], ScanRow], partial: bool = False,
) -> list[_Job]:  # fmt: skip
    """One transaction: touches, moves and duplicates (by content hash, no model run) and deletions.

    Content is hashed here only where a stored embedding could match (same size); returns files to decode.
    `partial` (sync_paths: `state` holds only the synced paths): every file is hashed, and a new file is also
    a move from any stored file of the same content that no longer exists on disk (the watcher may see the
    two ends of a move in different batches).
    """
    sizes = {row.size for row in state.values() if row.has_embedding}
    gone_by_hash = {row.content_hash: key for key, row in gone.items() if row.has_embedding and row.content_hash}
    to_decode: list[_Job] = []
    with store.transaction() as conn:
        for job in jobs:
            if partial or job.size in sizes:
                job.content_hash = hash_file(job.path)
            digest = job.content_hash
            old = state.get((job.root_id, job.relpath))
            if digest is not None and old is not None and old.content_hash == digest and old.has_embedding:
                store.touch(conn, old.id, job.size, job.mtime_ns)
                store.set_companions(conn, old.id, job.raw_name, job.live_name)
                report.unchanged += 1  # touched, same content
            elif digest is not None and job.row_id is None and digest in gone_by_hash:
                moved = gone.pop(gone_by_hash.pop(digest))
                store.move(conn, moved.id, job.root_id, job.relpath, job.size, job.mtime_ns)
                store.set_companions(conn, moved.id, job.raw_name, job.live_name)
                report.moved += 1
            elif (
                digest is not None and job.row_id is None and partial and (src := _vanished(store, conn, digest, gone))
            ):
                store.move(conn, src, job.root_id, job.relpath, job.size, job.mtime_ns)
                store.set_companions(conn, src, job.raw_name, job.live_name)
                report.moved += 1
            elif digest is not None and (known := store.content_by_hash(conn, digest)) is not None:
                row = ImageWrite(
                    job.root_id, job.relpath, job.size, job.mtime_ns, content_hash=digest, meta=known.meta,
                    embedding=known.embedding, raw_name=job.raw_name, live_name=job.live_name,
                )  # fmt: skip
                store.upsert_image(conn, row, job.row_id)
                report.reused += 1
                if job.row_id is None:
                    report.added += 1
                else:
                    report.updated += 1
            else:
                to_decode.append(job)
        # 3. Deleted files (those not claimed by a move).
        store.delete_images(conn, [row.id for row in gone.values()])
        report.removed = len(gone)
    return to_decode


def _vanished(store: Store, conn: Any, digest: bytes, gone: dict[tuple[int, bytes], ScanRow]) -> int | None:
    """Id of a stored file with this content whose file is gone from disk (and not deleted in this batch)."""
    deleting = {row.id for row in gone.values()}
    roots = store.roots()
    for image_id, root_id, relpath in store.files_by_hash(conn, digest):
        if image_id not in deleting and not os.path.lexists(os.path.join(os.fsencode(roots[root_id]), relpath)):
            return image_id
    return None


def reindex(
    index: str | os.PathLike[str], kind: str = defaults.INDEX_TYPE, db: str | None = None,
    memory_budget: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Rebuild (and retrain) the FAISS file of an index from its stored embeddings, streamed (no model run);
    returns its info. `memory_budget` (bytes): what `auto` may let the index take in RAM (remembered)."""
    if kind not in defaults.INDEX_TYPES:
        raise RuclipSearchError(f"Unknown index type {kind!r}: use one of {', '.join(defaults.INDEX_TYPES)}.")
    with IndexLock(index, db=db):  # raises IndexNotFoundError, creating nothing, when there is no index
        store = Store.open(index, readonly=False, db=db)
        try:
            info = write_faiss(store, kind, memory_budget=memory_budget, rebuild=True)
            if info is None:
                raise RuclipSearchError(f"Index {os.fspath(index)!r} holds no embeddings yet: build it first.")
            return info
        finally:
            store.close()


def migrate(
    source: str | os.PathLike[str], index: str | os.PathLike[str] | None = None, db: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Copy an index between SQLite and PostgreSQL: `source` is an SQLite index folder or a PostgreSQL URL.

    Into PostgreSQL: `db` (an empty database) and `index` (the folder of its FAISS files; default the source
    folder, whose FAISS file then serves as is). Back into SQLite: `index`, a folder without an index.db.
    Streamed in chunks from one snapshot of the source (readers and writers of it may go on), under the
    source folder's lock. A FAISS file the target folder lacks is written from the copied embeddings.
    Returns rows copied per table, the target and whether a FAISS file was written.
    """
    src_db = os.fspath(source) if _is_url(source) else None
    if src_db is not None and index is None:
        raise RuclipSearchError("Copying out of PostgreSQL: name the SQLite index folder to create with --index.")
    src_dir = Path(index if src_db is not None else source)  # type: ignore[arg-type]
    dest_dir = Path(index) if index is not None else src_dir
    if src_db is None and db is None:
        raise RuclipSearchError("Nothing to migrate to: give --db URL (into PostgreSQL).")
    if src_db is not None and db is not None:
        raise RuclipSearchError("Copy between two PostgreSQL databases with pg_dump; migrate copies to or from SQLite.")
    if db is None and (dest_dir / DB_NAME).exists():
        raise RuclipSearchError(f"{str(dest_dir)!r} already holds an SQLite index: migrate into a new folder.")
    with contextlib.ExitStack() as stack:
        if src_db is None:  # no build may change the source while it is copied
            stack.enter_context(IndexLock(src_dir))
        if dest_dir != src_dir or src_db is not None:
            stack.enter_context(IndexLock(dest_dir, create=True))
        src = stack.enter_context(Store.open(src_dir, db=src_db))
        dest = stack.enter_context(Store.create(dest_dir, db=db))
        counts = src.copy_into(dest, progress=progress)
        faiss_file = dest.faiss_path()
        wrote = False
        if src.faiss_path() is not None and faiss_file is not None and not faiss_file.exists():
            source_file = src.faiss_path()
            if source_file is not None and source_file.exists() and source_file.parent.resolve() != dest_dir.resolve():
                # IVF-PQ: its refine code and vector file too (without them it re-ranks far more rows, from the db)
                if refine_sidecar(source_file).exists():
                    shutil.copyfile(refine_sidecar(source_file), refine_sidecar(faiss_file))
                vectors = vector_file.path_for(src.dir, src.dim or 0)
                if src.dim and vectors.exists():
                    shutil.copyfile(vectors, vector_file.path_for(dest_dir, src.dim))
                shutil.copyfile(source_file, faiss_file)
            else:
                write_faiss(dest)
                wrote = True
    return {"copied": counts, "index": str(dest_dir), "db": dest.where if db is not None else None,
            "faiss_written": wrote}  # fmt: skip


def _is_url(value: str | os.PathLike[str]) -> bool:
    """Whether an index argument is a database URL (scheme://...) rather than a folder."""
    return "://" in os.fspath(value)
