"""`build`: walk photo folders, decode in worker processes ahead of the model, batch-encode, store, index.

Incremental (size + mtime_ns, content hash for moves and duplicates), crash-safe (each batch is one SQLite
transaction; the FAISS file is replaced atomically), and never stopped by one bad file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import faiss_index
from .errors import ModelMismatchError, RuclipSearchError, StorageError
from .loader import MAIN_GUARD_HINT, FileMeta, Loaded, _Decoder, hash_file
from .store import IndexLock, Store, encode_embedding
from .walk import walk

DEFAULT_MODEL = "ruclip-vit-large-patch14-224"
DEFAULT_MAX_PIXELS = 178_956_970

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
    from .registry import CONFIGS

    name = os.fspath(model)
    return name if name in CONFIGS else str(Path(name).expanduser().resolve())


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


# -- the build ---------------------------------------------------------------------------------------
class _Build:
    def __init__(self, store: Store, report: BuildReport, model: Any, device: str, batch_size: int,
                 progress: Progress | None) -> None:  # fmt: skip
        self.store, self.report, self.model_arg, self.device = store, report, model, device
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self._model: Any = None
        self.batch: list[tuple[_Job, np.ndarray, bytes, FileMeta | None]] = []
        self.followers: dict[bytes, list[tuple[_Job, FileMeta | None]]] = {}
        self.failures: list[tuple[_Job, bytes | None, str]] = []
        self.known: dict[bytes, bytes] = {}  # content hash -> float16 embedding encoded in this run
        self.done = 0
        self.total = 0

    @property
    def model(self) -> Any:
        if self._model is None:
            if isinstance(self.model_arg, (str, os.PathLike)):
                from .encoder import load_model

                self._model = load_model(self.model_arg, device=self.device, parts=("image",))
            else:
                self._model = self.model_arg
            stored = self.store.dim
            if stored is not None and stored != self._model.dim:
                raise ModelMismatchError(
                    f"Index has {stored}-d embeddings but the model makes {self._model.dim}-d ones: "
                    "use the index's model, or --rebuild."
                )
            self.store.set_meta(dim=str(self._model.dim))
        return self._model

    def preprocessor(self) -> Any:
        return self.model.preprocessor

    def _count(self, job: _Job) -> None:
        if job.row_id is None:
            self.report.added += 1
        else:
            self.report.updated += 1

    def _row(self, job: _Job, digest: bytes | None, file_meta: FileMeta | None, emb: bytes | None,
             error: str | None):  # fmt: skip
        meta = asdict(file_meta) if file_meta is not None else {}
        return {
            "root_id": job.root_id, "relpath": job.relpath, "size": job.size, "mtime_ns": job.mtime_ns,
            "content_hash": digest, "width": meta.get("width"), "height": meta.get("height"),
            "format": meta.get("format"), "taken_at": meta.get("taken_at"),
            "camera_make": meta.get("camera_make"), "camera_model": meta.get("camera_model"),
            "error": error, "embedding": emb, "indexed_at": time.time(),
        }  # fmt: skip

    def add(self, job: _Job, result: Loaded) -> None:
        pixels, digest, info = result.pixels, result.content_hash, result.meta
        if pixels is None or digest is None:
            self.failures.append((job, digest, result.error or "cannot decode"))
        elif digest in self.known:
            self._commit_reused(job, digest, info)
        elif any(d == digest for _, _, d, _ in self.batch):
            self.followers.setdefault(digest, []).append((job, info))
        else:
            self.batch.append((job, pixels, digest, info))
        if len(self.batch) >= self.batch_size or len(self.failures) >= 4 * self.batch_size:
            self.flush()

    def _commit_reused(self, job: _Job, digest: bytes, info: FileMeta | None) -> None:
        with self.store.transaction() as conn:
            self.store.upsert_image(conn, self._row(job, digest, info, self.known[digest], None), job.row_id)
        self._count(job)
        self.report.reused += 1
        self._tick(1)

    def flush(self) -> None:
        """Encode the batch and commit it, with failures, in one transaction."""
        rows: list[tuple[dict, int | None]] = []
        if self.batch:
            import torch

            pixels = torch.from_numpy(np.stack([b[1] for b in self.batch]))
            vectors = self.model.encode_pixels(pixels)
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
        if rows:
            with self.store.transaction() as conn:
                for values, row_id in rows:
                    self.store.upsert_image(conn, values, row_id)
        self._tick(len(rows))
        self.batch, self.failures = [], []

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


def _clean_stale_files(store: Store) -> None:
    """Remove FAISS files and temp files left by an interrupted build (not the one meta names)."""
    current = store.get_meta("faiss_file")
    for p in store.dir.iterdir():
        if (p.name.startswith("faiss-") and p.name != current) or p.name.endswith(".tmp"):
            try:
                p.unlink()
            except OSError:
                pass


def write_faiss(store: Store, kind: str | None = None) -> dict[str, Any] | None:
    """(Re)build the FAISS file from the stored embeddings and switch meta to it atomically."""
    kind = kind or store.get_meta("index_kind") or "auto"
    data_version = store.data_version()
    ids, vectors = store.all_embeddings()
    if store.dim is None:
        return None
    index, info = faiss_index.build_faiss(vectors, ids, kind)
    version = store.index_version() + 1
    name = f"faiss-{version}.index"
    old = store.get_meta("faiss_file")
    try:
        faiss_index.save_atomic(index, store.dir / name)
    except OSError as e:
        raise StorageError(f"Cannot write the FAISS index in {str(store.dir)!r}: {e.strerror or e}.") from e
    store.set_meta(
        faiss_file=name, index_version=str(version), index_type=info["type"], index_kind=kind,
        recall_at_10=str(info["recall_at_10"]), index_params=json.dumps(info["params"]),
        faiss_data_version=str(data_version), index_count=str(info["n"]),
    )  # fmt: skip
    if old and old != name:
        try:
            (store.dir / old).unlink()
        except OSError:
            pass
    return info


def build(
    photos: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    index: str | os.PathLike[str] | None = None,
    model: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    exclude: Iterable[str] = (),
    follow_symlinks: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    rebuild: bool = False,
    index_type: str | None = None,
    progress: Progress | None = None,
) -> BuildReport:
    """Index (or update the index of) photo folders; returns counts and speed. See the module docstring.

    `model`: registry name, folder or loaded RuCLIP; default the index's own model, else the default model.
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
    index_dir = Path(index) if index is not None else default_index_dir(roots)
    if workers is None:
        workers = max(1, (os.cpu_count() or 2) - 1)
    report = BuildReport(index=str(index_dir))
    with IndexLock(index_dir):
        store = Store.create(index_dir)
        try:
            _run(store, report, roots, model, device, batch_size, workers, exclude, follow_symlinks,
                 max_pixels, rebuild, index_type, progress)  # fmt: skip
        finally:
            store.close()
    report.seconds = round(time.perf_counter() - t0, 3)
    work = report.added + report.updated + report.moved + report.failed
    report.images_per_s = round(work / report.seconds, 2) if report.seconds > 0 else 0.0
    return report


