"""Pipeline benchmark: whole-build images/s vs decode-only vs model-only, side by side in one run.

Uses the Debian wallpaper photos (scripts/get_wallpapers.sh -> bench-data/wallpapers) and a random-weight
model of a released architecture (default ruclip-vit-base-patch32-224), so nothing is downloaded.

    python scripts/bench_build.py [--photos bench-data/wallpapers] [--arch ruclip-vit-base-patch32-224]
        [--device cpu] [--dtype float32] [--workers N] [--batch-size 8] [--ray] [--limit N]
        [--decode auto|cpu|gpu|tensor] [--tensor-parts] [--compare-decode]

On a GPU (--device cuda, or --tensor-parts anywhere) it also prints the tensor decode path's decode-only figure
(nvJPEG in batches + tensor resize, tensor_decode) beside the CPU workers' on the same files, the model alone
for each of --model-dtypes x --model-batch-sizes on pixels already on the device, and the whole build with the
loaded model (its load is timed apart), with --compare-decode also with --decode cpu. Goals for ViT-L/14 at 224
on one H200 (issue 12): model-only >= 2,500 images/s, whole build >= 1,500 images/s.

--ray also builds the same photos with engine="ray" on a local Ray cluster of all this machine's CPUs and
reports both builds side by side with the ratio. What each build's clock covers is the same: `build()` with
the model given as a folder, so each loads it (the local build in this process, the Ray build in its actor)
and starts its own workers (the decoding processes; the Ray worker processes and the encoder actor). Not
timed: the cluster's start, i.e. `ray.init` plus Ray Data's detached service actors (stats, autoscaling
coordinator, actor-location tracker), which a running cluster (`--ray auto`) already has; they are started
by one one-row dataset before the clock runs, and reported apart (`ray_cluster_start_s`).
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


class _PathJob:
    def __init__(self, path: str) -> None:
        self.path = path


class _CountFallback:
    """A fallback that only counts the files the tensor path hands it (decode-only measures the tensor path)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def run(self, jobs):
        self.paths += [j.path for j in jobs]
        return iter(())


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def tensor_decode_only(paths: list[str], pre, device: str, batch: int) -> tuple[float, list[str], list[str]]:
    """images/s of the tensor path alone (threads read, decode_jpeg in batches, resize, normalise), over the
    files it takes; returns (images/s, files taken, files it would hand to the CPU workers)."""
    from ruclip_search.tensor_decode import TensorDecoder

    fallback = _CountFallback()
    decoder = TensorDecoder(pre, device, fallback, max_pixels=None, batch=batch)
    jobs = [_PathJob(p) for p in paths]
    for _ in decoder.run(jobs[: 2 * batch]):  # warm-up: nvJPEG's handle, pinned buffers, kernels
        pass
    _sync(device)
    fallback.paths.clear()
    taken: list[str] = []
    t = time.perf_counter()
    for job, loaded in decoder.run(jobs):
        assert loaded.pixels is not None
        taken.append(job.path)
    _sync(device)
    return len(taken) / (time.perf_counter() - t), taken, list(fallback.paths)


def tensor_stages(paths: list[str], pre, device: str, batch: int) -> dict:
    """Where the tensor path's time goes, each stage alone over the files it takes (up to 4 batches' worth):
    reading (threads: read, hash, header), decode_jpeg alone on the read bytes, preprocessing alone."""
    from concurrent.futures import ThreadPoolExecutor

    from ruclip_search.tensor_decode import TensorDecoder, _decode

    decoder = TensorDecoder(pre, device, _CountFallback(), max_pixels=None, batch=batch)
    sample = paths[: 4 * batch]
    with ThreadPoolExecutor(decoder.threads) as pool:
        t = time.perf_counter()
        reads = list(pool.map(decoder._read, sample))
        read_s = time.perf_counter() - t
    data = [r.data for r in reads if r.data is not None]
    dev = torch_device(device)
    _decode(data[:batch], dev)  # warm-up
    _sync(device)
    t = time.perf_counter()
    images = []
    for i in range(0, len(data), batch):
        images += _decode(data[i : i + batch], dev)
    _sync(device)
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    for image, r in zip(images, [r for r in reads if r.data is not None], strict=True):
        decoder.prep(image, r.info["orientation"])
    _sync(device)
    prep_s = time.perf_counter() - t
    mp = sum(int(im.shape[-1]) * int(im.shape[-2]) for im in images) / max(1, len(images)) / 1e6
    return {
        "files": len(sample), "mean_megapixels": round(mp, 2), "read_hash_header_img_s": round(len(sample) / read_s, 1),
        "decode_jpeg_only_img_s": round(len(images) / decode_s, 1), "preprocess_only_img_s": round(len(images) / prep_s, 1),
    }  # fmt: skip


