"""build(engine="ray") on a local 2-CPU Ray cluster: the same index as a local build, bad files recorded,
dead workers and actors retried. Marked `ray` (a cluster takes seconds to start); .ci/run runs them."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photos
from test_indexer import snapshot

from ruclip_search.indexer import build
from ruclip_search.loader import WORKER_DIED
from ruclip_search.store import Store

pytestmark = pytest.mark.ray
BATCH = 4


def rows(index: Path) -> dict[str, tuple]:
    """path -> every stored column a build decides (not ids or times)."""
    with Store.open(index) as store:
        return {
            r.path: (r.size, r.mtime_ns, r.width, r.height, r.format, r.taken_at, r.camera_make, r.error)
            for r in store.iter_images()
        }


def assert_same_index(got: Path, expected: Path) -> None:
    assert rows(got) == rows(expected)
    a, b = snapshot(got), snapshot(expected)
    assert a.keys() == b.keys()
    for path, vec in b.items():
        np.testing.assert_allclose(a[path], vec, atol=1e-6, rtol=0, err_msg=path)
    with Store.open(got) as g, Store.open(expected) as e:
        assert (g.model_name, g.dim) == (e.model_name, e.dim)


@pytest.fixture(scope="module")
def local_build(tmp_path_factory: pytest.TempPathFactory, tiny_model_path_session: Path) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("raylocal")
    photos = base / "photos"
    make_photos(photos, 20, size=64)
    shutil.copy(sorted(photos.iterdir())[1], photos / "dup.jpg")  # a duplicate: reused, not encoded twice
    (photos / "text.jpg").write_bytes(b"not a picture")
    index = base / "local"
    r = build(photos, index=index, model=str(tiny_model_path_session), workers=0, device="cpu", batch_size=BATCH)
    assert (r.added, r.failed, r.reused) == (21, 1, 1)
    return photos, index


@pytest.fixture(scope="module")
def tiny_model_path_session() -> Path:
    from conftest import TINY_MODEL

    assert (TINY_MODEL / "config.json").is_file()
    return TINY_MODEL


def test_ray_build_equals_local_build(ray_cluster: str, local_build: tuple[Path, Path], tmp_path: Path,
                                      tiny_model_path_session: Path) -> None:  # fmt: skip
    photos, expected = local_build
    index = tmp_path / "ray"
    r = build(photos, index=index, model=str(tiny_model_path_session), device="cpu", batch_size=BATCH,
              engine="ray")  # fmt: skip
    assert (r.added, r.failed, r.reused + r.encoded) == (21, 1, 21)
    assert_same_index(index, expected)
    # incremental as ever: nothing to do, then one changed file is the only one sent to the cluster
    r = build(photos, index=index, model=str(tiny_model_path_session), device="cpu", engine="ray")
    assert (r.added, r.updated, r.unchanged, r.encoded) == (0, 0, 22, 0)
    from fixture_images import draw

    draw("синий круг", seed=77, size=64).save(photos / "000 new.png")
    try:
        r = build(photos, index=index, model=str(tiny_model_path_session), device="cpu", engine="ray")
        assert (r.added, r.encoded, r.unchanged) == (1, 1, 22)
    finally:
        (photos / "000 new.png").unlink()


def test_ray_bad_files_and_dead_workers(ray_cluster: str, local_build: tuple[Path, Path], tmp_path: Path,
                                        tiny_model_path_session: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Bad files are recorded; a worker that dies once is retried, one that always dies pins its file; an
    encoder actor that dies is restarted and its batch retried. The good files end as in a local build."""
    from crashing_loader import DiesOnceModel, exit_on_crash_jpg_in_ray, exit_once_on_flaky_jpg

    import ruclip_search.ray_engine as ray_engine
    from ruclip_search.encoder import load_model

    photos, expected = local_build
    mine = tmp_path / "photos"
    shutil.copytree(photos, mine)
    good = sorted(mine.iterdir())[2].read_bytes()
    (mine / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (mine / "zero.jpg").write_bytes(b"")
    (mine / "crash.jpg").write_bytes(good + b"x")

    real = ray_engine.encode_on_ray
    monkeypatch.setattr(ray_engine, "encode_on_ray", functools.partial(real, loader=exit_on_crash_jpg_in_ray))
    model = DiesOnceModel(load_model(tiny_model_path_session, device="cpu", parts=("image",)),
                          str(tmp_path / "actor-died"))  # fmt: skip
    index = tmp_path / "ray"
    r = build(mine, index=index, model=model, device="cpu", batch_size=BATCH, engine="ray")
    assert (tmp_path / "actor-died").exists()  # an actor did die, and the build went on
    reasons = {os.path.basename(p): why for p, why in r.errors}
    assert set(reasons) == {"text.jpg", "truncated.jpg", "zero.jpg", "crash.jpg"}, reasons
    assert reasons["crash.jpg"] == WORKER_DIED and "0 bytes" in reasons["zero.jpg"]
    assert r.added == 21
    got = snapshot(index)
    for path, vec in snapshot(expected).items():
        np.testing.assert_allclose(got[path.replace(str(photos), str(mine))], vec, atol=1e-6, rtol=0)

    # a worker that dies once on a file is retried by Ray: the file is indexed
    flaky = mine / "flaky.jpg"
    flaky.write_bytes(good + b"f")
    monkeypatch.setattr(ray_engine, "encode_on_ray", functools.partial(real, loader=exit_once_on_flaky_jpg))
    r = build(mine, index=index, device="cpu", engine="ray")
    assert (r.added, r.failed) == (1, 0) and (mine / "flaky.jpg.died").exists()


def media_rows(index: Path) -> dict[tuple, tuple]:
    """(relpath, t) -> what a build decides of every row, frame rows of videos included, embedding last."""
    import sqlite3

    con = sqlite3.connect(index / "index.db")
    try:
        got = con.execute(
            "SELECT COALESCE(i.relpath, v.relpath), i.t, i.media, i.parent_id IS NOT NULL, i.raw_name, i.live_name, "
            "i.width, i.height, i.format, i.duration, i.error, i.embedding "
            "FROM images i LEFT JOIN images v ON v.id = i.parent_id"
        ).fetchall()
    finally:
        con.close()
    return {(bytes(r[0]), r[1]): r[2:] for r in got}


def test_ray_build_indexes_videos_and_pairs_as_a_local_build(ray_cluster: str, tmp_path: Path,
                                                            tiny_model_path_session: Path) -> None:  # fmt: skip
    """Videos (decoded by this build's local path), RAW+JPEG pairs, Live Photos and a lone RAW (decoded on the
    cluster) end as in a local build: the same rows, frame rows included, and embeddings to 1e-6."""
    from fixture_images import FIXTURE_CLASSES, draw
    from media_files import make_dng, make_video

    photos = tmp_path / "photos"
    make_photos(photos, 6, size=64)
    make_video(photos / "trip.mp4", list(FIXTURE_CLASSES[:2]), seconds_each=1)
    draw(FIXTURE_CLASSES[0], seed=5, size=64).save(photos / "IMG_1.JPG")
    make_dng(photos / "IMG_1.DNG", draw(FIXTURE_CLASSES[0], seed=5, size=64))
    draw(FIXTURE_CLASSES[1], seed=6, size=64).save(photos / "IMG_2.JPG")
    make_video(photos / "IMG_2.MOV", [FIXTURE_CLASSES[1]], seconds_each=1)
    make_dng(photos / "lone.dng", draw(FIXTURE_CLASSES[2], seed=7, size=96))
    model = str(tiny_model_path_session)
    local = build(photos, index=tmp_path / "local", model=model, workers=0, device="cpu", batch_size=BATCH)
    r = build(photos, index=tmp_path / "ray", model=model, device="cpu", batch_size=BATCH, engine="ray")
    assert (r.added, r.failed, r.encoded) == (local.added, local.failed, local.encoded) == (10, 0, 10)
    got, expected = media_rows(tmp_path / "ray"), media_rows(tmp_path / "local")
    assert got.keys() == expected.keys()
    assert sum(1 for row in expected.values() if row[1]) >= 4  # the video's frame rows are there
    for key, row in expected.items():
        assert got[key][:-1] == row[:-1], key
        a, b = (np.frombuffer(x, dtype=np.float16).astype(np.float32) for x in (got[key][-1], row[-1]))
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=str(key))