def default_batch_size(device: str) -> int:
    """64 images per batch on a GPU; 8 on the CPU, where bigger batches are no faster and a small one
    lets encoding start early and overlap with decoding."""
    from .encoder import pick_device

    return 64 if pick_device(device).type == "cuda" else 8


def _run(store: Store, report: BuildReport, roots: list[str], model: Any, device: str, batch_size: int | None,
         workers: int, exclude: Iterable[str], follow_symlinks: bool, max_pixels: int | None, rebuild: bool,
         index_type: str | None, progress: Progress | None) -> None:  # fmt: skip
    _clean_stale_files(store)
    stored_model = store.get_meta("model")
    requested = model_key(model) if model is not None else None
    if rebuild:
        with store.transaction() as conn:
            conn.exec_driver_sql("DELETE FROM images")
            store._set_meta(conn, model=None, dim=None)
        stored_model = None
    elif stored_model and requested and requested != stored_model:
        raise ModelMismatchError(
            f"Index {report.index!r} was built with model {stored_model!r}, not {requested!r}: "
            "omit --model to use the index's model, or pass --rebuild to re-encode everything."
        )
    name = requested or stored_model or DEFAULT_MODEL
    if isinstance(model, (str, os.PathLike)):
        from .registry import CONFIGS, resolve

        if os.fspath(model) not in CONFIGS:
            resolve(model)  # a missing or incomplete model folder fails now, before any work
    if model is None:
        model = name
    report.model = name
    if stored_model != name:
        store.set_meta(model=name)
    if index_type is not None:
        if index_type not in faiss_index.INDEX_KINDS:
            raise RuclipSearchError(
                f"Unknown index type {index_type!r}: use one of {', '.join(faiss_index.INDEX_KINDS)}."
            )
        store.set_meta(index_kind=index_type)

    # 1. Walk and diff by (size, mtime_ns).
    root_ids = {root: store.root_id(root) for root in roots}
    state = store.scan_state()
    seen: set[tuple[int, bytes]] = set()
    jobs: list[_Job] = []
    scanned = 0
    for entry in walk(roots, exclude=exclude, follow_symlinks=follow_symlinks):
        rid = root_ids[entry.root]
        key = (rid, os.fsencode(entry.relpath))
        seen.add(key)
        scanned += 1
        if progress is not None and scanned % 1000 == 0:
            progress("scan", scanned, None)
        row = state.get(key)
        if row is not None and row[1] == entry.size and row[2] == entry.mtime_ns and (row[4] or row[5]):
            report.unchanged += 1
            continue
        jobs.append(_Job(rid, key[1], entry.path, entry.size, entry.mtime_ns, row[0] if row else None))
    if progress is not None:
        progress("scan", scanned, scanned)
    wanted = set(root_ids.values())
    gone = {key: row for key, row in state.items() if key[0] in wanted and key not in seen}

    to_decode = _apply_known_content(store, report, state, jobs, gone) if jobs or gone else []

    # 4. Decode ahead in worker processes, encode in batches, commit per batch.
    if to_decode:
        if batch_size is None:
            batch_size = default_batch_size(device)
        b = _Build(store, report, model, device, batch_size, progress)
        b.total = len(to_decode)
        decoder = _Decoder(None, max_pixels, workers, ahead=b.batch_size)
        decoder.prestart()  # worker processes boot while the model loads
        decoder.pre = b.preprocessor()
        threads = _share_cpus(b.model, workers)
        try:
            for job, result in decoder.run(to_decode):
                b.add(job, result)
            if threads:  # decoding is over: the last batch gets every core
                import torch

                torch.set_num_threads(threads)
            b.flush()
        finally:
            decoder.close()
            if threads:
                import torch

                torch.set_num_threads(threads)

    # 5. FAISS file, when the data changed since it was written (also after a crash at any point).
    faiss_file = store.faiss_path()
    stale = store.get_meta("faiss_data_version") != str(store.data_version())
    if stale or faiss_file is None or not faiss_file.exists() or index_type is not None:
        if progress is not None:
            progress("index", 0, 1)
        write_faiss(store, index_type)
        if progress is not None:
            progress("index", 1, 1)
    report.index_type = store.get_meta("index_type")
    recall = store.get_meta("recall_at_10")
    report.recall_at_10 = float(recall) if recall else None


