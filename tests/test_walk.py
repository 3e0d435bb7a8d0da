"""walk: hidden files, excludes, content sniffing, non-UTF-8 names, symlink loops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ruclip_search.errors import RuclipSearchError
from ruclip_search.walk import walk


def _touch(path: Path, data: bytes = b"\xff\xd8\xff\xe0") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def rels(root: Path, **kw) -> list[str]:
    return sorted(e.relpath for e in walk([root], **kw))


def test_walk_filters_and_names(tmp_path: Path) -> None:
    _touch(tmp_path / "a.JPG")
    _touch(tmp_path / "Кириллица с пробелом.png")
    _touch(tmp_path / ".hidden.jpg")
    _touch(tmp_path / ".cache" / "x.jpg")
    _touch(tmp_path / "notes.txt", b"shopping list")  # text: skipped by its content, whatever its name
    _touch(tmp_path / "noext", b"\x89PNG\r\n\x1a\n....")
    _touch(tmp_path / "noext-text", b"hello")
    _touch(tmp_path / "raw" / "b.webp")
    _touch(tmp_path / "sub" / "c.heic")
    os.close(os.open(os.fsencode(tmp_path) + b"/bad\xff.jpg", os.O_CREAT | os.O_WRONLY))
    got = rels(tmp_path)
    assert got == sorted(["a.JPG", "Кириллица с пробелом.png", "noext", "raw/b.webp", "sub/c.heic", "bad\udcff.jpg"])
    assert rels(tmp_path, exclude=["raw", "*.png"]) == sorted(["a.JPG", "noext", "sub/c.heic", "bad\udcff.jpg"])
    entry = next(e for e in walk([tmp_path]) if e.relpath == "a.JPG")
    assert entry.size == 4 and entry.mtime_ns == (tmp_path / "a.JPG").stat().st_mtime_ns
    assert os.path.exists(entry.path)


def test_symlinks_and_loops(tmp_path: Path) -> None:
    _touch(tmp_path / "d" / "x.jpg")
    os.symlink(tmp_path, tmp_path / "d" / "loop")
    os.symlink(tmp_path / "d" / "x.jpg", tmp_path / "link.jpg")
    assert rels(tmp_path) == ["d/x.jpg"]
    assert rels(tmp_path, follow_symlinks=True) == ["d/x.jpg", "link.jpg"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(RuclipSearchError):
        list(walk([tmp_path / "nope"]))
