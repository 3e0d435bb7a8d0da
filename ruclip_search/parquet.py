"""Embeddings in and out as Parquet, streamed in bounded memory (one row group / one shard at a time).

`export_index` writes an index's embedded photos as Parquet shards (key, path, collection, labels, metadata,
embedding) and/or in clip-retrieval's layout (`img_emb/img_emb_N.npy` + `metadata/metadata_N.parquet`, rows
aligned), which autofaiss and clip-retrieval read. `import_shards` loads shards (ours, or any with a `key`
and an `embedding` column, e.g. written by a Ray job elsewhere) into an index by key, with the online store's
checks on every row; a shard with one bad row writes nothing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import defaults
from .errors import ModelMismatchError, QueryError, RuclipSearchError
from .filters import parse_when, validate_key, validate_name
from .loader import FileMeta
from .store import META_COLUMNS, IndexLock, PhotoWrite, Store, encode_embedding

INSTALL_HINT = "Parquet export and import need pyarrow: pip install 'ruclip-search[parquet]'"
MODEL_META, DIM_META = b"ruclip_search.model", b"ruclip_search.dim"  # Parquet schema metadata keys
ROW_GROUP = 10_000  # rows read from the store, written as one row group, and read back per import batch
#: A vector whose norm is this close to 1 is kept as given: float16 storage moves a unit vector's norm by
#: < 5e-4, so export -> import is lossless; anything else is normalised as Index.add does.
UNIT_TOLERANCE = 1e-3


def _pa() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuclipSearchError(f"{INSTALL_HINT} ({e}).") from e
    return pa, pq


def _schema(pa: Any, dim: int, model: str | None) -> Any:
    meta = pa.struct(
        [("width", pa.int32()), ("height", pa.int32())] + [(c, pa.string()) for c in META_COLUMNS[2:]]
    )  # fmt: skip
    fields = [
        ("key", pa.string()), ("path", pa.string()), ("collection", pa.string()), ("labels", pa.list_(pa.string())),
        ("metadata", meta), ("embedding", pa.list_(pa.float32(), dim)),
    ]  # fmt: skip
    return pa.schema(fields, metadata={MODEL_META: (model or "").encode(), DIM_META: str(dim).encode()})


def _chunks(store: Store) -> Iterator[tuple[list[Any], np.ndarray]]:
    """(records, float32 vectors) of every embedded photo in id order, ROW_GROUP at a time."""
    for ids, vecs in store.iter_embeddings(batch=ROW_GROUP):
        records = store.get_images(ids.tolist())
        keep = [k for k, i in enumerate(ids.tolist()) if i in records]  # deleted between the two reads
        yield [records[int(ids[k])] for k in keep], vecs[keep]


def _empty_dir(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise RuclipSearchError(f"{str(folder)!r} is not empty: export into a new or empty folder.")
    folder.mkdir(parents=True, exist_ok=True)


def export_index(index: str | os.PathLike[str], parquet_dir: str | os.PathLike[str] | None = None,
                 clip_retrieval_dir: str | os.PathLike[str] | None = None,
                 shard_rows: int = defaults.EXPORT_SHARD_ROWS, db: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the index's embedded photos as Parquet shards and/or clip-retrieval's layout; returns counts.

    `db`: the index's PostgreSQL URL when its metadata lives there (None: the index folder's SQLite file).

    Memory: one row group (ROW_GROUP rows) plus, for clip-retrieval's .npy files, one shard of float16
    vectors (`shard_rows` x dim x 2 bytes).
    """
    if parquet_dir is None and clip_retrieval_dir is None:
        raise RuclipSearchError("Nothing to export to: give a Parquet folder, a clip-retrieval folder, or both.")
    pa, pq = _pa()
    shard_rows = max(1, int(shard_rows))
    t0 = time.perf_counter()
    with Store.open(index, db=db) as store:
        dim, model = store.dim, store.model_name
        if dim is None:
            raise RuclipSearchError(f"Index {os.fspath(index)!r} holds no embeddings yet: build it first.")
        total = store.counts()["images"]
        digits = int(math.log10(max(1, math.ceil(total / shard_rows)))) + 1  # clip-retrieval zero-pads shard ids
        for folder in (parquet_dir, clip_retrieval_dir):
            if folder is not None:
                _empty_dir(Path(folder))
        if clip_retrieval_dir is not None:
            for sub in ("img_emb", "metadata"):
                (Path(clip_retrieval_dir) / sub).mkdir()
        schema = _schema(pa, dim, model)
        writer = cr_writer = None
        cr_emb = np.empty((shard_rows, dim), dtype=np.float16) if clip_retrieval_dir is not None else None
        rows = in_shard = shard = 0

        def close_shard() -> None:
            nonlocal writer, cr_writer
            if writer is not None:
                writer.close()
            if cr_writer is not None:
                cr_writer.close()
                np.save(Path(clip_retrieval_dir) / "img_emb" / f"img_emb_{shard:0{digits}d}.npy", cr_emb[:in_shard])
            writer = cr_writer = None

        try:
            for records, vecs in _chunks(store):
                start = 0
                while start < len(records):
                    if in_shard == shard_rows:
                        close_shard()
                        shard, in_shard = shard + 1, 0
                    take = min(len(records) - start, shard_rows - in_shard)
                    recs, vv = records[start : start + take], vecs[start : start + take]
                    table = _table(pa, schema, recs, vv)
                    if parquet_dir is not None:
                        if writer is None:
                            writer = pq.ParquetWriter(Path(parquet_dir) / f"part-{shard:05d}.parquet", schema)
                        writer.write_table(table)
                    if clip_retrieval_dir is not None:
                        flat = _clip_retrieval_table(pa, table)
                        if cr_writer is None:
                            path = Path(clip_retrieval_dir) / "metadata" / f"metadata_{shard:0{digits}d}.parquet"
                            cr_writer = pq.ParquetWriter(path, flat.schema)
                        cr_writer.write_table(flat)
                        cr_emb[in_shard : in_shard + take] = vv  # float32 from float16: exact both ways
                    in_shard += take
                    rows += take
                    start += take
        finally:
            close_shard()
    return {"index": os.fspath(index), "rows": rows, "shards": shard + 1 if rows else 0, "dim": dim, "model": model,
            "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip


def _table(pa: Any, schema: Any, records: list[Any], vecs: np.ndarray) -> Any:
    n, dim = len(records), vecs.shape[1]
    meta = {c: [getattr(r, c) for r in records] for c in META_COLUMNS}
    columns = [
        pa.array([r.key for r in records], pa.string()),
        pa.array([r.path or None for r in records], pa.string()),
        pa.array([r.collection for r in records], pa.string()),
        pa.array([list(r.labels) for r in records], pa.list_(pa.string())),
        pa.StructArray.from_arrays(
            [pa.array(meta[c], schema.field("metadata").type.field(c).type) for c in META_COLUMNS],
            names=list(META_COLUMNS),
        ),
        pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vecs, np.float32).reshape(n * dim)), dim),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _clip_retrieval_table(pa: Any, table: Any) -> Any:
    """clip-retrieval's metadata rows: `image_path` first, then the other columns flattened (no embedding)."""
    path = table.column("path").to_pylist()
    keys = table.column("key").to_pylist()
    cols = {"image_path": pa.array([p or k for p, k in zip(path, keys, strict=True)], pa.string())}
    for name in ("key", "collection", "labels"):
        cols[name] = table.column(name)
    meta = table.column("metadata").combine_chunks()
    for c in META_COLUMNS:
        cols[c] = meta.field(c)
    return pa.table(cols)


