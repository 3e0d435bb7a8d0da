"""Media files made in tests: videos of fixture drawings (PyAV) and DNG camera RAW files (tifffile)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fixture_images import draw
from PIL import Image

_CODECS = {".webm": "libvpx-vp9", ".avi": "mpeg4"}


def make_video(path: Path, classes: list[str], *, seconds_each: float = 2.0, fps: int = 5, size: int = 64,
               creation_time: str | None = None) -> Path:  # fmt: skip
    """A video showing each fixture class in turn for `seconds_each` s (a fresh noisy drawing every frame, a
    keyframe every second); the container format follows the extension."""
    import av

    with av.open(str(path), "w") as out:
        if creation_time:
            out.metadata["creation_time"] = creation_time
        stream = out.add_stream(_CODECS.get(path.suffix.lower(), "libx264"), rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = fps
        n = 0
        for cls in classes:
            for _ in range(round(seconds_each * fps)):
                frame = av.VideoFrame.from_image(draw(cls, seed=n % 3, size=size))
                for packet in stream.encode(frame):
                    out.mux(packet)
                n += 1
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_dng(path: Path, preview: Image.Image | None, *, width: int = 64, height: int = 48, jpeg: bool = True,
             make: str = "TestMake", model: str = "TestCam 1", taken: str = "2021:06:01 18:30:00") -> Path:  # fmt: skip
    """A DNG: a preview in IFD0 (JPEG-compressed as cameras write it, or `jpeg=False` uncompressed RGB) and a
    16-bit RGGB Bayer image in its SubIFD; LibRaw reads it. `preview` None leaves a tiny 8x6 one."""
    import struct

    import tifffile

    rng = np.random.default_rng(0)
    bayer = rng.integers(400, 3000, size=(height, width)).astype(np.uint16)
    shown = preview if preview is not None else Image.new("RGB", (8, 6), (128, 128, 128))
    ifd0 = [
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50708, "s", 0, "Test Camera", True),  # UniqueCameraModel
        (271, "s", 0, make, True),
        (272, "s", 0, model, True),
        (306, "s", 0, taken, True),  # DateTime
    ]
    raw = [
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
        (50714, "H", 1, (0,), True),  # BlackLevel
        (50717, "H", 1, (4095,), True),  # WhiteLevel
    ]
    shown = shown.convert("RGB")
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.asarray(shown), photometric="rgb", subfiletype=1, subifds=1, extratags=ifd0,
                 rowsperstrip=shown.height)  # fmt: skip
        tw.write(bayer, photometric=32803, subfiletype=0, extratags=raw)
    if jpeg:  # tifffile needs imagecodecs to write JPEG: point the one preview strip at JPEG bytes appended
        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            where = {name: tags[name].valueoffset for name in ("Compression", "StripOffsets", "StripByteCounts")}
        buf = io.BytesIO()
        shown.save(buf, "JPEG", quality=92)
        data = bytearray(path.read_bytes())
        struct.pack_into("<H", data, where["Compression"], 7)
        struct.pack_into("<I", data, where["StripOffsets"], len(data))
        struct.pack_into("<I", data, where["StripByteCounts"], len(buf.getvalue()))
        path.write_bytes(bytes(data) + buf.getvalue())
    return path


def truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """The first `fraction` of `src`'s bytes, as a file cut off mid-copy."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst
