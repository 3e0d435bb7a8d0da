"""Incremental-build benchmark: a re-run over an unchanged tree of N generated files, and peak memory of the
first build (which must stay bounded by the pipeline's depth, not the collection's size).

    python scripts/bench_incremental.py [--n 100000] [--model tests/fixtures/tiny-ruclip] [--dir /tmp/bench-inc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tiny_bmp(i: int, side: int = 8) -> bytes:
    """A distinct side x side 24-bit BMP whose pixels encode `i` (written without PIL: 100k files in seconds)."""
    row = side * 3
    pixels = bytes(((i >> (8 * (k % 3))) + k * 37) & 255 for k in range(row)) * side
    header = b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
    dib = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + dib + pixels


def make_tree(folder: Path, n: int) -> None:
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:06d}.bmp").write_bytes(tiny_bmp(i))


def peak_rss_mb() -> tuple[float, float]:
    """(this process, largest waited-for child) peak RSS in MB."""
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "tiny-ruclip"))
    ap.add_argument("--dir", default="/tmp/bench-incremental")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    from ruclip_search.indexer import build

    base = Path(args.dir)
    photos, index = base / "photos", base / "index"
    out: dict[str, object] = {"n": args.n}
    if not (photos / f"{(args.n - 1) // 1000:03d}" / f"img{args.n - 1:06d}.bmp").exists():
        t = time.perf_counter()
        make_tree(photos, args.n)
        out["generate_s"] = round(time.perf_counter() - t, 1)
    first = build(photos, index=index, model=args.model, device="cpu", workers=args.workers, batch_size=args.batch_size)
    out["first_build"] = first.to_dict()
    out["first_build_peak_rss_mb"] = dict(zip(("main", "worker"), (round(x) for x in peak_rss_mb()), strict=True))
    t = time.perf_counter()
    again = build(photos, index=index, model=args.model, device="cpu", workers=args.workers)
    out["rerun_s"] = round(time.perf_counter() - t, 2)
    out["rerun"] = again.to_dict()
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
