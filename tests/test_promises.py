"""Promises the README makes that no other test checks: each test names the promise it guards."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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
