"""The tensor decode path (tensor_decode: decode_jpeg + tensor resize, nvJPEG on a GPU), run on the CPU here.

Fidelity is PSNR over 0..1 pixel values against the reference RuCLIPProcessor transform, as in test_preprocess.
The `gpu` tests at the end need CUDA (default and CI runs deselect them; scripts/device_check.sh runs them).
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SEARCH_PER_CLASS, TINY_MODEL, make_search_photos
from fixture_images import FIXTURE_CLASSES
from PIL import Image
from reference import image_transform
from test_preprocess import synthetic_photo

from ruclip_search.decode import open_image
from ruclip_search.errors import RuclipSearchError
from ruclip_search.indexer import build
from ruclip_search.preprocess import Preprocessor
from ruclip_search.search import Index
from ruclip_search.store import Store
from ruclip_search.tensor_decode import TensorDecoder, tensor_jpeg

ROOT = Path(__file__).resolve().parent.parent
WALLPAPERS = ROOT / "bench-data" / "wallpapers"
MIN_DB = 35.0  # the floor (the fast PIL mode's); measured 58.7-63.5 dB on the wallpapers


def psnr(ours: torch.Tensor, theirs: torch.Tensor, pre: Preprocessor) -> float:
    mean = torch.tensor(pre.mean)[:, None, None]
    std = torch.tensor(pre.std)[:, None, None]
    mse = ((ours.cpu() * std + mean) - (theirs.cpu() * std + mean)).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


class _Job:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)


class _NoFallback:
    """A fallback that records what it was given and decodes nothing."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def run(self, jobs):
        self.paths += [j.path for j in jobs]
        return iter(())


def _tensor_results(paths: list[Path], device: str = "cpu", pre: Preprocessor | None = None):
    """{path: pixels} of the files the tensor path took, and the paths it passed to the fallback."""
    fallback = _NoFallback()
    decoder = TensorDecoder(pre or Preprocessor(), device, fallback, max_pixels=None, batch=4)
    out = {job.path: loaded.pixels for job, loaded in decoder.run([_Job(p) for p in paths])}
    return out, fallback.paths


@pytest.fixture(scope="module")
def real_jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The Debian wallpaper JPEGs (.ci/run fetches them); where they are absent, photo-like JPEGs made here."""
    paths = sorted(p for p in WALLPAPERS.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
    if paths:
        return paths
    folder = tmp_path_factory.mktemp("jpegs")
    for i, (w, h) in enumerate([(1920, 1080), (1600, 1203), (1080, 1920), (2560, 1600), (640, 481)]):
        synthetic_photo(w, h, seed=i).save(folder / f"{i}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


@pytest.fixture(scope="module")
def reference_transform():
    """The reference processor's image_transform."""
    return image_transform()


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# -- fidelity ----------------------------------------------------------------------------------------
def test_tensor_path_matches_reference_on_real_photos(real_jpegs: list[Path], reference_transform) -> None:
    pre = Preprocessor()
    got, fell_back = _tensor_results(real_jpegs)
    assert got, "no JPEG took the tensor path"
    assert sorted(got) + sorted(fell_back) == sorted(got) + sorted(str(p) for p in real_jpegs if str(p) not in got)
    for path, pixels in got.items():
        assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
        db = psnr(pixels, reference_transform(open_image(path)), pre)
        assert db >= MIN_DB, (Path(path).name, db)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_the_reference(tmp_path: Path, orientation: int, reference_transform) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(synthetic_photo(640, 401, seed=orientation), tmp_path / "o.jpg", quality=95, exif=exif)
    got, fell_back = _tensor_results([path])
    assert not fell_back
    assert psnr(got[str(path)], reference_transform(open_image(path)), Preprocessor()) >= MIN_DB


def test_which_files_the_tensor_path_takes(tmp_path: Path) -> None:
    img = synthetic_photo(96, 64, seed=1)

    def jpeg(**kw) -> bytes:
        buf = io.BytesIO()
        img.convert(kw.pop("mode", "RGB")).save(buf, "JPEG", **kw)
        return buf.getvalue()

    baseline = jpeg(quality=90)
    assert tensor_jpeg(baseline)
    assert tensor_jpeg(baseline + b"\0" * 100)  # bytes after the end-of-image marker
    assert not tensor_jpeg(jpeg(progressive=True))
    assert not tensor_jpeg(jpeg(mode="CMYK"))
    assert not tensor_jpeg(jpeg(mode="L"))
    assert not tensor_jpeg(baseline[: len(baseline) - 40])  # truncated: no end-of-image marker
    assert not tensor_jpeg(baseline[:300])
    assert not tensor_jpeg(b"\xff\xd8\xff" + b"\0" * 50)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert not tensor_jpeg(buf.getvalue())


