"""Benchmark image preprocessing on one core: the reference RuCLIPProcessor vs our exact and fast modes.

Usage: python scripts/bench_preprocess.py [DIR] [--runs N] [--size S] [--per-file]
DIR defaults to bench-data/wallpapers (fill it with scripts/get_wallpapers.sh); every JPEG under it is used.

Throughput is images per CPU-second (process time, so per core and robust to other load on the machine) in
one process with torch limited to one thread, the median of N runs (default 3), each run opening and
preprocessing every file. "draft decode only" is PIL open + draft(DRAFT_FACTOR x S) + load: the
floor that reduced-scale decoding sets. PSNR is over un-normalised 0..1 pixel values, 10 log10(1 / MSE),
against the reference transform applied to the same (EXIF-oriented) full decode.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ruclip_search.decode import open_image  # noqa: E402
from ruclip_search.preprocess import DRAFT_FACTOR, Preprocessor  # noqa: E402

FALLBACK_REFERENCE = Path("/tmp/ref/ruclip_pkg/ruclip/processor.py")


def reference_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """RuCLIPProcessor(...).image_transform from the installed ruclip package (or FALLBACK_REFERENCE)."""
    spec = importlib.util.find_spec("ruclip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "processor.py"
    else:
        path = FALLBACK_REFERENCE
    if importlib.util.find_spec("youtokentome") is None:
        sys.modules["youtokentome"] = types.ModuleType("youtokentome")  # only the tokenizer needs it
    module_spec = importlib.util.spec_from_file_location("_ruclip_reference_processor", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    real = getattr(module.yttm, "BPE", None)
    module.yttm.BPE = lambda *args, **kwargs: None  # no tokenizer file needed for images
    try:
        return module.RuCLIPProcessor("unused-bpe.model", image_size=image_size).image_transform
    finally:
        if real is None:
            del module.yttm.BPE
        else:
            module.yttm.BPE = real


def cpu_seconds(cases: dict[str, Callable[[Path], object]], paths: list[Path], runs: int) -> dict[str, list[float]]:
    """Median CPU seconds per file for each case. Runs interleave the cases so that load from other
    processes on the machine affects them alike."""
    spent: dict[str, list[list[float]]] = {name: [[] for _ in paths] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            for n, path in enumerate(paths):
                start = time.process_time()
                fn(path)
                spent[name][n].append(time.process_time() - start)
    return {name: [statistics.median(per_run) for per_run in per_file] for name, per_file in spent.items()}


def psnr(ours: torch.Tensor, theirs: torch.Tensor, pre: Preprocessor) -> float:
    mean = torch.tensor(pre.mean)[:, None, None]
    std = torch.tensor(pre.std)[:, None, None]
    mse = ((ours * std + mean) - (theirs * std + mean)).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, default=ROOT / "bench-data" / "wallpapers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--per-file", action="store_true", help="also print CPU ms and PSNR for each file")
    args = parser.parse_args()

    paths = sorted(p for p in args.dir.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
    if not paths:
        print(f"no JPEGs under {args.dir}: run scripts/get_wallpapers.sh first", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    ref = reference_transform(args.size)
    exact = Preprocessor(image_size=args.size, mode="exact")
    fast = Preprocessor(image_size=args.size, mode="fast")
    draft = round(DRAFT_FACTOR * args.size)

    def draft_only(path: Path) -> None:
        with Image.open(path) as im:
            im.draft("RGB", (draft, draft))
            im.load()

    cases = {
        "reference processor": lambda p: ref(Image.open(p)),
        "ours, exact": exact.load,
        "ours, fast": fast.load,
        "draft decode only": draft_only,
    }
    for fn in cases.values():  # warm up caches and lazy imports
        fn(paths[0])
    seconds = cpu_seconds(cases, paths, args.runs)
    speed = {name: len(paths) / sum(per_file) for name, per_file in seconds.items()}

    scores: dict[str, list[float]] = {"ours, exact": [], "ours, fast": []}
    for path in paths:
        target = ref(open_image(path))
        scores["ours, exact"].append(psnr(exact.load(path), target, exact))
        scores["ours, fast"].append(psnr(fast.load(path), target, fast))

    base = speed["reference processor"]
    print(
        f"{len(paths)} JPEGs under {args.dir}, one thread, per CPU-second, median of {args.runs} runs, image_size {args.size}"
    )
    print(f"{'':22} {'images/s':>9} {'x ref':>6} {'PSNR min':>9} {'PSNR median':>12}")
    for name, value in speed.items():
        row = f"{name:22} {value:9.1f} {value / base:6.2f}"
        if name in scores:
            row += f" {min(scores[name]):9.2f} {statistics.median(scores[name]):12.2f}"
        print(row)
    print("PSNR in dB over 0..1 pixels vs the reference on the same full decode (inf = bit-identical)")
    if args.per_file:
        print(
            f"\n{'file':28} {'size':>10} {'prog':>4} {'ref ms':>7} {'fast ms':>7} {'draft ms':>8} {'x ref':>6} {'dB':>6}"
        )
        for n, path in enumerate(paths):
            with Image.open(path) as im:
                size, progressive = f"{im.width}x{im.height}", "yes" if im.info.get("progressive") else ""
            ref_ms, fast_ms = 1e3 * seconds["reference processor"][n], 1e3 * seconds["ours, fast"][n]
            draft_ms = 1e3 * seconds["draft decode only"][n]
            print(
                f"{path.name[:28]:28} {size:>10} {progressive:>4} {ref_ms:7.1f} {fast_ms:7.1f} {draft_ms:8.1f}"
                f" {ref_ms / fast_ms:6.2f} {scores['ours, fast'][n]:6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
