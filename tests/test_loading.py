"""Loading checkpoints: released-format folders, safetensors, unsafe pickles, corrupt and missing files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ruclip_search import errors
from ruclip_search.encoder import load_model
from ruclip_search.registry import MODELS, hub_repo

TINY = Path(__file__).parent / "fixtures" / "tiny-ruclip"


@pytest.fixture
def tiny_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(TINY, dst)
    return dst


def test_load_fixture_and_encode_text():
    m = load_model(TINY, device="cpu")
    assert (m.dim, m.image_size, m.context_length) == (32, 32, 77)
    e = m.encode_text(["красный круг", "синий квадрат"])
    assert e.shape == (2, 32) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert not np.allclose(e[0], e[1])
    ids = m.tokenize("Красный круг")
    assert ids.shape == (1, 77) and ids.dtype == np.int64 and ids[0, 0] == 2 and 3 in ids[0]


def test_text_only_model_has_no_image_tower():
    m = load_model(TINY, device="cpu", parts=("text",))
    assert not hasattr(m.net, "visual")
    full = load_model(TINY, device="cpu")
    assert np.allclose(m.encode_text("жёлтый треугольник"), full.encode_text("жёлтый треугольник"), atol=1e-6)
    with pytest.raises(errors.QueryError, match="parts"):
        m.encode_pixels(torch.zeros(1, 3, 32, 32))


def test_safetensors_weights_are_accepted(tiny_copy: Path):
    from safetensors.torch import save_file

    sd = torch.load(tiny_copy / "pytorch_model.bin", weights_only=True)
    save_file(sd, str(tiny_copy / "model.safetensors"))
    (tiny_copy / "pytorch_model.bin").unlink()
    a = load_model(tiny_copy, device="cpu").encode_text("синий круг")
    b = load_model(TINY, device="cpu").encode_text("синий круг")
    assert np.array_equal(a, b)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ruclip-search-pwned",))


def test_pickle_that_runs_code_is_refused(tiny_copy: Path):
    sd = torch.load(tiny_copy / "pytorch_model.bin", weights_only=True)
    sd["evil"] = _Evil()
    torch.save(sd, tiny_copy / "pytorch_model.bin")
    with pytest.raises(errors.CheckpointError, match="refused"):
        load_model(tiny_copy, device="cpu")
    assert not Path("/tmp/ruclip-search-pwned").exists()


def test_truncated_weights_name_the_file(tiny_copy: Path):
    w = tiny_copy / "pytorch_model.bin"
    w.write_bytes(w.read_bytes()[:5000])
    with pytest.raises(errors.CheckpointError, match="pytorch_model.bin"):
        load_model(tiny_copy, device="cpu")


def test_weights_of_another_model_are_refused(tiny_copy: Path):
    cfg = (tiny_copy / "config.json").read_text().replace('"embed_dim": 32', '"embed_dim": 48')
    (tiny_copy / "config.json").write_text(cfg)
    with pytest.raises(errors.CheckpointError, match="different models"):
        load_model(tiny_copy, device="cpu")


@pytest.mark.parametrize("missing", ["config.json", "bpe.model", "pytorch_model.bin"])
def test_missing_file_is_named(tiny_copy: Path, missing: str):
    (tiny_copy / missing).unlink()
    with pytest.raises(errors.ModelNotFoundError, match=missing.split(".")[0]):
        load_model(tiny_copy, device="cpu")


def test_corrupt_config(tiny_copy: Path):
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(errors.CheckpointError, match="config.json"):
        load_model(tiny_copy, device="cpu")


def test_unknown_name():
    with pytest.raises(errors.ModelNotFoundError, match="ruclip-vit-large-patch14-224"):
        load_model("ruclip-vit-huge", device="cpu")


def test_registry_names_and_repos():
    assert len(MODELS) == 6 and "ruclip-vit-large-patch14-224" in MODELS
    assert hub_repo("ruclip-vit-base-patch32-224") == "ai-forever/ruclip-vit-base-patch32-224"


def test_offline_and_not_cached_is_one_clear_line(tmp_path: Path):
    code = (
        "from ruclip_search.registry import resolve\n"
        "from ruclip_search.errors import ModelNotFoundError\n"
        "try:\n    resolve('ruclip-vit-base-patch32-224')\n"
        "except ModelNotFoundError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERR ") and "HF_HUB_OFFLINE" in out.stdout, out.stdout + out.stderr
    assert len(out.stdout.strip().splitlines()) == 1


def test_hub_cache_layout_is_used_offline(tmp_path: Path):
    """A model already in the HF cache (as hf_hub_download leaves it) loads with HF_HUB_OFFLINE=1."""
    hf = tmp_path / "hf"
    repo_dir = hf / "hub" / ("models--" + hub_repo("ruclip-vit-base-patch32-224").replace("/", "--"))
    commit = "0" * 40
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "pytorch_model.bin", "bpe.model"):
        shutil.copy(TINY / f, snap / f)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    code = "from ruclip_search.registry import resolve\nprint(resolve('ruclip-vit-base-patch32-224'))\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == snap


def test_int8_quantized_text_tower_stays_close():
    exact = load_model(TINY, device="cpu", parts=("text",))
    q8 = load_model(TINY, device="cpu", parts=("text",), quantize="int8")
    texts = ["красный круг", "синий квадрат", "жёлтый треугольник", "рыжий кот спит на диване", "море"]
    cos = (exact.encode_text(texts) * q8.encode_text(texts)).sum(1)
    assert cos.min() >= 0.998  # README: int8 keeps cosine 0.998 to fp32 (tiny model: min 0.9992)
    with pytest.raises(ValueError, match="int8"):
        load_model(TINY, device="cpu", quantize="int4")