# -- the indexer through the tensor path -------------------------------------------------------------
def test_index_through_tensor_path_ranks_like_pil_path(tmp_path: Path) -> None:
    photos = make_search_photos(tmp_path / "photos")
    reports = {}
    for mode in ("cpu", "tensor"):
        reports[mode] = build(tmp_path / "photos", index=tmp_path / mode, model=str(TINY_MODEL), workers=0,
                              device="cpu", decode=mode)  # fmt: skip
        assert reports[mode].added == len(photos) and reports[mode].failed == 0
    jpegs = sum(p["format"] == "JPEG" for p in photos)
    assert (reports["cpu"].decode, reports["cpu"].tensor_decoded) == ("cpu", 0)
    assert (reports["tensor"].decode, reports["tensor"].tensor_decoded) == ("tensor", jpegs)
    with Index.open(tmp_path / "cpu", device="cpu") as pil, Index.open(tmp_path / "tensor", device="cpu") as ten:
        for cls in FIXTURE_CLASSES:
            a, b = pil.search(cls, k=SEARCH_PER_CLASS), ten.search(cls, k=SEARCH_PER_CLASS)
            assert a[0].path == b[0].path, cls
            assert {h.path for h in a} == {h.path for h in b}, cls
            assert all(Path(h.path).stem.rsplit(" ", 1)[0] == cls for h in b), cls
        # the same rows, with nearly equal embeddings (the PNGs, decoded by the CPU workers both times, differ by
        # the rounding of other batch compositions: cosine >= 0.9998 measured; the JPEGs >= 0.9996)
        ea, eb = _embeddings_by_path(pil), _embeddings_by_path(ten)
        assert sorted(ea) == sorted(eb) == sorted(p["path"] for p in photos)
        for p in photos:
            cos = float(ea[p["path"]] @ eb[p["path"]])
            assert cos >= 0.999, (p["path"], cos)


def _embeddings_by_path(index: Index) -> dict[str, np.ndarray]:
    ids, vecs = index.store.all_embeddings()
    records = index.store.get_images(ids.tolist())
    return {records[int(i)].path: v.astype(np.float32) for i, v in zip(ids, vecs, strict=True)}


