"""Promises the README makes that no other test checks: each test names the promise it guards."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StandInModel, make_photos

NOBODY = 65534


@contextlib.contextmanager
def world_writable_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="ruclip-unpriv-"))
    base.chmod(0o777)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """As root, run the block with the effective uid/gid of `nobody` (the real uid stays 0, so it is restored).

    Root reads files whatever their permissions, and CI runs as root: this makes the permission checks real
    without a second process. Import what the block needs first: nobody may not read every stdlib file.
    """
    root = os.geteuid() == 0
    try:
        if root:
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
        yield
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)


def test_unreadable_file_is_recorded_as_permission_denied() -> None:
    """README: a bad file never stops a build, it is recorded with a reason (here: a file we may not read)."""
    from ruclip_search.indexer import build

    with world_writable_dir() as base:
        photos = base / "photos"
        make_photos(photos, 3, size=24)
        locked = photos / "locked.jpg"
        shutil.copy(sorted(photos.iterdir())[1], locked)
        locked.chmod(0)
        # a first build imports everything the build needs (and as root reads the locked file)
        build(photos, index=base / "warm", model=StandInModel(), workers=0)
        with unprivileged():
            with pytest.raises(PermissionError):  # the check is real: this process may not read it
                locked.read_bytes()
            r = build(photos, index=base / "idx", model=StandInModel(), workers=0)
    assert dict((os.path.basename(p), w) for p, w in r.errors) == {"locked.jpg": "permission denied"}
    assert r.added == 3


def test_minus_subtracts_the_weighted_term(search_index) -> None:
    """README: `search "кот" --minus "собака"`: the whole ranking is the cosine to normalise(q - MINUS_WEIGHT * m),
    and the excluded class falls (it rank first for "круг" alone with the fixture model)."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from ruclip_search.cli import main
    from ruclip_search.defaults import MINUS_WEIGHT
    from ruclip_search.search import Index

    idx_dir = str(search_index[0])
    n = len(search_index[1])

    def ranking(*extra: str) -> list[dict]:
        r = CliRunner().invoke(main, ["search", "круг", *extra, "--index", idx_dir, "--json", "-k", str(n)])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    plain, minus = ranking(), ranking("--minus", "красный круг")
    with Index.open(idx_dir, device="cpu") as idx:
        q = idx.embed_text("круг") - MINUS_WEIGHT * idx.embed_text("красный круг")
        q /= np.linalg.norm(q)
        ids, vecs = idx.store.all_embeddings()
    scores = vecs.astype(np.float32) @ q
    expected = ids[np.lexsort((ids, -scores))]
    assert [h["id"] for h in minus] == expected.tolist()
    np.testing.assert_allclose([h["score"] for h in minus], np.sort(scores)[::-1], atol=1e-4)

    def red(hits: list[dict]) -> list[int]:
        return [i for i, h in enumerate(hits) if Path(h["path"]).stem.startswith("красный круг")]

    assert red(plain) == [0, 1, 2, 3] and all(a > b for a, b in zip(red(minus), red(plain), strict=True))
    assert all("круг" in Path(h["path"]).stem and "красный" not in h["path"] for h in minus[:4])


# -- the HTTP API ---------------------------------------------------------------------------------------
def _served_copy(search_index, tmp_path: Path) -> Path:
    shutil.copytree(search_index[0], tmp_path / "index")
    return tmp_path / "index"


def test_damaged_database_while_serving_answers_503(search_index, tmp_path: Path) -> None:
    """README errors table: 503 `index_unavailable` when the index on disk is damaged."""
    from fastapi.testclient import TestClient

    from ruclip_search.server import create_app

    index = _served_copy(search_index, tmp_path)
    with TestClient(create_app([index], device="cpu"), raise_server_exceptions=False) as c:
        assert c.get("/search", params={"q": "кот"}).status_code == 200
        (index / "index.db").write_bytes(b"garbage" * 1000)
        for url in ("/search?q=кот", "/info", "/images/1"):
            r = c.get(url)
            assert (r.status_code, r.json()["code"]) == (503, "index_unavailable"), (url, r.text)
        assert c.get("/health").status_code == 200


def test_damaged_faiss_file_never_answers_500(search_index, tmp_path: Path) -> None:
    """A build that publishes a damaged FAISS file: the server keeps the version it has or answers 503, never 500."""
    from fastapi.testclient import TestClient

    from ruclip_search.server import create_app
    from ruclip_search.store import Store

    index = _served_copy(search_index, tmp_path)
    with TestClient(create_app([index], device="cpu", refresh_interval=0.01), raise_server_exceptions=False) as c:
        before = c.get("/search", params={"q": "красный круг", "k": 4}).json()
        (index / "faiss-99.index").write_bytes(b"garbage" * 100)
        with Store.open(index, readonly=False) as store:
            store.set_meta(faiss_file="faiss-99.index", index_version=str(store.index_version() + 1))
        time.sleep(0.05)
        r = c.get("/search", params={"q": "красный круг", "k": 4})
        if r.status_code == 200:
            assert r.json()["hits"] == before["hits"] and r.json()["version"] == before["version"]
        else:
            assert (r.status_code, r.json()["code"]) == (503, "index_unavailable"), r.text


