"""Uploaded query images: a size cap enforced before multipart parsing, and careful decoding."""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

from fastapi import UploadFile

from ..errors import ImageError
from .errors import ApiError

MULTIPART_SLACK = 64 * 1024  # multipart boundaries and headers on top of the file itself


class _BodyTooLarge(Exception):
    pass


class UploadLimit:
    """ASGI middleware: answer 413 for POST bodies above the cap, by Content-Length or while streaming."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_json(send, 413, "upload_too_large", self._message())
                    return
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"]:
                return  # the app's own answer to the aborted body is replaced by our 413
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await _send_json(send, 413, "upload_too_large", self._message())

    def _message(self) -> str:
        return f"Upload larger than {self.limit - MULTIPART_SLACK} bytes: send a smaller image."


async def _send_json(send: Any, status: int, code: str, detail: str) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded file's bytes; 413 above `max_bytes` (the middleware's cap includes multipart overhead)."""
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "upload_too_large", f"Upload larger than {max_bytes} bytes.")
    return data


def probe_upload(data: bytes, max_pixels: int) -> None:
    """Check an upload's header without decoding it: 400 empty, 415 not an image, 413 above the pixel cap."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, "bad_image", "The upload is empty: attach an image file.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except UnidentifiedImageError:
            raise ApiError(
                415, "not_an_image", "The upload is not an image PIL can read (JPEG, PNG, WebP, HEIC, ...)."
            ) from None
        except Image.DecompressionBombError:
            raise ApiError(413, "too_many_pixels", f"Image has more than {max_pixels} pixels.") from None
        except Exception as e:
            raise ApiError(400, "bad_image", f"The image cannot be read: {e}.") from None
    if w * h > max_pixels:
        raise ApiError(413, "too_many_pixels", f"Image is {w}x{h}, more than {max_pixels} pixels: send a smaller one.")


def decode_upload(data: bytes, max_pixels: int) -> Any:
    """Decode an uploaded image, with 415 for non-images, 413 above the pixel cap, 400 for broken ones."""
    from .. import decode

    probe_upload(data, max_pixels)
    try:
        return decode.open_image(data, max_pixels=max_pixels)
    except ImageError as e:
        raise ApiError(400, "bad_image", f"The image cannot be decoded: {e}") from None


__all__ = ["MULTIPART_SLACK", "UploadLimit", "decode_upload", "probe_upload", "read_upload"]
