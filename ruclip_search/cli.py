"""`ruclip-index`: the command line. The only module that prints for humans or exits.

Add a command with `@main.command()` and reuse the shared option decorators (`index_option`, ...).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__, defaults
from .errors import RuclipSearchError
from .walk import display_path

F = Callable[..., Any]


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a KeyboardInterrupt, so it takes Ctrl-C's clean-up path (the
    current batch's transaction rolls back, decoding workers are stopped, committed batches are kept)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


class _Group(click.Group):
    """Turns library errors (and Ctrl-C, SIGTERM, disk full) into one-line messages and non-zero exits."""

    def invoke(self, ctx: click.Context) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            return super().invoke(ctx)
        except RuclipSearchError as e:
            _fail(str(e))
        except _Terminated:
            _fail("terminated; what was committed is kept, run the same command again to finish.", 143)
        except KeyboardInterrupt:
            _fail("interrupted; what was committed is kept, run the same command again to finish.", 130)
        except OSError as e:
            _fail(f"{e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}.")
        finally:
            if old_sigterm is not None:  # None: not in the main thread, or a handler Python did not install
                signal.signal(signal.SIGTERM, old_sigterm)


# -- shared options ----------------------------------------------------------------------------------
def index_option(required: bool = False) -> Callable[[F], F]:
    """--index DIR (default: chosen by the command, e.g. indexes/<first photos folder> for build)."""
    return click.option(
        "--index",
        "index",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        required=required,
        help="Index folder (default: indexes/<name of the first PHOTOS_DIR>, or the only index there).",
    )


DB_HELP = (
    "PostgreSQL URL of the index's metadata, e.g. postgresql+psycopg://user@host/dbname (also read from "
    "RUCLIP_SEARCH_DB); the index folder then holds only the FAISS files. Default: index.db in the index folder."
)


def db_option(f: F) -> F:
    """--db URL (env RUCLIP_SEARCH_DB): one PostgreSQL database per index."""
    return click.option("--db", "db", default=None, metavar="URL", envvar="RUCLIP_SEARCH_DB", help=DB_HELP)(f)


def model_option(f: F) -> F:
    return click.option(
        "--model",
        default=None,
        help=f"Model name or folder (default: the index's model, else {defaults.MODEL}).",
    )(f)


def device_option(f: F) -> F:
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(f)


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")(f)


def index_type_option(default: str | None) -> Callable[[F], F]:
    return click.option(
        "--type",
        "index_type",
        type=click.Choice(defaults.INDEX_TYPES),
        default=default,
        show_default=default is not None,
        help="FAISS index type: auto is exact below 50k images, else ANN with recall@10 >= 0.95.",
    )


def _size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from .faiss_index import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def memory_budget_option(f: F) -> F:
    return click.option(
        "--memory-budget", callback=_size, default=None, metavar="SIZE",
        help=f"RAM the FAISS index may take, e.g. 2G or 500M (default: the index's, else "
        f"{defaults.MEMORY_BUDGET // 1024**3}G): `auto` keeps full vectors (IVF-Flat) while they fit, "
        "compressed IVF-PQ codes re-ranked on the stored vectors beyond.",
    )(f)  # fmt: skip


def resolve_index(index: Path | None, db: str | None = None) -> Path:
    """The --index given, else the only index under ./indexes (for commands that read an index; with --db,
    the only folder there)."""
    if index is not None:
        return index
    if db is not None:
        found = sorted(p for p in Path("indexes").glob("*") if p.is_dir())
    else:
        found = sorted(p.parent for p in Path("indexes").glob("*/index.db"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise RuclipSearchError("No index found under ./indexes: build one with `ruclip-index build PHOTOS_DIR`.")
    names = ", ".join(str(p) for p in found)
    raise RuclipSearchError(f"Several indexes under ./indexes ({names}): choose one with --index.")


# -- progress ----------------------------------------------------------------------------------------
class _Progress:
    """Renders the library's progress callbacks: tqdm on a terminal, plain log lines otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last_logged = -1
        self.log = logging.getLogger("ruclip_search")

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        if stage == "encode":
            if self.tty:
                if self.bar is None:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, unit="img", desc="indexing", file=sys.stderr)
                self.bar.update(done - self.bar.n)
            elif done == total or done - self.last_logged >= max(100, (total or 0) // 20):
                self.last_logged = done
                click.echo(f"indexing: {done}/{total} images", err=True)
        elif stage == "scan" and total is not None:
            click.echo(f"scanned {done} files", err=True)
        elif stage == "index" and done == 0:
            self.close()
            click.echo("writing the FAISS index", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- commands ----------------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ruclip-index")
def main() -> None:
    """Find photos by a Russian sentence: RuCLIP embeddings in a FAISS index with SQLite metadata."""


@main.command()
@click.argument("photos_dir", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option()
@model_option
@device_option
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help=f"Images per model batch [default: {defaults.GPU_BATCH_SIZE} on a GPU, {defaults.CPU_BATCH_SIZE} on the CPU].",
)
@click.option("--workers", type=click.IntRange(0), default=None, help="Decoding processes (default: CPUs - 1).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files or folders matching GLOB (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loops are detected).")
@click.option("--max-pixels", type=click.IntRange(1), default=defaults.MAX_PIXELS, show_default=True,
              help="Skip images larger than this (pixels).")  # fmt: skip
@click.option("--rebuild", is_flag=True,
              help="Re-encode everything into a new index that replaces the old one when complete (searches "
                   "use the old one until then; needed to switch models). Keeps the index's model unless "
                   "--model says otherwise; folders not named in this run are dropped from the index.")  # fmt: skip
@index_type_option(None)
@memory_budget_option
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[auto|local|ADDRESS]",
              help="Decode and encode on a Ray cluster (pip install 'ruclip-search[ray]'): bare --ray joins a "
                   "running cluster or starts one here; auto: a running one only; local: a new one on this "
                   "machine; or HOST:PORT. Paths must be readable on every node.")  # fmt: skip
@click.option("--ray-actors", type=click.IntRange(1), default=None,
              help="Encoder actors with --ray [default: one per GPU, else half the CPUs].")  # fmt: skip
@click.option("--decode", type=click.Choice(defaults.DECODE_MODES), default=defaults.DECODE, show_default=True,
              help="gpu: decode JPEGs on the model's GPU (nvJPEG; other files still on the CPU); cpu: all on the "
                   "CPU; auto: gpu when the model is on a GPU with nvJPEG.")  # fmt: skip
@db_option
@quiet_option
@json_option
def build(
    photos_dir: tuple[Path, ...],
    index: Path | None,
    model: str | None,
    device: str,
    batch_size: int | None,
    workers: int | None,
    exclude: tuple[str, ...],
    follow_symlinks: bool,
    max_pixels: int | None,
    rebuild: bool,
    index_type: str | None,
    memory_budget: int | None,
    ray_address: str | None,
    ray_actors: int | None,
    decode: str,
    db: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Index PHOTOS_DIR... (new and changed files only; safe to interrupt and re-run).

    Examples:

    \b
      ruclip-index build ~/Pictures
      ruclip-index build ./photos ./phone --index indexes/all --exclude '*/.thumbnails/*'
      ruclip-index build ./photos --model ruclip-vit-base-patch32-224 --rebuild
      ruclip-index build /shared/photos --ray head-node:6379
      ruclip-index build ./photos --index indexes/photos --db postgresql+psycopg://me@dbhost/photos
    """
    from .indexer import build as run_build

    progress = _Progress(quiet or as_json)
    try:
        report = run_build(
            list(photos_dir), index=index, model=model, device=device, batch_size=batch_size, workers=workers,
            exclude=exclude, follow_symlinks=follow_symlinks, max_pixels=max_pixels,
            rebuild=rebuild, index_type=index_type, progress=progress, db=db, memory_budget=memory_budget,
            engine="ray" if ray_address is not None else "local", ray_address=ray_address or None,
            ray_actors=ray_actors, decode=decode,
        )  # fmt: skip
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    elif not quiet:
        click.echo(
            f"{report.added} added, {report.updated} updated, {report.moved} moved, {report.removed} removed, "
            f"{report.unchanged} unchanged, {report.failed} failed in {report.seconds:.1f} s "
            f"({report.images_per_s:.1f} images/s) -> {report.index}"
        )
        if report.failed:
            click.echo(f"see the failures with: ruclip-index info --errors --index {report.index}", err=True)


@main.command()
@index_option()
@db_option
@click.option("--errors", "show_errors", is_flag=True, help="List files that could not be indexed, with reasons.")
@json_option
def info(index: Path | None, db: str | None, show_errors: bool, as_json: bool) -> None:
    """Show an index: images, errors, model, index type, dimension, recall@10, size on disk.

    Examples:

    \b
      ruclip-index info
      ruclip-index info --errors --index indexes/photos
      ruclip-index info --json
    """
    from .store import Store

    with Store.open(resolve_index(index, db), db=db) as store:
        data = store.info()
        errors = [{"path": r.path, "error": r.error} for r in store.iter_images(errors=True)] if show_errors else None
    if as_json:
        if errors is not None:
            data["error_files"] = errors
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    recall = data["recall_at_10"]
    lines = [
        f"index:      {data['index']}",
        f"images:     {data['images']}" + (f" ({data['videos']} videos)" if data.get("videos") else ""),
        *([f"raw pairs:  {data['raw_pairs']} (JPEG indexed, RAW beside it)"] if data.get("raw_pairs") else []),
        *(
            [f"live:       {data['live_photos']} Live Photos (still indexed, video linked)"]
            if data.get("live_photos")
            else []
        ),
        f"errors:     {data['errors']}",
        f"model:      {data['model']}",
        f"dimension:  {data['dim']}",
        f"index type: {data['index_type']} {data['index_params'] or ''}".rstrip(),
        f"recall@10:  {recall if recall is not None else '-'}",
        f"size:       {data['size_bytes'] / 1e6:.1f} MB",
        f"roots:      {', '.join(data['roots'])}",
        *([f"database:   {data['db']}"] if data.get("db") else []),
    ]
    click.echo("\n".join(lines))
    if errors:
        click.echo("")
        for e in errors:
            click.echo(f"{display_path(e['path'])}: {e['error']}")


@main.command()
@index_option()
@index_type_option(defaults.INDEX_TYPE)
@memory_budget_option
@db_option
@quiet_option
@json_option
def reindex(
    index: Path | None, index_type: str, memory_budget: int | None, db: str | None, quiet: bool, as_json: bool
) -> None:
    """Rebuild the FAISS index from the stored embeddings (no model run), e.g. to change its type.

    Examples:

    \b
      ruclip-index reindex --type hnsw
      ruclip-index reindex --type auto --index indexes/photos
    """
    from .indexer import reindex as run_reindex

    result = run_reindex(resolve_index(index, db), index_type, db=db, memory_budget=memory_budget)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    elif not quiet:
        click.echo(
            f"{result['type']} index of {result['n']} vectors, recall@10 {result['recall_at_10']} {result['params']}"
        )


def _counts(report: Any) -> str:
    """The non-zero counts of a BuildReport, e.g. "2 added, 1 removed" ("no change" when none)."""
    names = ("added", "updated", "moved", "removed", "failed")
    parts = [f"{getattr(report, n)} {n}" for n in names if getattr(report, n)]
    return ", ".join(parts) or "no change"


def _watch_reporter(say: Callable[[str], None], err: Callable[[str], None], what: str) -> Callable[[Any], None]:
    """Turns the watcher's WatchEvents into lines: `say` for progress, `err` for problems."""

    def on_event(event: Any) -> None:
        if event.kind == "ready":
            say(f"caught up ({_counts(event.report)}); watching {what}")
        elif event.kind == "batch" and _counts(event.report) != "no change":
            say(f"{_counts(event.report)} ({event.latency_s:.1f} s after the last change)")
        elif event.kind in ("waiting", "error"):
            err(event.message + (" (retrying)" if event.kind == "waiting" else ""))

    return on_event


@main.command()
@click.argument("photos_dir", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option()
@model_option
@device_option
@click.option("--workers", type=click.IntRange(0), default=defaults.WATCH_WORKERS, show_default=True,
              help="Decoding processes kept running (0: decode in this process).")  # fmt: skip
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files or folders matching GLOB (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loops are detected).")
@db_option
@quiet_option
def watch(photos_dir: tuple[Path, ...], index: Path | None, model: str | None, device: str, workers: int,
          exclude: tuple[str, ...], follow_symlinks: bool, db: str | None, quiet: bool) -> None:  # fmt: skip
    """Keep the index of PHOTOS_DIR... up to date as files are added, changed, moved or deleted (until Ctrl-C).

    Catches up first (one incremental build), then indexes each file once it has stopped changing for
    half a second, usually within 2 s. Other commands may use the index meanwhile.

    Examples:

    \b
      ruclip-index watch ~/Pictures
      ruclip-index watch ./photos ./phone --index indexes/all --exclude '*/.thumbnails/*'
    """
    from .indexer import default_index_dir
    from .watch import Watcher

    index = index if index is not None else default_index_dir(list(photos_dir))
    stamp = lambda line: click.echo(f"{time.strftime('%H:%M:%S')} {line}")  # noqa: E731
    say = (lambda line: None) if quiet else stamp
    on_event = _watch_reporter(say, lambda line: click.echo(f"warning: {line}", err=True), f"-> {index}")
    progress = _Progress(quiet)
    watcher = Watcher(list(photos_dir), index, model=model, device=device, workers=workers, exclude=exclude,
                      follow_symlinks=follow_symlinks, on_event=on_event, progress=progress, db=db)  # fmt: skip
    try:
        watcher.run()
    except _Terminated:
        raise
    except KeyboardInterrupt:
        _fail("interrupted; stopped watching (what was committed is kept; run it again to catch up and go on).", 130)
    finally:
        progress.close()


@main.command()
@click.option("--index", "indexes", multiple=True, required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index folder to serve (repeatable; the first is the default, pick others with ?index=NAME).")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback only by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--token", envvar="RUCLIP_SEARCH_TOKEN", default=None,
              help="Require `Authorization: Bearer TOKEN` (also read from RUCLIP_SEARCH_TOKEN).")  # fmt: skip
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN to call the API (repeatable; default none).")  # fmt: skip
@click.option("--write-token", envvar="RUCLIP_SEARCH_WRITE_TOKEN", default=None,
              help="Enable PUT/DELETE /photos for requests with `Authorization: Bearer WRITE_TOKEN` (also read "
                   "from RUCLIP_SEARCH_WRITE_TOKEN); without it the server is read-only.")  # fmt: skip
@click.option("--allow-root", "allow_roots", multiple=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder whose image files PUT /photos may name by path (repeatable; default none).")  # fmt: skip
@click.option("--watch", "watch_dirs", multiple=True, metavar="DIR", type=click.Path(path_type=Path),
              help="Keep the first --index up to date with DIR's files as they change (repeatable).")  # fmt: skip
@click.option("--db", "dbs", multiple=True, metavar="URL", envvar="RUCLIP_SEARCH_DB",
              help=DB_HELP + " Repeat it once per --index (in the same order) to serve several.")  # fmt: skip
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="Log every request (a line per write costs CPU under a photo app's write load).",
)
@click.option(
    "--writer-process/--no-writer-process",
    default=True,
    show_default=True,
    help="With --write-token: commit PUT (JSON embedding) and DELETE /photos in a helper process (CPU priority "
    f"RUCLIP_SEARCH_WRITER_NICE: a niceness or `idle`, default {defaults.WRITER_PRIORITY}: Linux's SCHED_IDLE, lifted "
    f"to niceness {defaults.WRITER_NICE} while it starves), so that writes slow the searches less (it exits with "
    "the server).",
)
@model_option
@device_option
def serve(indexes: tuple[Path, ...], host: str, port: int, token: str | None, cors_origins: tuple[str, ...],
          write_token: str | None, allow_roots: tuple[Path, ...], watch_dirs: tuple[Path, ...],
          dbs: tuple[str, ...], access_log: bool, writer_process: bool, model: str | None,
          device: str) -> None:  # fmt: skip
    """Serve indexes over HTTP: JSON API (docs at /docs) and a search page at /.

    Examples:

    \b
      ruclip-index serve --index indexes/photos
      ruclip-index serve --index indexes/photos --index indexes/phone --port 8080 --token s3cret
      ruclip-index serve --index indexes/app --write-token w5ecret --allow-root /srv/uploads
      ruclip-index serve --index indexes/photos --watch ~/Pictures
      ruclip-index serve --index indexes/app --db postgresql+psycopg://me@dbhost/app --port 8001
    """
    from .server import serve as run_server

    if allow_roots and not write_token:
        raise click.BadParameter("--allow-root only matters for writes: add --write-token TOKEN.",
                                 param_hint="'--allow-root'")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    writes = " (writes enabled: PUT/DELETE /photos)" if write_token else ""
    watcher = None
    if watch_dirs:  # caught up before serving (the index may not exist yet), then watched in a background thread
        from .watch import Watcher

        log = logging.getLogger("ruclip_search.watch")
        on_event = _watch_reporter(log.info, log.warning, f"{len(watch_dirs)} folder(s) -> {indexes[0]}")
        watcher = Watcher(list(watch_dirs), indexes[0], model=model, device=device, on_event=on_event,
                          db=dbs[0] if dbs else None)  # fmt: skip
        click.echo(f"catching up with {len(watch_dirs)} folder(s) in {indexes[0]}", err=True)
        watcher.start()
    click.echo(f"serving {len(indexes)} index(es) on http://{host}:{port}/{writes} (API docs at /docs)", err=True)
    try:
        run_server(list(indexes), host=host, port=port, token=token or None, cors_origins=cors_origins, model=model,
                   device=device, write_token=write_token or None, allow_roots=allow_roots,
                   db=list(dbs) if len(dbs) > 1 else (dbs[0] if dbs else None), access_log=access_log,
                   writer_process=writer_process)  # fmt: skip
    finally:
        if watcher is not None:
            watcher.stop()


@main.command()
@click.argument("index_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", default=defaults.MODEL, show_default=True, help="Model name or folder.")
@device_option
@db_option
@json_option
def create(index_dir: Path, model: str, device: str, db: str | None, as_json: bool) -> None:
    """Create an empty index bound to a model, for photos written over HTTP (`serve --write-token`) or the API.

    An existing index of the same model is left as it is; one of another model is an error.

    Examples:

    \b
      ruclip-index create indexes/app
      ruclip-index create indexes/app --model ruclip-vit-base-patch32-224
    """
    from .search import Index

    with Index.create(index_dir, model=model, device=device, db=db) as idx:
        data = idx.info()
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, default=str))
    else:
        click.echo(f"index {index_dir}: {data['images']} images, model {data['model']} ({data['dim']}-d)")


@main.command()
@index_option()
@memory_budget_option
@db_option
@quiet_option
@json_option
def compact(index: Path | None, memory_budget: int | None, db: str | None, quiet: bool, as_json: bool) -> None:
    """Fold every write into the FAISS file (searches go on meanwhile): added to the trained index, which is
    rebuilt only once the collection has outgrown its training.

    Writable indexes compact by themselves past a size; run this after many writes, e.g. nightly.

    Examples:

    \b
      ruclip-index compact --index indexes/app
      ruclip-index compact --json
    """
    from .search import Index

    with Index.open(resolve_index(index, db), writable=True, db=db) as idx:
        result = idx.compact(memory_budget=memory_budget)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, default=str))
    elif not quiet:
        click.echo(_compacted(result))


