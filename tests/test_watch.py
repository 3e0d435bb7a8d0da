"""`Watcher` and `sync_paths`: folders kept in step with an index while files come, change, move and go."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, StandInModel, ctrl_c_default, make_photos, sigint_ignored
from proctree import alive, descendants, describe, kill_all, wait_gone

from ruclip_search import defaults
from ruclip_search.indexer import build, sync_paths
from ruclip_search.search import Index
from ruclip_search.store import Store
from ruclip_search.watch import Watcher, WatchEvent

LIMIT = 2.0  # a settled change is searchable within this many seconds


_readers: dict[Path, Index] = {}


@pytest.fixture(autouse=True)
def _close_readers() -> Iterator[None]:
    yield
    while _readers:
        _readers.popitem()[1].close()


def indexed(index: Path) -> dict[str, tuple[int, bytes | None]]:
    """path -> (id, content hash) of every image a search finds, through an Index opened once per test in this
    process (a reader like any other: it sees the watcher's commits within defaults.REFRESH_INTERVAL)."""
    if index not in _readers:
        if not list(index.glob("faiss-*.index")):  # not even the first build's FAISS file yet
            return {}
        with Store.open(index) as store:
            stand_in = store.model_name == StandInModel().name
        _readers[index] = Index.open(index, model=StandInModel() if stand_in else None, device="cpu")
    reader = _readers[index]
    query = np.ones(reader._state.dim, dtype=np.float32)
    found = {h.id for h in reader.search(query, k=defaults.MAX_K)}
    with Store.open(index) as store:
        roots = store.roots()
        return {
            os.path.join(roots[rid], os.fsdecode(rel)): (row.id, row.content_hash)
            for (rid, rel), row in store.scan_state().items()
            if row.id in found
        }


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `check()` held (polled); fails after `timeout`."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - t0


def photo_bytes(tmp: Path, seed: int) -> bytes:
    """The bytes of one synthetic photo (drawn elsewhere, so the watched folder sees only the final copy)."""
    folder = tmp / f"src{seed}"
    path = make_photos(folder, n=1, seed=seed)[0]
    return path.read_bytes()


class Events:
    def __init__(self) -> None:
        self.items: list[WatchEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: WatchEvent) -> None:
        with self.lock:
            self.items.append(event)

    def batches(self) -> list[WatchEvent]:
        with self.lock:
            return [e for e in self.items if e.kind == "batch"]


@contextmanager
def started(photos: Path, index: Path, events: Events | None = None) -> Iterator[Watcher]:
    """A started watcher of `photos` with the stand-in model, stopped on the way out."""
    watcher = Watcher([photos], index, model=StandInModel(), workers=0, on_event=events)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Path, Events, Watcher]]:
    """(photos folder with 3 photos, index, events, a started watcher with the stand-in model)."""
    photos = tmp_path / "photos"
    make_photos(photos, n=3)
    index = tmp_path / "idx"
    events = Events()
    with started(photos, index, events) as watcher:
        yield photos, index, events, watcher
    assert watcher._thread is not None and not watcher._thread.is_alive()


def test_create_modify_move_delete(watched, tmp_path: Path) -> None:
    photos, index, events, _ = watched
    assert events.items[0].kind == "ready" and events.items[0].report.added == 3
    assert len(indexed(index)) == 3

    new = photos / "new.jpg"
    new.write_bytes(photo_bytes(tmp_path, 10))
    took = wait_until(lambda: str(new) in indexed(index))
    assert took < LIMIT, took
    first_id, first_hash = indexed(index)[str(new)]

    new.write_bytes(photo_bytes(tmp_path, 11))  # changed content: same row, new embedding
    took = wait_until(lambda: indexed(index).get(str(new), (0, first_hash))[1] != first_hash)
    assert took < LIMIT and indexed(index)[str(new)][0] == first_id

    (photos / "sub").mkdir()
    moved = photos / "sub" / "renamed.jpg"
    new.rename(moved)
    took = wait_until(lambda: str(moved) in indexed(index) and str(new) not in indexed(index))
    assert took < LIMIT and indexed(index)[str(moved)][0] == first_id  # a move keeps the id (no re-encode)

    moved.unlink()
    took = wait_until(lambda: str(moved) not in indexed(index))
    assert took < LIMIT and len(indexed(index)) == 3

    shutil.rmtree(photos / "sub")
    folder = tmp_path / "album"
    make_photos(folder, n=2, seed=40)
    folder.rename(photos / "album")  # a folder moved in from outside
    wait_until(lambda: len(indexed(index)) == 5)
    shutil.move(photos / "album", tmp_path / "away")  # and out again
    took = wait_until(lambda: len(indexed(index)) == 3)
    assert took < LIMIT
    assert sum(e.report.failed for e in events.batches()) == 0


