"""The search page (/) and its two static files; none of it is in the OpenAPI schema."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip


@cache
def _static(name: str) -> bytes:
    return (resources.files("ruclip_search") / "static" / name).read_bytes()


@router.get("/")
def home() -> HTMLResponse:
    return HTMLResponse(_static("index.html"), headers={"Content-Security-Policy": _CSP})


def _asset(name: str) -> None:
    """One fixed route per file: no path parameter, so nothing in a URL can name another file."""
    media = _TYPES[name.rsplit(".", 1)[1]]

    @router.get(f"/static/{name}", name=f"static_{name}")
    def asset() -> Response:
        return Response(_static(name), media_type=media, headers={"Cache-Control": "no-cache"})


for _name in ("app.js", "style.css"):
    _asset(_name)
