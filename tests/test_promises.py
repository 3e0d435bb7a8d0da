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
