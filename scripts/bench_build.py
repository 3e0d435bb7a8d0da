"""Pipeline benchmark: whole-build images/s vs decode-only vs model-only, side by side in one run.

Uses the Debian wallpaper photos (scripts/get_wallpapers.sh -> bench-data/wallpapers) and a random-weight
model of a released architecture (default ruclip-vit-base-patch32-224), so nothing is downloaded.

    python scripts/bench_build.py [--photos bench-data/wallpapers] [--arch ruclip-vit-base-patch32-224]
        [--device cpu] [--dtype float32] [--workers N] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def random_model_folder(arch: str, folder: Path) -> Path:
    """Write config.json + random pytorch_model.bin + a bpe.model: a loadable RuCLIP folder of `arch`'s size."""
    import torch

    from ruclip_search.model import CLIP, CLIPConfig
    from ruclip_search.registry import CONFIGS

    config = CLIPConfig.from_dict(CONFIGS[arch])
    torch.manual_seed(0)
    net = CLIP(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    shutil.copy(ROOT / "tests" / "fixtures" / "tiny-ruclip" / "bpe.model", folder / "bpe.model")
    return folder


def _decode(pre, path: str) -> int:
    return pre.load(path).shape[-1]


def decode_only(paths: list[str], pre, workers: int) -> float:
    """images/s of decode + preprocess alone, in `workers` processes (as the indexer runs them)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max(1, workers), mp_context=ctx) as pool:
        list(pool.map(_decode, [pre] * 2, paths[:2]))  # start the workers
        t = time.perf_counter()
        list(pool.map(_decode, [pre] * len(paths), paths, chunksize=4))
        return len(paths) / (time.perf_counter() - t)


def model_only(model, n: int, batch_size: int, threads: int) -> float:
    """images/s of the model alone on ready tensors, with `threads` intra-op threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(batch_size, 3, model.image_size, model.image_size)
        model.encode_pixels(x[:2])
        done, t = 0, time.perf_counter()
        while done < n:
            model.encode_pixels(x)
            done += batch_size
        return done / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--photos", default=str(ROOT / "bench-data" / "wallpapers"))
    ap.add_argument("--arch", default="ruclip-vit-base-patch32-224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default), float16, bfloat16")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch-size", type=int, default=8)  # the CPU default of build()
    args = ap.parse_args()

    import torch

    from ruclip_search.encoder import load_model
    from ruclip_search.indexer import build
    from ruclip_search.walk import walk

    paths = [e.path for e in walk([args.photos])]
    if not paths:
        sys.exit(f"no photos under {args.photos}: run scripts/get_wallpapers.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_model_folder(args.arch, Path(tmp) / "model")
        model = load_model(folder, device=args.device, parts=("image",), dtype=args.dtype)
        cpus = os.cpu_count() or 1
        out = {
            "arch": args.arch, "device": str(model.device), "dtype": str(model.net.dtype), "images": len(paths),
            "workers": args.workers, "batch_size": args.batch_size, "cpus": cpus, "torch_threads": torch.get_num_threads(),
        }  # fmt: skip
        out["decode_only_img_s"] = round(decode_only(paths, model.preprocessor, args.workers), 1)
        n = max(len(paths), 2 * args.batch_size)
        out["model_only_img_s_all_threads"] = round(model_only(model, n, args.batch_size, torch.get_num_threads()), 1)
        shared = max(1, cpus - args.workers) if model.device.type == "cpu" else torch.get_num_threads()
        out["model_only_img_s_build_threads"] = round(model_only(model, n, args.batch_size, shared), 1)
        t = time.perf_counter()
        report = build(args.photos, index=Path(tmp) / "index", model=model, workers=args.workers,
                       batch_size=args.batch_size)  # fmt: skip
        out["whole_build_img_s"] = round(report.added / (time.perf_counter() - t), 1)
        out["whole_build_report"] = report.to_dict()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