def _compacted(info: dict[str, Any]) -> str:
    """One line about a compaction, e.g. "folded 50 writes into the ivf index (1250 vectors, not retrained),
    recall@10 0.97 (held-out queries 0.96), 0.42 s"."""
    retrained = "retrained" if info.get("retrained") else "not retrained"
    held_out = f" (held-out queries {info['probe_recall']})" if info.get("probe_recall") is not None else ""
    return (
        f"folded {info['folded']} writes into the {info['type']} index ({info['n']} vectors, {retrained}), "
        f"recall@10 {info['recall_at_10']}{held_out}, {info['seconds']} s"
    )


@main.command("export")
@index_option()
@click.option(
    "--parquet",
    "parquet_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write Parquet shards (key, path, collection, labels, metadata, embedding) into this folder.",
)
@click.option(
    "--clip-retrieval",
    "clip_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write clip-retrieval's layout (img_emb/img_emb_N.npy + metadata/metadata_N.parquet) here.",
)
@click.option(
    "--shard-rows",
    type=click.IntRange(1),
    default=defaults.EXPORT_SHARD_ROWS,
    show_default=True,
    help="Rows per shard.",
)
@db_option
@quiet_option
@json_option
def export(index: Path | None, parquet_dir: Path | None, clip_dir: Path | None, shard_rows: int, db: str | None,
           quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Write the index's embeddings out, streamed shard by shard (pip install 'ruclip-search[parquet]').

    Examples:

    \b
      ruclip-index export --parquet out/parquet --index indexes/photos
      ruclip-index export --clip-retrieval out/embeddings      # for autofaiss / clip-retrieval
    """
    from .parquet import export_index

    if parquet_dir is None and clip_dir is None:
        raise click.UsageError("give --parquet DIR, --clip-retrieval DIR, or both.")
    result = export_index(resolve_index(index, db), parquet_dir, clip_dir, shard_rows=shard_rows, db=db)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    elif not quiet:
        click.echo(f"{result['rows']} photos in {result['shards']} shards in {result['seconds']:.1f} s")


@main.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@index_option(required=True)
@click.option("--model", default=None, help="For a new index: the model the embeddings were made with "
                                            "(default: the one the shards name).")  # fmt: skip
@click.option(
    "--no-reindex",
    is_flag=True,
    help="Leave the FAISS file as it is (searches see the rows meanwhile; run `compact` later).",
)
@db_option
@quiet_option
@json_option
def import_(source: Path, index: Path, model: str | None, no_reindex: bool, db: str | None, quiet: bool,
            as_json: bool) -> None:  # fmt: skip
    """Put the photos of Parquet shards (a `key` and an `embedding` column each) into an index, by key.

    Each shard is checked whole first; one with a bad row writes nothing. Importing again is safe.

    Examples:

    \b
      ruclip-index import out/parquet --index indexes/app
      ruclip-index import ray-output/ --index indexes/new --model ruclip-vit-large-patch14-224
    """
    from .parquet import import_shards

    result = import_shards(index, source, model=model, write_index=not no_reindex, db=db)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    elif not quiet:
        click.echo(f"{result['rows']} photos from {result['shards']} shards in {result['seconds']:.1f} s -> {index}")


# -- search commands (search, similar, classify, dupes) ----------------------------------------------
def filter_options(f: F) -> F:
    """Shared result options: -k, --offset, and the filters --min-score, --under, --from, --to, --format."""
    for option in reversed([
        click.option("-k", "k", type=click.IntRange(1), default=defaults.K, show_default=True, help="How many results."),
        click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many first."),
        click.option("--min-score", type=float, default=None, help="Drop results below this cosine similarity."),
        click.option("--under", type=click.Path(path_type=Path), default=None, help="Only photos under this folder."),
        click.option("--from", "date_from", metavar="DATE", default=None,
                     help="Only photos taken on/after DATE (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)."),
        click.option("--to", "date_to", metavar="DATE", default=None,
                     help="Only photos taken on/before DATE (a bare date includes that day)."),
        click.option("--format", "formats", multiple=True, metavar="FMT", help="Only this format, e.g. JPEG (repeatable)."),
        click.option("--media", type=click.Choice(["photo", "video"]), default=None,
                     help="Only photos (RAW pairs and Live Photos too) or only videos."),
    ]):  # fmt: skip
        f = option(f)
    return f


def _search_filters(
    under: Path | None,
    date_from: str | None,
    date_to: str | None,
    formats: tuple[str, ...],
    min_score: float | None,
    media: str | None = None,
) -> Any:
    """The filter options as one SearchFilters; a bad value is a usage error naming its option."""
    from .errors import QueryError
    from .filters import SearchFilters

    given = {"under": under, "date_from": date_from, "date_to": date_to, "formats": formats or None,
             "min_score": min_score, "media": media}  # fmt: skip
    try:
        return SearchFilters.parse(**given)
    except QueryError as e:
        options = {"under": "--under", "date_from": "--from", "date_to": "--to", "formats": "--format",
                   "min_score": "--min-score"}  # fmt: skip
        for key, option in options.items():  # which option was it? (only on this error path)
            try:
                SearchFilters.parse(**{key: given[key]})
            except QueryError as one:
                raise click.BadParameter(str(one), param_hint=f"'{option}'") from None
        raise click.BadParameter(str(e)) from None


def _open_index(index: Path | None, device: str = "auto", db: str | None = None) -> Any:
    from .search import Index

    return Index.open(resolve_index(index, db), device=device, db=db)


def _print_hits(hits: list, as_json: bool, offset: int = 0) -> None:
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], ensure_ascii=False))
        return
    if not hits:
        click.echo("no matches", err=True)
        return
    width = len(str(offset + len(hits)))
    for rank, h in enumerate(hits, offset + 1):
        at = f"  (t={h.t:g} s)" if getattr(h, "t", None) is not None else ""
        click.echo(f"{rank:>{width}}  {h.score:7.4f}  {display_path(h.path)}{at}")


@main.command()
@click.argument("query", required=False)
@index_option()
@filter_options
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Add an image as a query term (repeatable).",
)
@click.option("--minus", multiple=True, metavar="TEXT", help="Push results away from TEXT (repeatable).")
@click.option("--minus-weight", type=float, default=defaults.MINUS_WEIGHT, show_default=True,
              help="Weight of each --minus term.")  # fmt: skip
@device_option
@db_option
@json_option
def search(query: str | None, index: Path | None, k: int, offset: int, min_score: float | None, under: Path | None,
           date_from: str | None, date_to: str | None, formats: tuple[str, ...], media: str | None,
           images: tuple[Path, ...], minus: tuple[str, ...], minus_weight: float, device: str, db: str | None,
           as_json: bool) -> None:  # fmt: skip
    """Find photos matching QUERY (Russian text), optionally mixed with --image and --minus terms.

    Examples:

    \b
      ruclip-index search "рыжий кот спит на диване"
      ruclip-index search "кот" --minus "собака" -k 50 --from 2023-01-01
      ruclip-index search "море" --image beach.jpg --json
      ruclip-index search "салют" --media video
    """
    from .errors import QueryError

    if (query is None or not query.strip()) and not images:
        raise QueryError("The query is empty: type what to look for, e.g. ruclip-index search 'кот на диване'.")
    filters = _search_filters(under, date_from, date_to, formats, min_score, media)
    idx = _open_index(index, device, db)
    try:
        for text in [query or "", *minus]:
            if text and idx.truncated(text):
                click.echo(
                    f"warning: the query is longer than the model's {idx.model.context_length - 2} tokens; "
                    "its end is ignored.", err=True,
                )  # fmt: skip
        terms: list[Any] = [query] if query and query.strip() else []
        terms += list(images) + [(m, -abs(minus_weight)) for m in minus]
        q = terms[0] if len(terms) == 1 else terms
        hits = idx.search(q, k=k, offset=offset, filters=filters)
    finally:
        idx.close()
    _print_hits(hits, as_json, offset)


@main.command()
@click.argument("photo", type=click.Path(path_type=Path))
@index_option()
@filter_options
@device_option
@db_option
@json_option
def similar(photo: Path, index: Path | None, k: int, offset: int, min_score: float | None, under: Path | None,
            date_from: str | None, date_to: str | None, formats: tuple[str, ...], media: str | None, device: str,
            db: str | None,
            as_json: bool) -> None:  # fmt: skip
    """Find photos like PHOTO (an indexed photo: itself excluded; any other picture: searched by its pixels).

    Examples:

    \b
      ruclip-index similar ./photos/cat.jpg
      ruclip-index similar ~/Downloads/example.jpg -k 5
    """
    filters = _search_filters(under, date_from, date_to, formats, min_score, media)
    idx = _open_index(index, device, db)
    try:
        if idx.store.find_path(photo) is not None:
            hits = idx.similar(photo, k=k, offset=offset, filters=filters)
        else:
            hits = idx.search_image(photo, k=k, offset=offset, filters=filters)
    finally:
        idx.close()
    _print_hits(hits, as_json, offset)


@main.command()
@click.argument("labels", nargs=-1, required=True)
@index_option()
@click.option("--template", "templates", multiple=True, help="Prompt template with {} for the label (repeatable).")
@device_option
@db_option
@json_option
def classify(
    labels: tuple[str, ...], index: Path | None, templates: tuple[str, ...], device: str, db: str | None, as_json: bool
) -> None:
    """Tag every indexed photo with the best of LABEL... (zero-shot, averaged over prompt templates).

    Examples:

    \b
      ruclip-index classify кошка собака пейзаж портрет
      ruclip-index classify закат рассвет --json
    """
    idx = _open_index(index, device, db)
    try:
        result = idx.classify(list(labels), list(templates) or None)
    finally:
        idx.close()
    if as_json:
        click.echo(json.dumps([{"path": p, "label": lab, "score": round(s, 6)} for p, lab, s in result],
                              ensure_ascii=False))  # fmt: skip
        return
    width = max((len(lab) for _, lab, _ in result), default=0)
    for path, label, score in result:
        click.echo(f"{label:<{width}}  {score:7.4f}  {display_path(path)}")


@main.command()
@index_option()
@click.option("--threshold", type=click.FloatRange(-1, 1), default=defaults.DUPLICATE_THRESHOLD, show_default=True,
              help="Cosine similarity above which two photos count as near-duplicates.")  # fmt: skip
@db_option
@json_option
def dupes(index: Path | None, threshold: float, db: str | None, as_json: bool) -> None:
    """List groups of near-duplicate photos (from the stored embeddings; no model is run).

    Examples:

    \b
      ruclip-index dupes
      ruclip-index dupes --threshold 0.98 --json
    """
    from .search import find_duplicates
    from .store import Store

    with Store.open(resolve_index(index, db), db=db) as store:
        result = find_duplicates(store, threshold)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    if not result:
        click.echo("no near-duplicates", err=True)
    for n, group in enumerate(result, 1):
        click.echo(f"group {n} ({len(group)} photos)")
        for path in group:
            click.echo(f"  {display_path(path)}")


@main.command()
@click.option("--from", "source", required=True, metavar="DIR|URL",
              help="The index to copy: an SQLite index folder, or a PostgreSQL URL.")  # fmt: skip
@click.option("--index", "index", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The folder of the copy's FAISS files (default: the --from folder); from PostgreSQL, the new "
                   "SQLite index folder.")  # fmt: skip
@click.option("--db", "db", default=None, metavar="URL",
              help="The empty PostgreSQL database to copy into (not read from RUCLIP_SEARCH_DB: name it).")  # fmt: skip
@quiet_option
@json_option
def migrate(source: str, index: Path | None, db: str | None, quiet: bool, as_json: bool) -> None:
    """Copy an index between SQLite and PostgreSQL (ids, embeddings, labels, change log; FAISS files kept).

    The source stays as it was; searches and writes may go on while it is copied (the copy is a snapshot).

    Examples:

    \b
      ruclip-index migrate --from indexes/photos --db postgresql+psycopg://me@dbhost/photos
      ruclip-index migrate --from postgresql+psycopg://me@dbhost/photos --index indexes/photos-local
    """
    from .indexer import migrate as run_migrate

    def progress(table: str, rows: int) -> None:
        if not quiet and not as_json and rows % 50_000 == 0:
            click.echo(f"{table}: {rows} rows", err=True)

    result = run_migrate(source, index=index, db=db, progress=progress)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    elif not quiet:
        copied = ", ".join(f"{n} {t}" for t, n in result["copied"].items())
        where = f"database {result['db']} (FAISS files in {result['index']})" if result["db"] else result["index"]
        click.echo(f"copied {copied} -> {where}")
        if result["db"] and not source.startswith(("postgres",)):
            click.echo(f"use it with --index {result['index']} --db URL (or RUCLIP_SEARCH_DB); "
                       f"{source}/index.db is no longer read then", err=True)  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    main()