def torch_device(device: str):
    import torch

    return torch.device(device)


def model_only_on_device(model, n: int, batch_size: int) -> float:
    """images/s of encode_pixels on pixels already on the model's device (embeddings copied back each batch)."""
    import torch

    x = torch.randn(batch_size, 3, model.image_size, model.image_size, device=model.device)
    for _ in range(3):
        model.encode_pixels(x)
    _sync(model.device)
    done, t = 0, time.perf_counter()
    while done < n:
        model.encode_pixels(x)
        done += batch_size
    _sync(model.device)
    return done / (time.perf_counter() - t)


def tensor_parts(args: argparse.Namespace, folder: Path, paths: list[str], out: dict) -> None:
    """The GPU figures (see the module docstring), into `out`."""
    import torch

    from ruclip_search.encoder import load_model
    from ruclip_search.indexer import build

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    model = load_model(folder, device=device, parts=("image",), dtype=args.dtype)
    _sync(device)
    out["model_load_s"] = round(time.perf_counter() - t, 2)
    rate, taken, rest = tensor_decode_only(paths, model.preprocessor, device, args.batch_size)
    out["tensor_stages"] = tensor_stages(taken, model.preprocessor, device, args.batch_size)
    print("tensor path stages:", json.dumps(out["tensor_stages"]), flush=True)
    out["tensor_decode_device"] = device
    out["tensor_decode_only_img_s"] = round(rate, 1)
    out["tensor_decode_files"], out["tensor_decode_fallback_files"] = len(taken), len(rest)
    out["cpu_decode_only_same_files_img_s"] = round(decode_only(taken, model.preprocessor, args.workers), 1)
    sweep = {}
    n_model = max(args.model_images, 4 * max(args.model_batch_sizes))
    for dtype in args.model_dtypes:
        m = model if dtype == str(model.net.dtype).removeprefix("torch.") else None
        if m is None:
            m = load_model(folder, device=device, parts=("image",), dtype=dtype)
        for bs in args.model_batch_sizes:
            sweep[f"{dtype}/batch{bs}"] = round(model_only_on_device(m, n_model, bs), 1)
            print(f"model-only {dtype}/batch{bs}: {sweep[f'{dtype}/batch{bs}']} images/s", flush=True)
        del m
    out["model_only_img_s_by_dtype_batch"] = sweep
    out["model_only_images_per_run"] = n_model
    for decode in ["gpu" if device.startswith("cuda") else "tensor"] + (["cpu"] if args.compare_decode else []):
        with tempfile.TemporaryDirectory() as tmp_index:
            t = time.perf_counter()
            report = build(args.photos, index=Path(tmp_index) / "index", model=model, device=device,
                           workers=args.workers, batch_size=args.batch_size, decode=decode)  # fmt: skip
            seconds = time.perf_counter() - t
        out[f"whole_build_loaded_model_decode_{decode}_s"] = round(seconds, 2)
        out[f"whole_build_loaded_model_decode_{decode}_img_s"] = round(report.added / seconds, 1)
        out[f"whole_build_loaded_model_decode_{decode}_report"] = report.to_dict()
        print(
            f"whole build, decode={decode}: {out[f'whole_build_loaded_model_decode_{decode}_img_s']} images/s",
            flush=True,
        )


