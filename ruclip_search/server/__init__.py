"""HTTP JSON API and web page over one or more indexes: the backing store for a photo app.

`create_app` builds the FastAPI app (tests drive it with TestClient); `serve` runs it with uvicorn.
Files are only ever read by image id through the index; the only path a request may name is a PUT /photos
file, and only under a folder the server allows (--allow-root). Each index
is refreshed (at most every `refresh_interval` seconds, on the request path) so a finished `ruclip-index
build` is served without a restart; `Index.refresh` swaps versions atomically.

Layout: `app` assembles; `state` holds what an app serves; `deps` the dependencies and parameter types;
`routes/` the endpoints; `schemas` the response models; `writes` parses what PUT /photos sends; `errors`,
`uploads`, `thumbnails`, `results` helpers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from ..defaults import HOST, PORT
from .app import create_app
from .handoff import handoff_protocol
from .schemas import DeletedOut, ErrorOut, HealthOut, HitOut, IndexInfoOut, InfoOut, PhotoIn, SearchOut

log = logging.getLogger("ruclip_search.server")


def serve(
    index_dirs: Sequence[str | os.PathLike[str]],
    *,
    host: str = HOST,
    port: int = PORT,
    token: str | None = None,
    cors_origins: Iterable[str] = (),
    model: Any = None,
    device: str = "auto",
    log_level: str = "info",
    write_token: str | None = None,
    allow_roots: Iterable[str | os.PathLike[str]] = (),
    db: str | Sequence[str | None] | None = None,
    access_log: bool = True,
    writer_process: bool = True,
) -> None:
    """Open the indexes and serve them with uvicorn until interrupted (binds loopback unless told otherwise).

    `write_token` enables PUT/DELETE /photos (indexes open writable); `allow_roots` the folders PUT may name;
    `access_log`: uvicorn's line per request; `writer_process`: commit writes in a writer process (create_app).
    """
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach this port can see your photos", host)
    app = create_app(index_dirs, token=token, cors_origins=cors_origins, model=model, device=device,
                     write_token=write_token, allow_roots=allow_roots, db=db, writer_process=writer_process)  # fmt: skip
    for served in app.state.server.served.values():
        if served.writer is not None:
            served.writer.access_log = access_log
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1, access_log=access_log,
                http=handoff_protocol(partial(_default_writer, app)))  # fmt: skip


def _default_writer(app: Any) -> Any:
    """The default index's writer process, if it runs one: connections writing to it go there (server/handoff)."""
    state = app.state.server
    served = state.served.get(state.default_name)
    return served.writer if served is not None else None


__all__ = [
    "DeletedOut", "ErrorOut", "HealthOut", "HitOut", "IndexInfoOut", "InfoOut", "PhotoIn", "SearchOut", "create_app",
    "serve",
]  # fmt: skip
