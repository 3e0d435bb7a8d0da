"""Find photos, RAW files and videos under photo folders: fast (os.scandir), hidden-file aware, loop-safe,
bytes-safe names. Which files are media is `media.kind_of`'s call (extension, else the first bytes).

A folder's files with the same stem are one item when they are a RAW+JPEG pair (IMG_1.CR2 + IMG_1.JPG) or a
Live Photo (IMG_2.HEIC + IMG_2.MOV): the still is yielded, naming its RAW or video; those are not yielded.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import media
from .errors import RuclipSearchError


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One candidate image: its root folder, path relative to it (str, surrogateescape-safe), size, mtime."""

    root: str
    relpath: str
    size: int
    mtime_ns: int
    raw_name: str | None = None  # the RAW file beside this still (a RAW+JPEG pair)
    live_name: str | None = None  # the video beside this still (a Live Photo)

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as printable text: non-UTF-8 name bytes (kept as surrogates in str paths) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


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
        except OSError:  # gone (deleted or moved away); if it was a pair's RAW or video, its still is alone now
            still = _still_beside(os.path.dirname(path), parts[-1])
            if still is not None:
                entry = _still_entry(root, rel, *_pair_in_folder(os.path.dirname(path), still, media.PHOTO))
                if entry is not None:
                    yield entry
            continue
        if stat.S_ISDIR(st.st_mode):
            folders.append(rel)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        kind = media.kind_of(path)
        if kind is None:
            continue
        owner, raw_name, live_name = _pair_in_folder(os.path.dirname(path), parts[-1], kind)
        if owner != parts[-1]:  # the RAW or video of a pair: the still stands for both
            entry = _still_entry(root, rel, owner, raw_name, live_name)
            if entry is not None:
                yield entry
            continue
        yield FileEntry(root, rel, st.st_size, st.st_mtime_ns, raw_name, live_name)
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
        files: list[tuple[str, str, str, os.stat_result]] = []  # (name, rel, kind, stat)
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
                kind = media.kind_of(entry.path)
                if kind is None:
                    continue  # not media (text, archives...): skipped, not an error
                fst = entry.stat(follow_symlinks=follow_symlinks)
            except OSError:
                continue  # vanished or broken link between listing and stat
            files.append((name, rel, kind, fst))
        for _name, rel, raw_name, live_name, fst in _paired(files):
            yield FileEntry(root, rel, fst.st_size, fst.st_mtime_ns, raw_name, live_name)
        stack.extend(reversed(subdirs))


def _stem(name: str) -> str:
    return os.path.splitext(name)[0].casefold()


def _pairs(names: list[tuple[str, str]]) -> dict[str, tuple[str | None, str | None]]:
    """For one folder's media files [(name, kind)]: still name -> (RAW name, Live Photo video name) of every
    still that has either (same stem, case-insensitive)."""
    by_stem: dict[str, list[tuple[str, str]]] = {}
    for name, kind in names:
        by_stem.setdefault(_stem(name), []).append((name, kind))
    out: dict[str, tuple[str | None, str | None]] = {}
    for group in by_stem.values():
        if len(group) < 2:
            continue
        stills = [n for n, k in group if k == media.PHOTO and os.path.splitext(n)[1].lower() in media.STILL_EXTENSIONS]
        if not stills:
            continue
        order = {ext: i for i, ext in enumerate(media.STILL_EXTENSIONS)}
        still = min(stills, key=lambda n: (order[os.path.splitext(n)[1].lower()], n))
        raw = next((n for n, k in sorted(group) if k == media.RAW), None)
        live = next(
            (
                n
                for n, k in sorted(group)
                if k == media.VIDEO and os.path.splitext(n)[1].lower() in media.LIVE_EXTENSIONS
            ),
            None,
        )
        if raw or live:
            out[still] = (raw, live)
    return out


def _paired(files: list[tuple[str, str, str, os.stat_result]]) -> Iterator[tuple[str, str, str | None, str | None,
                                                                                os.stat_result]]:  # fmt: skip
    """A folder's files as yielded: the RAW and video halves of pairs dropped, their stills naming them."""
    pairs = _pairs([(name, kind) for name, _, kind, _ in files])
    companions = {n for raw, live in pairs.values() for n in (raw, live) if n}
    for name, rel, _, fst in files:
        if name in companions:
            continue
        raw, live = pairs.get(name, (None, None))
        yield name, rel, raw, live, fst


def _still_entry(root: str, rel: str, owner: str, raw_name: str | None, live_name: str | None) -> FileEntry | None:
    """The entry of the still `owner` that stands for a pair, beside `rel` (None if it is gone meanwhile)."""
    rel = os.path.join(os.path.dirname(rel), owner) if os.path.dirname(rel) else owner
    try:
        st = os.stat(os.path.join(root, rel))
    except OSError:
        return None
    return FileEntry(root, rel, st.st_size, st.st_mtime_ns, raw_name, live_name)


def _still_beside(folder: str, name: str) -> str | None:
    """The still (JPEG, HEIC...) with the same stem as `name` in `folder`, if any."""
    stem = _stem(name)
    try:
        names = sorted(n for n in os.listdir(folder) if _stem(n) == stem and n != name and not n.startswith("."))
    except OSError:
        return None
    return next((n for n in names if os.path.splitext(n)[1].lower() in media.STILL_EXTENSIONS), None)


def _pair_in_folder(folder: str, name: str, kind: str) -> tuple[str, str | None, str | None]:
    """(the name standing for `name`: itself or its pair's still, RAW name, video name) from `name`'s folder."""
    stem = _stem(name)
    try:
        siblings = [n for n in os.listdir(folder) if _stem(n) == stem and not n.startswith(".")]
    except OSError:
        return name, None, None
    kinds = [(n, kind if n == name else media.kind_of(os.path.join(folder, n), sniff_unknown=False)) for n in siblings]
    pairs = _pairs([(n, k) for n, k in kinds if k is not None])
    for still, (raw, live) in pairs.items():
        if name in (still, raw, live):
            return still, raw, live
    return name, None, None
