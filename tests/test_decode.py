"""decode.open_image / image_info: every mode to RGB, EXIF orientation, formats by content, clear errors."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import StandInModel
from PIL import Image, ImageOps, features

from ruclip_search import decode
from ruclip_search.decode import DEFAULT_MAX_PIXELS, image_info, open_image
from ruclip_search.errors import ImageError
from ruclip_search.indexer import build
from ruclip_search.preprocess import Preprocessor
from ruclip_search.store import Store

RED, WHITE = (255, 0, 0), (255, 255, 255)


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _red_left_half(width: int = 40, height: int = 20) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    return Image.fromarray(pixels, "RGB")


def _with_orientation(img: Image.Image, orientation: int) -> Image.Exif:
    exif = img.getexif()
    exif[0x0112] = orientation
    return exif


# --- modes -----------------------------------------------------------------------------------------------


def test_rgba_transparency_goes_onto_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((1, 1), (0, 0, 255, 255))  # opaque blue
    img.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black
    out = open_image(_save(img, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 1)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((2, 2)))


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_grey_and_palette_alpha_onto_white(tmp_path: Path, mode: str) -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.putpixel((3, 3), (0, 0, 0, 255))
    img = img.convert(mode)
    out = open_image(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((3, 3)) == (0, 0, 0)


def test_palette_with_transparency_index(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    img.putpixel((4, 4), 1)
    path = _save(img, tmp_path / "p.gif", transparency=0)
    out = open_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((4, 4)) == RED


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 77, 77), ("1", 1, 255), ("P", 2, 20)],
)
def test_plain_modes(tmp_path: Path, mode: str, value: int, expected: int) -> None:
    img = Image.new(mode, (6, 5), value)
    if mode == "P":
        img.putpalette([min(v * 10, 255) for v in range(256) for _ in range(3)])
    out = open_image(_save(img, tmp_path / "x.png"))
    assert out.mode == "RGB" and out.size == (6, 5)
    assert out.getpixel((0, 0)) == (expected,) * 3


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    out = open_image(_save(img, tmp_path / "c.jpg", quality=95))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    pixels = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.frombytes("I;16", (3, 1), pixels.astype("<u2").tobytes())
    assert open_image(img).getpixel((2, 0)) == WHITE
    out = open_image(_save(img, tmp_path / "g16.png"))
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_and_int32_modes() -> None:
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert [open_image(floats).getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]
    ints = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), "I")
    assert [open_image(ints).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_ycbcr_and_animated_gif_first_frame(tmp_path: Path) -> None:
    assert open_image(Image.new("YCbCr", (4, 4), (128, 128, 128))).mode == "RGB"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert open_image(path).getpixel((4, 4)) == RED


# --- orientation, formats, sources ------------------------------------------------------------------------


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    img = _red_left_half(40, 20)
    path = _save(img, tmp_path / "o6.jpg", exif=_with_orientation(img, 6), quality=95)
    out = open_image(path)
    assert out.size == (20, 40)  # rotated 90° clockwise: the left half is now on top
    assert out.getpixel((10, 5))[0] > 200 and out.getpixel((10, 35))[0] < 60
    info = image_info(path)
    assert (info["width"], info["height"], info["orientation"]) == (20, 40, 6)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil(tmp_path: Path, orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 256, (7, 11, 3), dtype=np.uint8), "RGB")
    path = _save(img, tmp_path / "o.png", exif=_with_orientation(img, orientation))
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(expected))


def test_oriented_tiff_is_rotated_once(tmp_path: Path) -> None:
    img = _red_left_half(40, 20)
    path = _save(img, tmp_path / "o6.tif", exif=_with_orientation(img, 6))
    out = open_image(path)  # PIL's TIFF plugin applies the orientation itself while loading
    assert out.size == (20, 40)
    assert out.getpixel((10, 5)) == RED and out.getpixel((10, 35)) == (0, 0, 0)
    decoded = decode.decode(path, draft_size=8, orient=False)
    assert decoded.image.size == decoded.full_size == (20, 40)
    assert (decoded.info["width"], decoded.info["height"], decoded.info["orientation"]) == (20, 40, 1)
    fast, exact = (Preprocessor(image_size=16, mode=mode).load(path) for mode in ("fast", "exact"))
    assert float((fast - exact).abs().max()) < 0.05


def test_format_detected_by_content_and_all_sources(tmp_path: Path) -> None:
    img = _red_left_half(12, 6)
    path = _save(img, tmp_path / "really-a-png.jpg", format="PNG")
    data = path.read_bytes()
    for source in (path, str(path), data, io.BytesIO(data), Image.open(path)):
        out = open_image(source)
        assert out.mode == "RGB" and out.size == (12, 6) and out.getpixel((0, 0)) == RED
    assert image_info(path)["format"] == "PNG"


def test_image_is_fully_loaded_and_file_closed(tmp_path: Path) -> None:
    path = _save(_red_left_half(), tmp_path / "gone.png")
    out = open_image(path)
    path.unlink()
    assert out.getpixel((0, 0)) == RED


def test_heic_via_pillow_heif(tmp_path: Path) -> None:
    import pillow_heif

    path = tmp_path / "photo.heic"
    # written with pillow-heif's own API (no Pillow plugin needed), so reading it proves decode.py registered
    # the opener; an encoder failure fails the test (HEIC support is a promise, not an option)
    pillow_heif.from_pillow(Image.new("RGB", (64, 48), RED)).save(path, quality=90)
    out = open_image(path)
    assert out.size == (64, 48)
    r, g, b = out.getpixel((32, 24))
    assert r > 200 and g < 50 and b < 50


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF support")
def test_avif(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (32, 32), RED), tmp_path / "a.avif", quality=90)
    assert open_image(path.read_bytes()).getpixel((16, 16))[0] > 200


def test_draft_keeps_shorter_side_at_least_requested(tmp_path: Path) -> None:
    img = Image.new("RGB", (4000, 1000), (10, 20, 30))
    path = _save(img, tmp_path / "wide.jpg")
    decoded = decode.decode(path, draft_size=224)
    assert decoded.scale == 4 and decoded.image.size == (1000, 250)
    assert decoded.full_size == (4000, 1000)
    assert open_image(path, draft_size=224).size == (1000, 250)
    assert open_image(path).size == (4000, 1000)


# --- metadata -------------------------------------------------------------------------------------------


def test_image_info_reads_exif(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 20))
    exif = _with_orientation(img, 8)
    exif[0x010F] = "Canon"
    exif[0x0110] = "EOS 5D\x00"
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 12:30:45"
    exif.get_ifd(0x8769)[0x9011] = "+03:00"
    path = _save(img, tmp_path / "meta.jpg", exif=exif)
    info = image_info(path)
    assert info == {
        "width": 20,
        "height": 30,
        "format": "JPEG",
        "taken_at": datetime(2021, 7, 4, 12, 30, 45, tzinfo=timezone(timedelta(hours=3))),
        "camera_make": "Canon",
        "camera_model": "EOS 5D",
        "orientation": 8,
    }
    assert decode.decode(path).info == info


def test_image_info_without_exif_and_bad_dates(tmp_path: Path) -> None:
    info = image_info(_save(Image.new("L", (5, 4)), tmp_path / "plain.png"))
    assert info["taken_at"] is None and info["camera_make"] is None and (info["width"], info["height"]) == (5, 4)
    assert decode._parse_exif_datetime("0000:00:00 00:00:00") is None
    assert decode._parse_exif_datetime("2020:01:02 03:04:05") == datetime(2020, 1, 2, 3, 4, 5)


# --- errors ---------------------------------------------------------------------------------------------


def _reason(source, **kwargs) -> str:
    with pytest.raises(ImageError) as caught:
        open_image(source, **kwargs)
    return str(caught.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in _reason(path)
    assert "empty" in _reason(b"")


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_an_error_not_grey(tmp_path: Path, progressive: bool) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", progressive=progressive)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "truncated JPEG" in _reason(path)
    assert "truncated JPEG" in _reason(path, draft_size=32)


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "PNG" in _reason(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a well-formed PNG."""
    pos, chunks = 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        chunks.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_from(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(kind, data) for kind, data in chunks)