# -- import ----------------------------------------------------------------------------------------------
def _shard_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise RuclipSearchError(f"No such file or folder: {str(source)!r}.")
    files = sorted(p for p in source.rglob("*.parquet") if p.is_file())
    if not files:
        raise RuclipSearchError(f"No .parquet files under {str(source)!r}: give the folder `export --parquet` wrote.")
    return files


def _shard_dim(pq: Any, path: Path) -> tuple[int | None, str | None]:
    """(dim, model) a shard declares (schema metadata, or a fixed-size list's size), else (None, None)."""
    schema = pq.read_schema(path)
    names = schema.names
    for col in ("key", "embedding"):
        if col not in names:
            raise QueryError(f"{str(path)!r} has no {col!r} column (it has {', '.join(names)}): each row needs a "
                             "key and an embedding.")  # fmt: skip
    meta = schema.metadata or {}
    model = meta.get(MODEL_META, b"").decode() or None
    etype = schema.field("embedding").type
    dim = getattr(etype, "list_size", None)
    if dim is None and DIM_META in meta:
        dim = int(meta[DIM_META])
    return dim, model


def _vectors(pa: Any, col: Any, dim: int, where: str) -> np.ndarray:
    """An embedding column as (n, dim) float32 (fixed-size or variable lists of floats); QueryError if not."""
    import pyarrow.compute as pc

    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
        raise QueryError(f"{where}: the embedding column is {arr.type}, not a list of numbers.")
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise QueryError(f"{where}, row {row}: the embedding is missing.")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != dim)
    if bad.size:
        raise QueryError(
            f"{where}, row {int(bad[0])}: the embedding has {int(lengths[bad[0]])} numbers but this index holds "
            f"{dim}-d embeddings: import vectors made by the index's model."
        )
    values = arr.flatten()
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)) or values.null_count:
        raise QueryError(f"{where}: embeddings must be numbers without nulls, got {values.type}.")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), dim)


def _checked(vecs: np.ndarray, where: str, first_row: int) -> np.ndarray:
    """Index.add's checks on given embeddings (finite, not zero), normalised unless already unit length."""
    finite = np.isfinite(vecs).all(axis=1)
    if not finite.all():
        row = first_row + int(np.flatnonzero(~finite)[0])
        raise QueryError(f"{where}, row {row}: the embedding holds NaN or infinite values.")
    norms = np.linalg.norm(vecs, axis=1)
    if (norms < 1e-12).any():
        raise QueryError(
            f"{where}, row {first_row + int(np.flatnonzero(norms < 1e-12)[0])}: the embedding is all zeros."
        )
    scale = np.where(np.abs(norms - 1.0) > UNIT_TOLERANCE, norms, 1.0).astype(np.float32)
    return vecs / scale[:, None]