def test_slow_partial_write_is_never_indexed_half_way(watched, tmp_path: Path) -> None:
    photos, index, events, _ = watched
    data = photo_bytes(tmp_path, 20)
    path = photos / "slow.jpg"
    seen: list[bytes | None] = []
    stop = threading.Event()

    def spy() -> None:  # what the index holds for the file, as often as we can look
        while not stop.is_set():
            seen.append(indexed(index).get(str(path), (0, None))[1])
            time.sleep(0.01)

    thread = threading.Thread(target=spy)
    thread.start()
    try:
        with open(path, "wb") as f:
            for half in (data[: len(data) // 2], data[len(data) // 2 :]):
                f.write(half)
                f.flush()
                time.sleep(0.3)
        done = time.monotonic()
        wait_until(lambda: str(path) in indexed(index))
        assert time.monotonic() - done < LIMIT
    finally:
        stop.set()
        thread.join()
    seen.append(indexed(index).get(str(path), (0, None))[1])
    from ruclip_search.loader import file_hash

    assert {h for h in seen if h is not None} == {file_hash(data)}  # never the half-written content
    assert all(e.report.failed == 0 for e in events.batches())


def test_burst_is_batched(watched, tmp_path: Path) -> None:
    photos, index, events, _ = watched
    blobs = [photo_bytes(tmp_path, 100 + i) for i in range(30)]
    before = len(events.batches())
    for i, blob in enumerate(blobs):  # over 0.6 s: files settle at different times, yet share batches
        (photos / f"burst {i:02d}.jpg").write_bytes(blob)
        time.sleep(0.02)
    written = time.monotonic()
    wait_until(lambda: len(indexed(index)) == 33)
    assert time.monotonic() - written < LIMIT
    batches = events.batches()[before:]
    assert sum(e.report.added for e in batches) == 30
    assert len(batches) <= 3, [e.report.added for e in batches]


def test_restart_catches_up(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos, n=4)
    index = tmp_path / "idx"
    watcher = Watcher([photos], index, model=StandInModel(), workers=0)
    watcher.start()
    watcher.stop()
    assert len(indexed(index)) == 4
    # while nobody watches: one added, one deleted, one moved
    (photos / "late.jpg").write_bytes(photo_bytes(tmp_path, 50))
    paths[0].unlink()
    paths[1].rename(photos / "moved.jpg")
    events = Events()
    with started(photos, index, events):
        ready = events.items[0]
        assert ready.kind == "ready"
        r = ready.report
        assert (r.added, r.removed, r.moved, r.unchanged) == (1, 1, 1, 2)
        wait_until(lambda: set(indexed(index)) == {str(p) for p in photos.iterdir()}, timeout=LIMIT)


def test_sync_paths_touches_only_the_given_paths(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos, n=4)
    index = tmp_path / "idx"
    model = StandInModel()
    build(photos, index=index, model=model, workers=0)
    paths[0].unlink()  # not passed: stays in the index
    paths[1].write_bytes(paths[2].read_bytes())  # passed: now a duplicate of 2, reused without the model
    extra = photos / "extra.jpg"
    extra.write_bytes(photo_bytes(tmp_path, 60))
    model.encoded = 0
    report = sync_paths(index, [photos], [paths[1], extra, photos / "gone.jpg"], model=model, write_index=True)
    assert (report.added, report.updated, report.removed, report.reused) == (1, 1, 0, 1)
    assert model.encoded == 1
    assert str(paths[0]) in indexed(index) and len(indexed(index)) == 5
    report = sync_paths(index, [photos], [photos], model=model, write_index=True)  # a root: the whole folder
    assert report.removed == 1 and len(indexed(index)) == 4
    with pytest.raises(Exception, match="not under any"):
        sync_paths(index, [photos], [tmp_path / "elsewhere.jpg"], model=model)


def test_sync_paths_move_seen_in_two_calls_keeps_the_id(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos, n=2)
    index = tmp_path / "idx"
    model = StandInModel()
    build(photos, index=index, model=model, workers=0)
    old_id = indexed(index)[str(paths[0])][0]
    moved = photos / "moved.jpg"
    paths[0].rename(moved)
    model.encoded = 0
    report = sync_paths(index, [photos], [moved], model=model)  # the new name first (watchdog's order)
    assert report.moved == 1 and model.encoded == 0
    report = sync_paths(index, [photos], [paths[0]], model=model)  # then the old one: already moved
    assert (report.removed, report.moved) == (0, 0)
    assert wait_until(lambda: set(indexed(index)) == {str(moved), str(paths[1])}, timeout=LIMIT) >= 0
    assert indexed(index)[str(moved)][0] == old_id


def faiss_meta(index: Path) -> tuple[str | None, str | None]:
    with Store.open(index) as store:
        return store.get_meta("index_version"), store.get_meta("index_count")


def test_write_index_policies(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, n=2)
    index = tmp_path / "idx"
    build(photos, index=index, model=StandInModel(), workers=0)
    extra = photos / "extra.jpg"
    extra.write_bytes(photo_bytes(tmp_path, 70))
    before = faiss_meta(index)
    report = sync_paths(index, [photos], [extra], model=StandInModel(), write_index=False)
    assert report.added == 1 and faiss_meta(index) == before  # FAISS file untouched...
    assert str(extra) in indexed(index)  # ...yet searchable (change log + the reader's segment)
    sync_paths(index, [photos], [], model=StandInModel())  # default: rewrite when cheap (flat), nothing to sync
    assert faiss_meta(index) == (str(int(before[0]) + 1), "3")


def test_watcher_compacts_when_idle(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(defaults, "WATCH_REINDEX", 1.0)
    photos = tmp_path / "photos"
    make_photos(photos, n=2)
    index = tmp_path / "idx"
    with started(photos, index, Events()):
        before = faiss_meta(index)
        new = photos / "new.jpg"
        new.write_bytes(photo_bytes(tmp_path, 75))
        wait_until(lambda: str(new) in indexed(index))
        assert faiss_meta(index) == before  # searchable without a FAISS rewrite
        wait_until(lambda: faiss_meta(index)[1] == "3", timeout=5)  # compacted once idle
        assert int(faiss_meta(index)[0]) == int(before[0]) + 1


@pytest.mark.subprocess
def test_cli_watch_subprocess_sigint(tmp_path: Path, tiny_model_path: Path) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, n=3)
    index = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ruclip_search.cli", "watch", str(photos), "--index", str(index),
           "--model", str(tiny_model_path), "--device", "cpu", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=ctrl_c_default)  # fmt: skip
    tree: list = []
    try:
        wait_until(lambda: len(indexed(index)) == 3 or proc.poll() is not None, timeout=120)
        assert proc.poll() is None
        new = photos / "new.jpg"
        new.write_bytes(photo_bytes(tmp_path, 80))
        wait_until(lambda: str(new) in indexed(index), timeout=LIMIT + 3)
        tree = descendants(proc.pid)
        assert tree, "the watcher keeps its decoding workers running"
        assert not sigint_ignored(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        left, _ = wait_gone(tree, timeout=10)
        assert not left, describe(left)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(alive(tree))
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: interrupted") and "Traceback" not in err, err
    assert sum("interrupted" in line for line in lines) == 1
    assert "1 added" in out, out


def test_serve_watch_runs_a_background_watcher(tmp_path: Path, tiny_model_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    import ruclip_search.server as server
    from ruclip_search.cli import main

    photos = tmp_path / "photos"
    make_photos(photos, n=2)
    index = tmp_path / "idx"
    new = photos / "new.jpg"
    seen: dict[str, object] = {}

    def fake_serve(index_dirs, **kw) -> None:  # the server's lifetime: the watcher works meanwhile
        seen["caught_up"] = len(indexed(index))
        new.write_bytes(photo_bytes(tmp_path, 90))
        seen["took"] = wait_until(lambda: str(new) in indexed(index), timeout=LIMIT + 3)
        seen["threads"] = [t.name for t in threading.enumerate()]

    monkeypatch.setattr(server, "serve", fake_serve)
    args = ["serve", "--index", str(index), "--watch", str(photos), "--model", str(tiny_model_path), "--device", "cpu"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen["caught_up"] == 2 and "ruclip-search watcher" in seen["threads"]
    assert not any(t.name == "ruclip-search watcher" for t in threading.enumerate())  # stopped with the server


def test_walk_paths_follows_walks_rules(tmp_path: Path) -> None:
    from ruclip_search.walk import walk, walk_paths

    root = tmp_path / "root"
    for rel in ["a.jpg", ".hidden/b.jpg", "sub/c.jpg", "sub/.d.jpg", "skip/e.jpg", "sub/deep/f.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    (root / "link").symlink_to(root / "sub")
    asked = ["a.jpg", ".hidden/b.jpg", "sub", "sub/c.jpg", "skip/e.jpg", "notes.txt", "missing.jpg", "link/c.jpg"]
    got = sorted(e.relpath for e in walk_paths(root, asked, exclude=["skip"]))
    assert got == ["a.jpg", "sub/c.jpg", "sub/c.jpg", "sub/deep/f.png"]  # a file and its folder: both found
    assert set(got) == {e.relpath for e in walk([root], exclude=["skip"])} - {"skip/e.jpg"}
    assert sorted(e.relpath for e in walk_paths(root, [""])) == sorted(e.relpath for e in walk([root]))
    assert [e.relpath for e in walk_paths(root, ["link/c.jpg"], follow_symlinks=True)] == ["link/c.jpg"]


@pytest.mark.subprocess
def test_serve_watch_workers_die_with_the_server(tmp_path: Path, tiny_model_path: Path) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, n=3)
    index = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ruclip_search.cli", "serve", "--index", str(index), "--watch", str(photos),
           "--port", "0", "--model", str(tiny_model_path), "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    tree: list = []
    try:
        wait_until(lambda: len(indexed(index)) == 3 or proc.poll() is not None, timeout=120)
        new = photos / "new.jpg"
        new.write_bytes(photo_bytes(tmp_path, 81))
        wait_until(lambda: str(new) in indexed(index) or proc.poll() is not None, timeout=LIMIT + 3)
        assert proc.poll() is None and str(new) in indexed(index)
        tree = descendants(proc.pid)
        assert any("forkserver" in line for line in describe(tree)), describe(tree)
        proc.kill()  # SIGKILL: no clean-up runs in the server; the kernel must take its helpers down
        proc.wait(timeout=30)
        left, _ = wait_gone(tree, timeout=10)
        assert not left, describe(left)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(alive(tree))