def test_refused_files_fall_back_and_are_recorded_as_on_the_cpu(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    img = synthetic_photo(320, 240, seed=3)
    _save(img, folder / "baseline.jpg", quality=90)
    _save(synthetic_photo(320, 240, seed=4), folder / "progressive.jpg", quality=90, progressive=True)
    _save(synthetic_photo(320, 240, seed=5).convert("CMYK"), folder / "cmyk.jpg", quality=90)
    _save(synthetic_photo(320, 240, seed=6), folder / "drawing.png")
    good = (folder / "baseline.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 500)
    reports = {}
    for mode in ("cpu", "tensor"):
        reports[mode] = build(folder, index=tmp_path / mode, model=str(TINY_MODEL), workers=0, device="cpu",
                              decode=mode)  # fmt: skip
    cpu, ten = reports["cpu"], reports["tensor"]
    assert ten.tensor_decoded == 1  # baseline.jpg only
    assert (ten.added, ten.failed) == (cpu.added, cpu.failed) == (4, 2)
    assert sorted(ten.errors) == sorted(cpu.errors)
    assert {Path(p).name for p, _ in ten.errors} == {"truncated.jpg", "garbage.jpg"}
    with Store.open(tmp_path / "tensor") as a, Store.open(tmp_path / "cpu") as b:
        assert a.counts() == b.counts()


def test_tensor_path_with_worker_processes(tmp_path: Path) -> None:
    """The fallback is the build's own process pool: PNGs decoded there, JPEGs here, one index."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        _save(synthetic_photo(200, 150, seed=i), folder / f"{i}.{'png' if i % 2 else 'jpg'}", quality=90)
    report = build(folder, index=tmp_path / "i", model=str(TINY_MODEL), workers=1, device="cpu", decode="tensor")
    assert (report.added, report.failed, report.tensor_decoded) == (6, 0, 3)


def test_decode_gpu_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    make_search_photos(tmp_path / "photos")
    with pytest.raises(RuclipSearchError, match="--decode cpu"):
        build(tmp_path / "photos", index=tmp_path / "i", model=str(TINY_MODEL), workers=0, device="cpu", decode="gpu")
    with pytest.raises(RuclipSearchError, match="Unknown decode mode"):
        build(tmp_path / "photos", index=tmp_path / "i", model=str(TINY_MODEL), workers=0, decode="nvjpeg")
    auto = build(tmp_path / "photos", index=tmp_path / "i", model=str(TINY_MODEL), workers=0, device="cpu")
    assert auto.decode == "cpu"  # auto on the CPU: the workers, as before


def test_cli_build_decode_option(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ruclip_search.cli import main

    make_search_photos(tmp_path / "photos")
    args = ["build", str(tmp_path / "photos"), "--index", str(tmp_path / "i"), "--model", str(TINY_MODEL),
            "--device", "cpu", "--workers", "0", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--decode", "gpu"])
    assert result.exit_code != 0 and "--decode cpu" in result.output
    result = CliRunner().invoke(main, [*args, "--decode", "cpu"])
    assert result.exit_code == 0, result.output


# -- on a GPU ----------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_gpu_decode_matches_cpu_decode(real_jpegs: list[Path]) -> None:
    from ruclip_search.tensor_decode import nvjpeg_available

    assert nvjpeg_available()
    pre = Preprocessor()
    on_gpu, gpu_fell_back = _tensor_results(real_jpegs, "cuda")
    on_cpu, cpu_fell_back = _tensor_results(real_jpegs, "cpu")
    assert sorted(on_gpu) == sorted(on_cpu) and gpu_fell_back == cpu_fell_back and on_gpu
    worst = min(psnr(on_gpu[p], on_cpu[p], pre) for p in on_gpu)
    print(f"GPU vs CPU decode: {len(on_gpu)} JPEGs, min PSNR {worst:.2f} dB")
    assert all(t.device.type == "cuda" for t in on_gpu.values())
    assert worst >= MIN_DB


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["tiny", "ruclip-vit-large-patch14-224"])
def test_half_precision_embeddings_match_fp32(real_jpegs: list[Path], vit_l: Path, dtype, arch: str) -> None:
    from ruclip_search.encoder import load_model

    folder = TINY_MODEL if arch == "tiny" else vit_l
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    ref = load_model(folder, device="cuda", parts=("image",), dtype=torch.float32)
    half = load_model(folder, device="cuda", parts=("image",), dtype=dtype)
    pixels, _ = _tensor_results(real_jpegs, "cuda", ref.preprocessor)
    x = torch.stack(list(pixels.values()))
    a, b = ref.encode_pixels(x), half.encode_pixels(x)
    cos = (a * b).sum(axis=1)
    print(f"{arch} {dtype} vs fp32 on {len(x)} photos: min cosine {cos.min():.6f}")
    assert cos.min() >= 0.999


@pytest.fixture(scope="module")
def vit_l(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ViT-L/14 at 224 (the default model's architecture), as scripts/bench_build.py makes it."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_build import random_model_folder

    return random_model_folder("ruclip-vit-large-patch14-224", tmp_path_factory.mktemp("vit-l") / "model")


@pytest.mark.gpu
@cuda
def test_gpu_build_decodes_jpegs_on_the_gpu(real_jpegs: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in real_jpegs:
        shutil.copy(p, folder / p.name)
    _save(synthetic_photo(300, 200, seed=1), folder / "drawing.png")
    gpu = build(folder, index=tmp_path / "gpu", model=str(TINY_MODEL), device="cuda", workers=2)
    cpu = build(folder, index=tmp_path / "cpu", model=str(TINY_MODEL), device="cpu", workers=2, decode="cpu")
    assert (cpu.decode, cpu.added) == ("cpu", len(real_jpegs) + 1)
    takes = sum(tensor_jpeg(p.read_bytes()) for p in real_jpegs)
    assert (gpu.decode, gpu.tensor_decoded, gpu.added, gpu.failed) == ("gpu", takes, len(real_jpegs) + 1, 0)
    with Index.open(tmp_path / "gpu", device="cpu") as g, Index.open(tmp_path / "cpu", device="cpu") as c:
        eg, ec = _embeddings_by_path(g), _embeddings_by_path(c)
        cos = min(float(eg[p] @ ec[p]) for p in ec)
    print(f"GPU build (nvJPEG + fp16) vs CPU build: min cosine {cos:.5f} over {len(ec)} photos")
    assert cos >= 0.99


# -- the model in half precision ---------------------------------------------------------------------
def test_bfloat16_model_runs_and_matches_fp32_on_the_cpu(real_jpegs: list[Path]) -> None:
    """A half-precision model keeps LayerNorm's weights in float32 (its float32 input would not mix with bf16
    weights: the CUDA build's fp16/bf16 model failed on this before it ever ran)."""
    from ruclip_search.encoder import load_model
    from ruclip_search.model import LayerNorm

    ref = load_model(TINY_MODEL, device="cpu", parts=("image",))
    half = load_model(TINY_MODEL, device="cpu", parts=("image",), dtype="bfloat16")
    assert half.net.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in half.net.modules() if isinstance(m, LayerNorm) for p in m.parameters())
    pixels, _ = _tensor_results(real_jpegs[:6], "cpu", ref.preprocessor)
    x = torch.stack(list(pixels.values()))
    cos = (ref.encode_pixels(x) * half.encode_pixels(x)).sum(axis=1)
    assert cos.min() >= 0.99, cos


def test_quick_gelu_folded_into_silu_is_the_same_function() -> None:
    from ruclip_search.encoder import load_model
    from ruclip_search.model import fold_quick_gelu

    model = load_model(TINY_MODEL, device="cpu", parts=("image", "text"))
    x = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    before_img, before_txt = model.encode_pixels(x), model.encode_text(["красный круг", "синий квадрат"])
    fold_quick_gelu(model.net)
    assert not any(type(m).__name__ == "QuickGELU" for m in model.net.modules())
    assert np.abs(model.encode_pixels(x) - before_img).max() < 1e-5
    assert np.abs(model.encode_text(["красный круг", "синий квадрат"]) - before_txt).max() < 1e-5
