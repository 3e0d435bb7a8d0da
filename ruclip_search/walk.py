"""Find image files under photo folders: fast (os.scandir), hidden-file aware, loop-safe, bytes-safe names."""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import RuclipSearchError

# Extensions taken without looking inside; files with no extension are sniffed by their first bytes.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .gif .bmp .dib .tif .tiff .heic .heif .hif .avif".split()
)

_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One candidate image: its root folder, path relative to it (str, surrogateescape-safe), size, mtime."""

    root: str
    relpath: str
    size: int
    mtime_ns: int

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as printable text: non-UTF-8 name bytes (kept as surrogates in str paths) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def looks_like_image(path: str) -> bool:
    """Sniff the first bytes of a file with no extension (JPEG, PNG, GIF, BMP, TIFF, WebP, HEIF/AVIF)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head.startswith(_MAGIC):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[4:8] == b"ftyp"


def _excluded(relpath: str, name: str, patterns: tuple[str, ...]) -> bool:
    for pat in patterns:
        if fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(relpath, pat):
            return True
        if pat.endswith("/") and fnmatch.fnmatch(relpath + "/", pat + "*"):
            return True
    return False


def walk(
    roots: Iterable[str | os.PathLike[str]],
    *,
    exclude: Iterable[str] = (),
    follow_symlinks: bool = False,
) -> Iterator[FileEntry]:
    """Yield image files under each root, skipping hidden names and `exclude` globs (name or relpath).

    Symlinks are skipped unless `follow_symlinks`; then folders are tracked by (st_dev, st_ino): loops end.
    Raises RuclipSearchError if a root is not a directory.
    """
    patterns = tuple(exclude)
    for root in roots:
        root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(root):
            raise RuclipSearchError(f"{root!r} is not a folder: give a folder of photos.")
        yield from _walk_tree(root, [""], patterns, follow_symlinks)


def walk_paths(
    root: str | os.PathLike[str],
    relpaths: Iterable[str],
    *,
    exclude: Iterable[str] = (),
    follow_symlinks: bool = False,
) -> Iterator[FileEntry]:
    """Yield the image files that `walk([root])` would yield at or under each of `relpaths` (a file or a folder,
    relative to `root`; "" is the whole root). Paths that are missing, hidden, excluded or not images yield
    nothing. The watcher's view of a few changed paths, by the same rules as a full walk."""
    patterns = tuple(exclude)
    root = os.path.abspath(os.fspath(root))
    folders: list[str] = []
    for rel in relpaths:
        if rel == "":
            folders.append(rel)
            continue
        parts = rel.split(os.sep)
        if any(part.startswith(".") or not part for part in parts):
            continue
        if patterns and any(_excluded(os.sep.join(parts[: i + 1]), parts[i], patterns) for i in range(len(parts))):
            continue
        path = os.path.join(root, rel)
        if not follow_symlinks and any(os.path.islink(os.path.join(root, *parts[:i])) for i in range(1, len(parts))):
            continue  # walk does not enter a linked folder unless told to
        try:
            st = os.stat(path) if follow_symlinks else os.lstat(path)
        except OSError:
            continue  # gone (deleted or moved away)
        if stat.S_ISDIR(st.st_mode):
            folders.append(rel)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        ext = os.path.splitext(parts[-1])[1].lower()
        if ext not in IMAGE_EXTENSIONS and not (ext == "" and looks_like_image(path)):
            continue
        yield FileEntry(root, rel, st.st_size, st.st_mtime_ns)
    if folders:
        yield from _walk_tree(root, folders, patterns, follow_symlinks)


def _walk_tree(root: str, starts: list[str], patterns: tuple[str, ...], follow_symlinks: bool) -> Iterator[FileEntry]:
    """Image files in the folders `starts` (relative to `root`) and below them."""
    seen: set[tuple[int, int]] = set()
    for rel_dir in starts:
        try:
            st = os.stat(os.path.join(root, rel_dir) if rel_dir else root)
        except OSError:
            continue
        seen.add((st.st_dev, st.st_ino))
    stack: list[str] = list(reversed(starts))
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # unreadable or vanished folder: nothing to index there
        subdirs: list[str] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if patterns and _excluded(rel, name, patterns):
                continue
            try:
                is_link = entry.is_symlink()
                if is_link and not follow_symlinks:
                    continue
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    dst = entry.stat(follow_symlinks=True)
                    key = (dst.st_dev, dst.st_ino)
                    if key not in seen:
                        seen.add(key)
                        subdirs.append(rel)
                    continue
                if not entry.is_file(follow_symlinks=follow_symlinks):
                    continue
                ext = os.path.splitext(name)[1].lower()
                if ext not in IMAGE_EXTENSIONS and not (ext == "" and looks_like_image(entry.path)):
                    continue
                fst = entry.stat(follow_symlinks=follow_symlinks)
            except OSError:
                continue  # vanished or broken link between listing and stat
            yield FileEntry(root, rel, fst.st_size, fst.st_mtime_ns)
        stack.extend(reversed(subdirs))