def _broken_png(kind: str) -> bytes:
    """A PNG that Pillow opens but cannot load, like Pillow's own broken_data_stream.png, truncated_end_chunk.png
    and apng/chunk_no_fctl.png. None has an eXIf chunk, so PIL's PngImageFile.getexif() loads the pixels."""
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if kind == "corrupt stream":  # valid deflate for the top half, then a block of invalid type 3
        rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
        packer = zlib.compressobj()
        stream = packer.compress(rows[: len(rows) // 2]) + packer.flush(zlib.Z_FULL_FLUSH) + b"\x07" + bytes(64)
        header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
        return _png_from([(b"IHDR", header), (b"IDAT", stream), (b"IEND", b"")])
    if kind == "truncated final chunk":  # whole image data, then a chunk header whose 256 bytes are missing
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, "PNG")
        chunks = [chunk for chunk in _png_chunks(buffer.getvalue()) if chunk[0] != b"IEND"]
        return _png_from(chunks) + struct.pack(">I", 256) + b"IDAT"
    assert kind == "APNG missing fcTL"  # the second frame's fdAT comes without its fcTL
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, (0, 0, 255))]
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    chunks = _png_chunks(buffer.getvalue())
    second_fctl = [i for i, (chunk_type, _) in enumerate(chunks) if chunk_type == b"fcTL"][1]
    return _png_from(chunks[:second_fctl] + chunks[second_fctl + 1 :])


