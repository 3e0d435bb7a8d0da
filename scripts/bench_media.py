"""Decode cost of a camera RAW and of a minute of video beside a JPEG's, on this machine, one core.

Usage: python scripts/bench_media.py --dir DIR --make [--small]   (makes the files; not timed)
       python scripts/bench_media.py --dir DIR [--runs N] [--size S]   (measures them)

Every file is made here (nothing downloaded): a 12 MP photo JPEG; a 24 MP DNG (6000x4000 16-bit Bayer) with a
full-size camera-style JPEG preview, and the same without a usable preview (half-size demosaic); H.264 MP4s
at 1080p (60 s) and 4K (30 s), 30 fps, a keyframe every 2 s as phones write them (`--small`: 10 s each at
half those sizes, to smoke-test the script). Each is taken through what `build` runs per file in a decoding worker
(`loader.load_one`: read, hash, decode, preprocess to S x S, default 224), the median of N runs (default 3)
in process time, torch and FFmpeg on one thread. For a video, the cost per minute is that of its five sampled
frames divided by its length in minutes; "full decode" is every frame of the stream decoded once, what
sampling avoids (1080p only). Each file is measured in a fresh process: peak RSS is its high-water mark
(ru_maxrss), beside what that process held before its first decode ("start": Python, torch, the modules).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from ruclip_search.loader import load_one  # noqa: E402
from ruclip_search.preprocess import Preprocessor  # noqa: E402


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with fine noise (JPEG-compresses like a photo, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / 300 + k) * np.cos(y / 200 - k) for k in range(3)], -1)
    noise = rng.normal(0, 6, size=(height // 4, width // 4, 3)).repeat(4, 0).repeat(4, 1)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def make_files(folder: Path, small: bool) -> dict[str, Path]:
    import av
    from media_files import make_dng

    out = {}
    out["jpeg 12 MP"] = folder / "photo.jpg"
    _picture(4000, 3000).save(out["jpeg 12 MP"], "JPEG", quality=90)
    w, h = (1500, 1000) if small else (6000, 4000)
    out[f"raw {w * h / 1e6:.0f} MP, JPEG preview"] = make_dng(folder / "preview.dng", _picture(w, h), width=w, height=h)
    out[f"raw {w * h / 1e6:.0f} MP, demosaic"] = make_dng(folder / "demosaic.dng", None, width=w, height=h)
    for name, (vw, vh), seconds in (("1080p", (1920, 1080), 60), ("4K", (3840, 2160), 30)):
        seconds = 10 if small else seconds
        if small:
            vw, vh = vw // 2, vh // 2
        path = folder / f"{name}.mp4"
        base = np.asarray(_picture(vw + 256, vh, seed=1))
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=30, options={"preset": "ultrafast", "crf": "28"})
            stream.width, stream.height, stream.pix_fmt = vw, vh, "yuv420p"
            stream.codec_context.gop_size = 60
            for i in range(30 * seconds):
                shift = (i * 4) % 256  # a slow pan: real motion, cheap to make
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, shift : shift + vw]), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out[f"video {name} {seconds} s"] = path
    return out


def cpu_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def full_decode(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream))


def measure_one(path: Path, size: int, runs: int) -> dict:
    """In this (fresh) process: CPU ms per load_one of `path` (median of `runs`) and the peak RSS it reached."""
    torch.set_num_threads(1)
    pre = Preprocessor(image_size=size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = load_one(pre, str(path), None)
    assert result.error is None, (path, result.error)
    ms = 1000 * cpu_time(lambda: load_one(pre, str(path), None), runs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": ms, "rss_mb": rss, "base_rss_mb": base, "duration": result.duration,
            "times": list(result.frame_times or ())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, required=True, help="where the files are made (--make) and read")
    parser.add_argument("--make", action="store_true", help="make the files in --dir (not timed), then stop")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--small", action="store_true", help="with --make: small files, a smoke test")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure one file, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args.size, args.runs)))
        return
    if args.make:
        args.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        files = make_files(args.dir, args.small)
        (args.dir / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}, ensure_ascii=False))
        print(f"made {len(files)} files in {time.perf_counter() - t0:.0f} s")
        return
    files = {k: Path(v) for k, v in json.loads((args.dir / "files.json").read_text()).items()}
    print(f"{'file':<26} {'MB':>7} {'ms/file':>8} {'x JPEG':>7} {'ms/min':>7} {'peak RSS MB':>12} {'(start)':>8}")
    jpeg_ms = None
    times: list[float] = []
    for name, path in files.items():  # each in a fresh process: its own peak RSS
        out = subprocess.run([sys.executable, __file__, "--one", str(path), "--size", str(args.size), "--runs",
                              str(args.runs), "--dir", str(args.dir)], check=True, capture_output=True, text=True)  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        jpeg_ms = jpeg_ms or r["ms"]
        per_min = f"{r['ms'] / (r['duration'] / 60):7.1f}" if r["duration"] else ""
        times = r["times"] or times
        mb = path.stat().st_size / 1e6
        print(f"{name:<26} {mb:7.1f} {r['ms']:8.1f} {r['ms'] / jpeg_ms:7.2f} {per_min:>7} {r['rss_mb']:12.0f} "
              f"{r['base_rss_mb']:8.0f}")  # fmt: skip
    for name, path in files.items():
        if name.startswith("video 1080p"):
            t0 = time.process_time()
            n = full_decode(path)
            ms = 1000 * (time.process_time() - t0)
            print(f"full decode of {name}: {n} frames, {ms:.0f} ms CPU ({ms / jpeg_ms:.0f} x a JPEG)")
    print(f"sampled frames per video: {len(times)}, at {times} s")


if __name__ == "__main__":
    main()