def _apply_known_content(store: Store, report: BuildReport, state: dict, jobs: list[_Job], gone: dict) -> list[_Job]:
    """One transaction: touches, moves and duplicates (by content hash, no model run) and deletions.

    Content is hashed here only where a stored embedding could match (same size); returns files to decode.
    """
    sizes = {row[1] for row in state.values() if row[4]}
    gone_by_hash = {row[3]: key for key, row in gone.items() if row[4] and row[3]}
    to_decode: list[_Job] = []
    with store.transaction() as conn:
        for job in jobs:
            if job.size in sizes:
                job.content_hash = hash_file(job.path)
            digest = job.content_hash
            old = state.get((job.root_id, job.relpath))
            if digest is not None and old is not None and old[3] == digest and old[4]:
                conn.exec_driver_sql(
                    "UPDATE images SET size=?, mtime_ns=? WHERE id=?", (job.size, job.mtime_ns, job.row_id)
                )
                report.unchanged += 1  # touched, same content
            elif digest is not None and job.row_id is None and digest in gone_by_hash:
                row = gone.pop(gone_by_hash.pop(digest))
                conn.exec_driver_sql(
                    "UPDATE images SET root_id=?, relpath=?, size=?, mtime_ns=?, indexed_at=? WHERE id=?",
                    (job.root_id, job.relpath, job.size, job.mtime_ns, time.time(), row[0]),
                )
                report.moved += 1
            elif digest is not None and (emb := store.embedding_by_hash(digest)) is not None:
                src = conn.exec_driver_sql(
                    "SELECT width, height, format, taken_at, camera_make, camera_model FROM images "
                    "WHERE content_hash=? AND embedding IS NOT NULL LIMIT 1",
                    (digest,),
                ).first()
                values = {
                    "root_id": job.root_id, "relpath": job.relpath, "size": job.size,
                    "mtime_ns": job.mtime_ns, "content_hash": digest, "error": None, "embedding": emb,
                    **(dict(src._mapping) if src is not None else {}),
                }  # fmt: skip
                store.upsert_image(conn, values, job.row_id)
                report.reused += 1
                if job.row_id is None:
                    report.added += 1
                else:
                    report.updated += 1
            else:
                to_decode.append(job)
        # 3. Deleted files (those not claimed by a move).
        store.delete_images(conn, [row[0] for row in gone.values()])
        report.removed = len(gone)
    return to_decode


def reindex(index: str | os.PathLike[str], kind: str = "auto") -> dict[str, Any]:
    """Rebuild the FAISS file of an index from its stored embeddings (no model run); returns its info."""
    if kind not in faiss_index.INDEX_KINDS:
        raise RuclipSearchError(f"Unknown index type {kind!r}: use one of {', '.join(faiss_index.INDEX_KINDS)}.")
    with IndexLock(index):
        store = Store.open(index, readonly=False)
        try:
            info = write_faiss(store, kind)
            if info is None:
                raise RuclipSearchError(f"Index {os.fspath(index)!r} holds no embeddings yet: build it first.")
            return info
        finally:
            store.close()