def test_damaged_index_at_start_is_a_clear_error(search_index, tmp_path: Path) -> None:
    from ruclip_search.errors import StorageError
    from ruclip_search.server import create_app
    from ruclip_search.store import Store

    index = _served_copy(search_index, tmp_path)
    with Store.open(index) as store:
        faiss_file = store.faiss_path()
    faiss_file.write_bytes(b"garbage")
    with pytest.raises(StorageError, match="reindex"):
        create_app([index], device="cpu")
    (index / "index.db").write_bytes(b"garbage" * 1000)
    with pytest.raises(StorageError, match="damaged"):
        create_app([index], device="cpu")


def test_default_upload_caps(search_index) -> None:
    """README: uploads are capped at 25 MB and 60 megapixels by default (413 upload_too_large / too_many_pixels)."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from ruclip_search import defaults
    from ruclip_search.server import create_app

    assert (defaults.UPLOAD_MAX_BYTES, defaults.UPLOAD_MAX_PIXELS) == (25 * 1024 * 1024, 60_000_000)
    with TestClient(create_app([search_index[0]], device="cpu")) as c:  # no caps passed: the defaults
        big = b"\xff\xd8" + b"\0" * (defaults.UPLOAD_MAX_BYTES - 1)
        r = c.post("/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
        assert (r.status_code, r.json()["code"]) == (413, "upload_too_large")
        buf = io.BytesIO()
        Image.new("1", (7800, 7700)).save(buf, "PNG")  # 60.06 MP, a few kB
        r = c.post("/search/image", files={"file": ("wide.png", buf.getvalue(), "image/png")})
        assert (r.status_code, r.json()["code"]) == (413, "too_many_pixels")


# -- the Python API and the CLI ------------------------------------------------------------------------
def test_readme_top_level_names() -> None:
    """README: `ruclip_search.Index.open`, `ruclip_search.load_model`, `ruclip_search.build`."""
    import ruclip_search
    from ruclip_search.encoder import load_model
    from ruclip_search.indexer import build
    from ruclip_search.search import Hit, Index

    assert (ruclip_search.Index, ruclip_search.Hit) == (Index, Hit)
    assert ruclip_search.load_model is load_model and ruclip_search.build is build
    assert callable(ruclip_search.Index.open) and callable(ruclip_search.zero_shot)
    assert {"Index", "load_model", "build"} <= set(ruclip_search.__all__)


def test_build_exclude_and_max_pixels_through_the_cli(tmp_path: Path, tiny_model_path: Path) -> None:
    """README: `ruclip-index build ./photos --exclude '*/tmp/*' --max-pixels 200000000`."""
    import json

    from click.testing import CliRunner
    from fixture_images import draw

    from ruclip_search.cli import main

    photos = tmp_path / "photos"
    make_photos(photos, 3, size=32)
    make_photos(photos / "2023" / "tmp", 2, size=32, seed=20)  # (a top-level photos/tmp is NOT matched: relpath)
    draw("синий круг", seed=1, size=(120, 100)).save(photos / "big.png")  # 12,000 pixels
    args = ["build", str(photos), "--index", str(tmp_path / "idx"), "--model", str(tiny_model_path)]
    r = CliRunner().invoke(main, [*args, "--workers", "0", "--device", "cpu", "--json",
                                  "--exclude", "*/tmp/*", "--max-pixels", "10000"])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert (report["added"], report["failed"]) == (3, 1), report
    info = json.loads(CliRunner().invoke(main, ["info", "--index", str(tmp_path / "idx"), "--json", "--errors"]).output)
    assert [Path(e["path"]).name for e in info["error_files"]] == ["big.png"]
    assert "pixels" in json.dumps(info["error_files"][0], ensure_ascii=False), info["error_files"]


# -- the model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_text_stops_at_the_last_token_and_matches_the_reference(rows: int) -> None:
    """README: the text tower runs only up to the batch's last EOS, and the result is the reference's (1e-4).

    Every row is short here, so our run really stops early (checked with a hook), unlike a batch holding one
    full-length row; the reference runs all 77 positions."""
    import torch
    from test_model import MID, reference_and_ours

    ref, ours = reference_and_ours(MID)
    gen = torch.Generator().manual_seed(11 + rows)
    ids = torch.zeros(rows, MID["context_length"], dtype=torch.long)
    for i in range(rows):
        n = 1 + int(torch.randint(0, 9, (1,), generator=gen))  # 1-9 tokens: a typical query
        ids[i, 0], ids[i, n + 1] = 2, 3
        ids[i, 1 : n + 1] = torch.randint(4, MID["vocab_size"], (n,), generator=gen)
    seen: list[int] = []
    hook = ours.transformer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            t_ref, t_ours = ref.encode_text(ids), ours.encode_text(ids)
    finally:
        hook.remove()
    last_eos = int((ids == 3).int().argmax(dim=1).max())
    assert seen == [last_eos + 1] and seen[0] < 12  # stopped at the batch's last EOS
    assert (t_ref - t_ours).abs().max().item() <= 1e-4
    if rows > 1:
        assert (t_ours[1:] - t_ours[:1]).abs().max() > 1e-2  # distinct inputs, distinct outputs