BROKEN_PNGS = ("corrupt stream", "truncated final chunk", "APNG missing fcTL")


@pytest.mark.parametrize("kind", BROKEN_PNGS)
def test_broken_png_is_an_error_not_a_partial_picture(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(_broken_png(kind))
    with pytest.raises((OSError, SyntaxError)), Image.open(path) as im:  # the reference: Pillow cannot load it
        im.load()
    with pytest.raises(ImageError, match="PNG"):
        decode.decode(path)
    with pytest.raises(ImageError, match="PNG"):
        decode.decode(path, draft_size=48, orient=False)
    for mode in ("fast", "exact"):
        with pytest.raises(ImageError, match="PNG"):
            Preprocessor(image_size=16, mode=mode).load_with_info(path)


def test_indexer_records_broken_pngs_as_errors(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(_red_left_half(), folder / "good.png")
    for i, kind in enumerate(BROKEN_PNGS):
        (folder / f"broken{i}.png").write_bytes(_broken_png(kind))
    report = build(folder, index=tmp_path / "idx", model=StandInModel(), workers=0)
    assert (report.added, report.failed) == (1, len(BROKEN_PNGS))
    with Store.open(tmp_path / "idx") as store:
        failed = {Path(record.path).name: record.error for record in store.iter_images(errors=True)}
        indexed = [Path(record.path).name for record in store.iter_images(errors=False)]
    assert indexed == ["good.png"]
    assert sorted(failed) == [f"broken{i}.png" for i in range(len(BROKEN_PNGS))]
    assert all(error and "PNG" in error for error in failed.values()), failed


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("это не картинка\n")
    assert _reason(path) == "not an image (unrecognised content)"


def test_corrupt_jpeg_body(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    data[200:-2] = b"\xff\x00" * ((len(data) - 202) // 2) + b"\x00" * ((len(data) - 202) % 2)
    with pytest.raises(ImageError):
        open_image(bytes(data))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "vanished" in _reason(tmp_path / "nope.jpg")
    assert "directory" in _reason(tmp_path)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_red_left_half(), tmp_path / "locked.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode, "open", denied, raising=False)  # root ignores chmod, so fake it
    assert _reason(path) == "permission denied"


def test_max_pixels_cap(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "big.png")
    reason = _reason(path, max_pixels=4999)
    assert reason == "100×50 pixels is over the --max-pixels cap of 4,999; raise --max-pixels to index it"
    assert open_image(path, max_pixels=5000).size == (100, 50)
    assert open_image(path, max_pixels=None).size == (100, 50)
    assert DEFAULT_MAX_PIXELS >= 100_000_000


def test_pil_decompression_bomb_never_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Over twice PIL's limit: PIL's own DecompressionBombError, converted.
        reason = _reason(path, max_pixels=1000)
        assert reason == "10,000 pixels is over the --max-pixels cap of 1,000; raise --max-pixels to index it"
        # Between PIL's limit and twice it: PIL only warns; our cap check reports it.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
        assert "100×100 pixels is over the --max-pixels cap of 6,000" in _reason(path, max_pixels=6000)
        # A cap above PIL's limit wins: PIL neither warns nor refuses.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        assert open_image(path, max_pixels=20_000).size == (100, 100)
