"""`create_app`: open the indexes, build the ServerState, assemble routers, error handlers and middleware."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .. import __version__
from ..defaults import REFRESH_INTERVAL, THUMB_CACHE_BYTES, UPLOAD_MAX_BYTES, UPLOAD_MAX_PIXELS
from ..encoder import ModelCache
from .errors import install_error_handlers
from .fastpath import WriteFastPath
from .routes import images, meta, photos, search, web
from .state import ServerState, open_indexes
from .thumbnails import ThumbCache
from .uploads import MULTIPART_SLACK, UploadLimit


class RuclipApp(FastAPI):
    """FastAPI with the hot writes' handler (server/fastpath.py) in front of its whole middleware stack: each
    request meets it first, and what it does not answer goes through FastAPI as before. Setting
    `write_fast_path` to None serves every request through FastAPI (the tests compare the two)."""

    write_fast_path: WriteFastPath | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.write_fast_path is None:
            await super().__call__(scope, receive, send)
        else:
            await self.write_fast_path(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    for s in app.state.server.served.values():  # started here, on the server's own thread (see server/writer.py)
        if s.writer is not None:
            await s.writer.start()
    yield
    app.state.server.close()


def create_app(
    index_dirs: Sequence[str | os.PathLike[str] | Any],
    *,
    token: str | None = None,
    cors_origins: Iterable[str] = (),
    max_upload_bytes: int = UPLOAD_MAX_BYTES,
    max_pixels: int = UPLOAD_MAX_PIXELS,
    model: Any = None,
    device: str = "auto",
    refresh_interval: float = REFRESH_INTERVAL,
    thumbnail_cache_bytes: int = THUMB_CACHE_BYTES,
    write_token: str | None = None,
    allow_roots: Iterable[str | os.PathLike[str]] = (),
    db: str | Sequence[str | None] | None = None,
    writer_process: bool = False,
) -> RuclipApp:
    """The FastAPI app serving `index_dirs` (folders, or already opened `Index` objects); the first is default.

    Indexes are opened now, so a missing or unbuilt index fails here (IndexNotFoundError), not per request.
    `max_upload_bytes`/`max_pixels` cap uploaded query images; one text model per model name is shared by
    all indexes. `write_token` enables PUT/DELETE /photos (the folders are then opened writable; without it
    every write answers 403 `writes_disabled`); `allow_roots` are the folders whose files a PUT may name by
    path (symlinks resolved; none: only uploads and embeddings). `db`: PostgreSQL URL(s) of the indexes whose
    metadata lives there (one per folder, or one for the only folder). `writer_process`: with a write token,
    commit PUT (JSON embedding) and DELETE /photos in a writer process per index (priority WRITER_PRIORITY), so
    that writes take no CPU time from this process's searches (server/writer.py).
    """
    roots = tuple(Path(os.path.realpath(r)) for r in allow_roots)
    models = ModelCache(device)
    served = open_indexes(index_dirs, model=model, device=device, models=models, refresh_interval=refresh_interval,
                          writable=write_token is not None, db=db)  # fmt: skip
    app = RuclipApp(
        title="ruclip-search",
        version=__version__,
        description="Find photos by a Russian sentence (RuCLIP + FAISS). Errors are JSON: "
        '`{"detail": ..., "code": ...}`; parameter errors are 422 with a list of problems.',
        lifespan=_lifespan,
    )
    app.state.server = ServerState(
        served=served, models=models, thumbs=ThumbCache(thumbnail_cache_bytes), token=token,
        max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, write_token=write_token, allow_roots=roots,
        writer_process=writer_process,
    )  # fmt: skip
    for module in (meta, search, images, photos, web):
        app.include_router(module.router)
    install_error_handlers(app)
    if cors := list(cors_origins):
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.add_middleware(UploadLimit, limit=max_upload_bytes + MULTIPART_SLACK)
    app.write_fast_path = WriteFastPath(partial(FastAPI.__call__, app), server=app,
                                        limit=max_upload_bytes + MULTIPART_SLACK)  # fmt: skip
    return app


__all__ = ["RuclipApp", "create_app"]
