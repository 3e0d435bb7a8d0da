"""Connections that a photo app writes on, handed to the index's writer process whole, so that the HTTP work of
its writes stays out of the searching process.

Why: with the writes committed in a writer process (server/writer.py), the server still parsed every PUT, passed
it to the writer and answered it, ~0.4 ms of CPU per write on its event loop, and that work inside the searching
process cost the searches far more than its CPU: at 1M photos on 2 cores, 200 writes/s raised the paced search
p50 by +23-42 %, while the same CPU burnt in another process raised it by +10 % and the same writes made by
another process by +7 % (`scripts/bench_online.py`; the searches waited longer for the GIL and the run queue).

How: uvicorn serves with `handoff_protocol(app)`, its own HTTP protocol with one check in front. On a
connection's first bytes, if they hold the whole head of a `PUT /photos/...` or `DELETE /photos/...`, the
connection's socket is sent to the default index's writer process (SCM_RIGHTS over a Unix socket pair, with the
bytes read so far) and closed here: the writer parses, commits and answers that connection's requests itself.
The writer answers a write only after this process has applied its commit, so a client reads its own writes
here. Anything it does not take (another request on the connection, a body it declines, a wrong token) comes
back the same way, with the bytes it read, and is served here by uvicorn and FastAPI as any other request, so
every error answer and every rule stays FastAPI's. Nothing here is needed for correctness: whenever the writer
is not running, busy, or the bytes are not a plain write, the connection is served here as before.

Why by hand: neither uvicorn nor asyncio moves a live connection between processes; the kernel does (a socket
passed by SCM_RIGHTS is the same connection), and uvicorn takes the connection back through asyncio's
`connect_accepted_socket`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ruclip_search.server")

HANDOFF_MAX = 96 * 1024  # the most bytes a handed connection carries with it (a Unix datagram's bound is ~200 kB)
_WRITES = (b"PUT /photos/", b"DELETE /photos/")


def wants_writer(data: bytes) -> bool:
    """Whether a connection's first bytes are a whole request head of a write the writer process may take."""
    return data.startswith(_WRITES) and len(data) <= HANDOFF_MAX and b"\r\n\r\n" in data


def handoff_protocol(writer_of: Callable[[], Any]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, handing write connections to `writer_of()` (a WriterProcess, or None)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol

    class HandoffProtocol(base):  # type: ignore[misc, valid-type]
        made: tuple[Any, Any, Any] | None = None  # uvicorn's (config, server_state, app_state): for taking back

        def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None,
                     initial: bytes = b"") -> None:  # fmt: skip
            super().__init__(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
            HandoffProtocol.made = (config, server_state, app_state)
            self._initial = initial
            self._routed = bool(initial)  # a connection the writer gave back stays here

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if self._initial:  # before the transport reads anything more (that is scheduled after this call)
                data, self._initial = self._initial, b""
                super().data_received(data)

        def data_received(self, data: bytes) -> None:
            if not self._routed:
                self._routed = True
                writer = writer_of() if wants_writer(data) else None
                if writer is not None and writer.hand_over(self.transport, data, HandoffProtocol.take_back):
                    self.transport.abort()  # closes this process's descriptor only: the writer holds the connection
                    return
            super().data_received(data)

        @classmethod
        def take_back(cls, loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
            """Serve here a connection the writer gave back, starting with the bytes it had read."""
            if cls.made is None:  # pragma: no cover - a connection was handed from here first
                sock.close()
                return
            config, server_state, app_state = cls.made

            def protocol() -> asyncio.Protocol:
                return cls(config, server_state, app_state, initial=data)

            task = loop.create_task(loop.connect_accepted_socket(protocol, sock))
            task.add_done_callback(_log_failure)

    return HandoffProtocol


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a connection given back by the writer process was lost", exc_info=task.exception())


__all__ = ["HANDOFF_MAX", "handoff_protocol", "wants_writer"]