def _writes(pa: Any, batch: Any, dim: int, where: str, first_row: int) -> list[PhotoWrite]:
    """A record batch as validated PhotoWrites (QueryError naming the shard and row of the first bad value)."""
    names = batch.schema.names
    vecs = _checked(_vectors(pa, batch.column(names.index("embedding")), dim, where), where, first_row)

    def column(name: str) -> list[Any]:
        return batch.column(names.index(name)).to_pylist() if name in names else [None] * batch.num_rows

    keys, collections, labels, metas = column("key"), column("collection"), column("labels"), column("metadata")
    out = []
    for k in range(batch.num_rows):
        try:
            key = validate_key(keys[k])
            collection = validate_name(collections[k], "collection") if collections[k] is not None else None
            names_k = tuple(sorted({validate_name(v, "label") for v in (labels[k] or ())}))
            m = metas[k] or {}
            taken = m.get("taken_at")
            meta = FileMeta(
                width=m.get("width"), height=m.get("height"), format=m.get("format"),
                taken_at=parse_when(taken).isoformat() if taken else None, camera_make=m.get("camera_make"),
                camera_model=m.get("camera_model"),
            )  # fmt: skip
        except (QueryError, TypeError, AttributeError) as e:
            raise QueryError(f"{where}, row {first_row + k}: {e}") from None
        out.append(PhotoWrite(key, encode_embedding(vecs[k]), meta=meta, collection=collection, labels=names_k))
    return out


def _model_dim(model: Any) -> int:
    """A model's embedding size from its config alone (no weights loaded or downloaded for a known name)."""
    from .model import CLIPConfig, read_config
    from .registry import CONFIGS, resolve

    name = os.fspath(model)
    config = CLIPConfig.from_dict(CONFIGS[name]) if name in CONFIGS else read_config(resolve(model))
    return int(config.embed_dim)


def import_shards(index: str | os.PathLike[str], source: str | os.PathLike[str], model: Any = None,
                  write_index: bool = True, batch: int = ROW_GROUP, db: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Put the rows of Parquet shards into an index by key (added, or replacing the photo with that key).

    Every shard is checked whole before any of its rows is written: a missing or malformed key, collection or
    label, an embedding of the wrong size, NaN or all zeros raises QueryError naming the shard and row, and
    that shard writes nothing (shards before it stay written; importing again is idempotent). A new index
    is bound to `model`, else to the model the shards name. `write_index`: rewrite the FAISS file at the end
    (else searches see the rows through the change log until `compact`). `db`: a PostgreSQL URL for the
    index's metadata (None: SQLite in the index folder).
    """
    from .indexer import model_key, write_faiss

    pa, pq = _pa()
    files = _shard_files(Path(source))
    declared = [_shard_dim(pq, f) for f in files]
    t0 = time.perf_counter()
    rows = 0
    with IndexLock(index, create=True), Store.create(index, db=db) as store:
        name, dim = store.model_name, store.dim
        wanted = model_key(model) if model is not None else None
        shard_models = {m for _, m in declared if m}
        if name and store.has_embeddings():
            if wanted and wanted != name:
                raise ModelMismatchError(f"Index {os.fspath(index)!r} holds embeddings of {name!r}, not {wanted!r}.")
        else:
            name = wanted or name or (shard_models.pop() if len(shard_models) == 1 else None)
            if not name:
                raise RuclipSearchError(
                    f"Index {os.fspath(index)!r} has no model yet and the shards name none (or several): "
                    "pass the model their embeddings were made with (--model)."
                )
            dim = _model_dim(model if model is not None else name)
        for f, (d, m) in zip(files, declared, strict=True):
            if m and m != name:
                raise ModelMismatchError(
                    f"{str(f)!r} holds embeddings of model {m!r}, but index {os.fspath(index)!r} uses {name!r}: "
                    "import into an index of that model."
                )
            if d is not None and d != dim:
                raise QueryError(f"{str(f)!r} holds {d}-d embeddings but the index holds {dim}-d ones.")
        assert dim is not None
        if store.model_name != name or store.dim != dim:
            with store.transaction() as conn:
                store.set_model(conn, name, dim)
            if store.faiss_path() is None:
                write_faiss(store)  # an empty FAISS file, so readers can open the index meanwhile
        for f in files:
            shard = pq.ParquetFile(f)
            where = str(f)
            seen = 0
            for rb in shard.iter_batches(batch_size=batch):  # pass 1: check every row, write nothing
                _writes(pa, rb, dim, where, seen)
                seen += rb.num_rows
            seen = 0
            for rb in shard.iter_batches(batch_size=batch):  # pass 2: write
                store.put_photos(_writes(pa, rb, dim, where, seen))
                seen += rb.num_rows
            rows += seen
        if write_index:
            write_faiss(store)
    return {"index": os.fspath(index), "rows": rows, "shards": len(files), "model": name, "dim": dim,
            "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