def compiled_model_only(args: argparse.Namespace, folder: Path, out: dict) -> None:
    """model-only with the image tower under torch.compile (a measurement only: build does not compile)."""
    import torch

    from ruclip_search.encoder import load_model

    sweep = out["model_only_img_s_by_dtype_batch"]
    dtype, bs = max(sweep, key=sweep.get).split("/batch")
    model = load_model(folder, device=args.device, parts=("image",), dtype=dtype)
    model.net.visual = torch.compile(model.net.visual)
    t = time.perf_counter()
    model_only_on_device(model, 2 * int(bs), int(bs))  # compiles
    out["compile_s"] = round(time.perf_counter() - t, 1)
    key = f"compiled {dtype}/batch{bs}"
    out["model_only_img_s_compiled"] = {key: round(model_only_on_device(model, args.model_images, int(bs)), 1)}
    print(f"model-only {key}: {out['model_only_img_s_compiled'][key]} images/s (compile {out['compile_s']} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--photos", default=str(ROOT / "bench-data" / "wallpapers"))
    ap.add_argument("--arch", default="ruclip-vit-base-patch32-224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default), float16, bfloat16")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch-size", type=int, default=8)  # the CPU default of build()
    ap.add_argument("--ray", action="store_true", help="also build with engine='ray' on a local cluster")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    ap.add_argument(
        "--copies",
        type=int,
        default=1,
        help="use each photo this many times, each copy with other trailing bytes (not a duplicate)",
    )
    ap.add_argument("--skip-parts", action="store_true", help="skip the decode-only and model-only figures")
    ap.add_argument("--decode", default="auto", help="build's decode mode: auto, cpu, gpu, tensor (GPU code, CPU)")
    ap.add_argument("--tensor-parts", action="store_true", help="the GPU figures (default on with --device cuda)")
    ap.add_argument("--compare-decode", action="store_true", help="with the GPU figures: a build with --decode cpu too")
    ap.add_argument("--model-dtypes", default="float16,bfloat16", type=lambda v: v.split(","))
    ap.add_argument("--model-batch-sizes", default="64,128,256,512", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--model-images", type=int, default=2048, help="images per model-only figure")
    ap.add_argument("--compile", action="store_true", help="with the GPU figures: model-only under torch.compile too")
    ap.add_argument("--skip-folder-build", action="store_true", help="skip the build that loads the model folder")
    args = ap.parse_args()

    import torch

    from ruclip_search.encoder import load_model
    from ruclip_search.indexer import build
    from ruclip_search.walk import walk

    paths = [e.path for e in walk([args.photos])]
    if not paths:
        sys.exit(f"no photos under {args.photos}: run scripts/get_wallpapers.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        if args.limit is not None or args.copies > 1:  # the first N photos, each `copies` times
            paths = sorted(paths)[: args.limit]
            (Path(tmp) / "photos").mkdir()
            copies = []
            for k, p in enumerate(paths):
                data = Path(p).read_bytes()
                for c in range(args.copies):  # bytes after the image's end: same decoding work, another hash
                    copy = Path(tmp) / "photos" / f"{k:05d}-{c:03d}{Path(p).suffix}"
                    copy.write_bytes(data + b"\0" * c)
                    copies.append(str(copy))
            paths, args.photos = copies, str(Path(tmp) / "photos")
        folder = random_model_folder(args.arch, Path(tmp) / "model")
        gpu_out: dict = {}
        if args.device.startswith("cuda") or args.tensor_parts:
            import torchvision

            gpu_out = {
                "arch": args.arch, "device": args.device, "images": len(paths), "workers": args.workers,
                "batch_size": args.batch_size, "cpus": os.cpu_count(), "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            }  # fmt: skip
            tensor_parts(args, folder, paths, gpu_out)
            if args.skip_folder_build:
                print(json.dumps(gpu_out, indent=2))
                _gpu_table(gpu_out)
                if args.compile:
                    try:
                        compiled_model_only(args, folder, gpu_out)
                    except Exception as e:  # a figure the run can do without
                        print(f"torch.compile figure failed: {type(e).__name__}: {e}")
                return
        model = load_model(folder, device=args.device, parts=("image",), dtype=args.dtype)
        cpus = os.cpu_count() or 1
        out = {
            "arch": args.arch, "device": str(model.device), "dtype": str(model.net.dtype), "images": len(paths),
            "workers": args.workers, "batch_size": args.batch_size, "cpus": cpus, "torch_threads": torch.get_num_threads(),
        }  # fmt: skip
        if not args.skip_parts:
            out["decode_only_img_s"] = round(decode_only(paths, model.preprocessor, args.workers), 1)
            n = max(len(paths), 2 * args.batch_size)
            threads = torch.get_num_threads()
            out["model_only_img_s_all_threads"] = round(model_only(model, n, args.batch_size, threads), 1)
            shared = max(1, cpus - args.workers) if model.device.type == "cpu" else torch.get_num_threads()
            out["model_only_img_s_build_threads"] = round(model_only(model, n, args.batch_size, shared), 1)
        t = time.perf_counter()
        # the folder, not the loaded model: the build loads it, as the Ray build's actor does (equal work)
        report = build(args.photos, index=Path(tmp) / "index", model=str(folder), device=args.device,
                       workers=args.workers, batch_size=args.batch_size, decode=args.decode)  # fmt: skip
        seconds = time.perf_counter() - t
        out["whole_build_s"] = round(seconds, 2)
        out["whole_build_img_s"] = round(report.added / seconds, 2)
        out["whole_build_report"] = report.to_dict()
        if args.ray:
            out.update(ray_build(args, folder, Path(tmp), out["whole_build_img_s"]))
    if gpu_out:
        out["gpu_figures"] = gpu_out
    print(json.dumps(out, indent=2))
    if gpu_out:
        _gpu_table(gpu_out)
    if args.ray:
        print(
            f"local {out['whole_build_img_s']:.2f} images/s ({out['whole_build_s']:.1f} s) | "
            f"ray {out['ray_whole_build_img_s']:.2f} images/s ({out['ray_whole_build_s']:.1f} s) | "
            f"local/ray {out['ray_slowdown_ratio']:.3f} | ray overhead {out['ray_overhead_pct']:.1f} %"
        )


def _gpu_table(out: dict) -> None:
    """The GPU figures beside issue 12's goals, last in the output."""
    sweep = out["model_only_img_s_by_dtype_batch"]
    best = max(sweep, key=sweep.get)
    rows = [
        ("decode-only, CPU workers (same files)", out["cpu_decode_only_same_files_img_s"], ""),
        (f"decode-only, tensor path on {out['tensor_decode_device']}", out["tensor_decode_only_img_s"], ""),
        *((f"model-only {k}", v, ">= 2500" if k == best else "") for k, v in sweep.items()),
        *(
            (f"whole build, decode={k.split('_')[5]}", v, ">= 1500")
            for k, v in out.items()
            if k.startswith("whole_build_loaded_model_decode_") and k.endswith("_img_s")
        ),
    ]
    print(f"{out['arch']} on {out.get('gpu') or out['device']}, {out['images']} files "
          f"({out['tensor_decode_files']} via the tensor path, {out['tensor_decode_fallback_files']} to CPU workers)")  # fmt: skip
    for name, value, goal in rows:
        print(f"  {name:<45} {value:>10.1f} images/s  {goal}")


def ray_build(args: argparse.Namespace, folder: Path, tmp: Path, local_img_s: float) -> dict:
    """engine="ray" on a local cluster of this machine's CPUs; the model folder is loaded by the actors."""
    import ray
    import ray.data

    from ruclip_search.indexer import build

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(1).materialize()  # Ray Data's detached service actors: part of a running cluster
    started = time.perf_counter() - t
    try:
        t = time.perf_counter()
        report = build(args.photos, index=tmp / "ray-index", model=str(folder), device=args.device,
                       batch_size=args.batch_size, engine="ray")  # fmt: skip
        seconds = time.perf_counter() - t
    finally:
        ray.shutdown()
    img_s = report.added / seconds
    return {
        "ray_cluster_start_s": round(started, 2), "ray_whole_build_s": round(seconds, 2),
        "ray_whole_build_img_s": round(img_s, 2), "ray_slowdown_ratio": round(local_img_s / img_s, 3),
        "ray_overhead_pct": round(100 * (local_img_s / img_s - 1), 1), "ray_build_report": report.to_dict(),
    }  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
