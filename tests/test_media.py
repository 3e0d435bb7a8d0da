"""Camera RAW, videos, Live Photos and formats by content: walk, decode, build, search, CLI and HTTP."""

from __future__ import annotations

import io
import json
import sqlite3
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fixture_images import draw
from media_files import make_dng, make_video, truncated
from PIL import Image

from ruclip_search import defaults, media, video
from ruclip_search.errors import ImageError
from ruclip_search.indexer import build
from ruclip_search.raw import decode_raw
from ruclip_search.store import SCHEMA_VERSION, Store
from ruclip_search.walk import walk


def _jpeg(path: Path, cls: str = "синий круг", size: int = 64) -> Path:
    draw(cls, size=size).save(path, "JPEG")
    return path


# -- kinds and the walk ------------------------------------------------------------------------------
def test_kinds_by_extension_then_by_content(tmp_path: Path) -> None:
    _jpeg(tmp_path / "a.jpg")
    (tmp_path / "photo.bin").write_bytes((tmp_path / "a.jpg").read_bytes())  # a JPEG under an unknown name
    make_video(tmp_path / "clip.mp4", ["синий круг"], seconds_each=1)
    (tmp_path / "clip").write_bytes((tmp_path / "clip.mp4").read_bytes())  # no extension: sniffed
    (tmp_path / "notes.txt").write_text("список покупок\n" * 50, encoding="utf-8")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        z.writestr("a.jpg", (tmp_path / "a.jpg").read_bytes())
    (tmp_path / "x.cr2").write_bytes(b"II*\x00" + bytes(100))
    kinds = {p.name: media.kind_of(p) for p in tmp_path.iterdir()}
    assert kinds == {
        "a.jpg": "photo", "photo.bin": "photo", "clip.mp4": "video", "clip": "video", "notes.txt": None,
        "photos.zip": None, "x.cr2": "raw",
    }  # fmt: skip
    for ext in (".jp2", ".tga", ".ico", ".qoi", ".psd", ".mpo", ".heic"):
        assert media.kind_of(tmp_path / f"x{ext}") == "photo", ext


def test_walk_pairs_raw_with_jpeg_and_live_photos(tmp_path: Path) -> None:
    _jpeg(tmp_path / "IMG_1.JPG")
    (tmp_path / "IMG_1.CR2").write_bytes(b"II*\x00" + bytes(64))
    _jpeg(tmp_path / "IMG_2.jpg")
    make_video(tmp_path / "IMG_2.MOV", ["синий круг"], seconds_each=1)
    (tmp_path / "IMG_3.NEF").write_bytes(b"MM\x00*" + bytes(64))  # a RAW alone is indexed itself
    make_video(tmp_path / "trip.mp4", ["синий круг"], seconds_each=1)
    (tmp_path / "notes.txt").write_text("hello")
    got = {(e.relpath, e.raw_name, e.live_name) for e in walk([tmp_path])}
    assert got == {
        ("IMG_1.JPG", "IMG_1.CR2", None), ("IMG_2.jpg", None, "IMG_2.MOV"), ("IMG_3.NEF", None, None),
        ("trip.mp4", None, None),
    }  # fmt: skip


# -- RAW ---------------------------------------------------------------------------------------------
def test_raw_uses_a_large_enough_preview_else_demosaics(tmp_path: Path) -> None:
    bitmap = make_dng(tmp_path / "b.dng", Image.new("RGB", (96, 72), (200, 20, 20)), jpeg=False).read_bytes()
    image, info = decode_raw(bitmap, min_side=64, fmt="DNG")
    assert info["raw_source"] == "preview" and image.size == (96, 72) and image.getpixel((5, 5)) == (200, 20, 20)
    data = make_dng(tmp_path / "a.dng", Image.new("RGB", (96, 72), (200, 20, 20))).read_bytes()
    image, info = decode_raw(data, min_side=64, fmt="DNG")
    assert info["raw_source"] == "preview" and image.size == (96, 72)
    assert np.abs(np.asarray(image, dtype=int) - (200, 20, 20)).max() < 8  # the JPEG preview
    assert (info["width"], info["height"], info["format"]) == (64, 48, "DNG")  # the sensor's size
    assert (info["camera_make"], info["camera_model"]) == ("TestMake", "TestCam 1")
    assert info["taken_at"].isoformat() == "2021-06-01T18:30:00"
    image, info = decode_raw(data, min_side=80, fmt="DNG")  # preview's short side 72 < 80: demosaic
    assert info["raw_source"] == "demosaic" and image.size == (32, 24)  # half size


def test_bad_raw_is_an_image_error(tmp_path: Path) -> None:
    data = make_dng(tmp_path / "a.dng", None).read_bytes()
    for bad in (data[:200], b"II*\x00" + b"garbage" * 50, b""):
        with pytest.raises(ImageError):
            decode_raw(bad, min_side=32, fmt="DNG")


# -- video -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".mp4", ".mov", ".mkv", ".webm", ".avi"])
def test_video_frames_at_fractions_of_the_duration(tmp_path: Path, ext: str) -> None:
    path = make_video(tmp_path / f"v{ext}", ["красный круг", "синий квадрат"], seconds_each=2,
                      creation_time="2021-06-01T15:30:00.000000Z")  # fmt: skip
    frames, info = video.sample_frames(path, short_side=48)
    times = [t for t, _ in frames]
    assert len(frames) == 5 and times == sorted(times) and abs(times[-1] - 3.6) <= 1.0
    reds = [np.asarray(im)[..., 0].mean() > np.asarray(im)[..., 2].mean() for _, im in frames]
    assert all(r == (t < 2) for r, t in zip(reds, times, strict=True)) or ext == ".avi"  # mpeg4 blurs less well
    assert frames[0][1].size == (48, 48) and info["duration"] == pytest.approx(4.0, abs=0.3)
    assert (info["width"], info["height"], info["format"]) == (64, 64, ext[1:].upper())
    if ext in (".mp4", ".mov", ".mkv"):
        assert info["taken_at"].isoformat() == "2021-06-01T15:30:00+00:00"


def test_video_decodes_a_bounded_number_of_frames(tmp_path: Path) -> None:
    """One keyframe for the whole video: samples after the first decode at most max_decode frames each."""
    import av

    path = tmp_path / "one-gop.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        stream.codec_context.gop_size = 1000
        for i in range(100):
            for packet in stream.encode(av.VideoFrame.from_image(draw("синий круг", seed=i, size=32))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    decoded = []
    real = av.container.InputContainer.decode

    def counting(self, *args, **kwargs):
        for frame in real(self, *args, **kwargs):
            decoded.append(frame.pts)
            yield frame

    av.container.InputContainer.decode = counting
    try:
        frames, _ = video.sample_frames(path, max_decode=4)
    finally:
        av.container.InputContainer.decode = real
    assert len(decoded) <= 1 + 4 * 4  # the keyframe, then at most 4 frames for each later sample
    assert len(frames) >= 1
    # with the default cap, later samples decode forward from that keyframe to their own time: new frames
    times = [t for t, _ in video.sample_frames(path)[0]]
    assert times[:2] == [0.0, pytest.approx(3.0, abs=0.15)] and len(set(times)) == len(times)


def test_bad_videos_are_image_errors(tmp_path: Path) -> None:
    good = make_video(tmp_path / "v.mp4", ["синий круг"], seconds_each=2)
    bad = [truncated(good, tmp_path / "cut.mp4"), tmp_path / "text.mp4", tmp_path / "empty.mkv"]
    bad[1].write_text("not a video")
    bad[2].write_bytes(b"")
    for path in bad:
        with pytest.raises(ImageError):
            video.sample_frames(path)


def test_video_thumbnail_is_the_frame_at_t(tmp_path: Path) -> None:
    from ruclip_search.server.thumbnails import make_thumbnail

    path = make_video(tmp_path / "v.mp4", ["красный круг", "синий квадрат"], seconds_each=2)
    early = Image.open(io.BytesIO(make_thumbnail(path, 64, defaults.MAX_PIXELS, t=0.0)))
    late = Image.open(io.BytesIO(make_thumbnail(path, 64, defaults.MAX_PIXELS, t=3.0)))
    assert np.asarray(early)[..., 0].mean() > np.asarray(late)[..., 0].mean()  # red shape, then blue


# -- the build -----------------------------------------------------------------------------------------
def _library(folder: Path) -> dict[str, Path]:
    """Photos in many formats, a RAW+JPEG pair, a Live Photo, a lone RAW, videos, and bad and non-media files."""
    folder.mkdir(parents=True)
    out = {"jpg": _jpeg(folder / "plain.jpg")}
    for ext in (".jp2", ".tga", ".ico", ".qoi"):
        out[ext] = folder / f"format{ext}"
        draw("зелёный квадрат", size=64).save(out[ext])
    out["pair"] = _jpeg(folder / "IMG_1.JPG", "жёлтый круг")
    make_dng(folder / "IMG_1.DNG", draw("жёлтый круг", size=64))
    out["live"] = _jpeg(folder / "IMG_2.JPG", "синий треугольник")
    make_video(folder / "IMG_2.MOV", ["синий треугольник"], seconds_each=1)
    out["raw"] = make_dng(folder / "lone.dng", draw("красный квадрат", size=96))
    out["video"] = make_video(folder / "trip.mp4", ["красный круг", "синий квадрат"], seconds_each=2)
    out["cut"] = truncated(out["video"], folder / "cut.mp4")
    (folder / "junk.dng").write_bytes(b"II*\x00" + bytes(300))
    (folder / "notes.txt").write_text("заметки\n" * 100, encoding="utf-8")
    with zipfile.ZipFile(folder / "backup.zip", "w") as z:
        z.writestr("plain.jpg", out["jpg"].read_bytes())
    return out


def test_build_indexes_media_and_records_bad_files(tmp_path: Path, stand_in_model) -> None:
    files = _library(tmp_path / "photos")
    index = tmp_path / "index"
    report = build(tmp_path / "photos", index=index, model=stand_in_model, workers=0)
    errors = {Path(p).name: why for p, why in report.errors}
    assert set(errors) == {"cut.mp4", "junk.dng"}, errors  # notes.txt, backup.zip: skipped, not errors
    assert "truncated" in errors["cut.mp4"] or "corrupt" in errors["cut.mp4"]
    assert report.added == 9 and report.failed == 2
    with Store.open(index) as store:
        info = store.info()
        assert (info["images"], info["videos"], info["raw_pairs"], info["live_photos"]) == (9, 1, 1, 1)
        records = {Path(r.path).name: r for r in store.iter_images(errors=False)}
        assert set(records) == {"plain.jpg", "format.jp2", "format.tga", "format.ico", "format.qoi", "IMG_1.JPG",
                                "IMG_2.JPG", "lone.dng", "trip.mp4"}  # fmt: skip
        assert records["IMG_1.JPG"].raw_path == str(tmp_path / "photos" / "IMG_1.DNG")
        assert records["IMG_2.JPG"].live_path == str(tmp_path / "photos" / "IMG_2.MOV")
        trip = records["trip.mp4"]
        assert (trip.media, trip.format, trip.duration) == ("video", "MP4", pytest.approx(4.0, abs=0.3))
        assert records["lone.dng"].camera_model == "TestCam 1" and records["lone.dng"].format == "DNG"
        frames = sqlite3.connect(index / "index.db").execute("SELECT t FROM images WHERE parent_id = ?", (trip.id,))
        assert len(frames.fetchall()) == 4  # five samples: the video's own row is the first
        assert len(store.snapshot_embeddings()[0]) == 9 + 4  # every frame is searchable

    again = build(tmp_path / "photos", index=index, model=stand_in_model, workers=0)
    assert (again.added, again.updated, again.encoded, again.unchanged) == (0, 0, 0, 11)

    # a moved video keeps its id and frames; a deleted one takes its frames with it
    files["video"].rename(tmp_path / "photos" / "moved.mp4")
    moved = build(tmp_path / "photos", index=index, model=stand_in_model, workers=0)
    assert moved.moved == 1 and moved.encoded == 0
    (tmp_path / "photos" / "moved.mp4").unlink()
    build(tmp_path / "photos", index=index, model=stand_in_model, workers=0)
    db = sqlite3.connect(index / "index.db")
    assert db.execute("SELECT count(*) FROM images WHERE parent_id IS NOT NULL").fetchone()[0] == 0


def test_a_raw_joins_its_jpeg_later_and_leaves_again(tmp_path: Path, stand_in_model) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    make_dng(folder / "IMG_9.DNG", draw("жёлтый круг", size=64))
    index = tmp_path / "index"
    assert build(folder, index=index, model=stand_in_model, workers=0).added == 1  # the RAW alone
    _jpeg(folder / "IMG_9.JPG", "жёлтый круг")
    report = build(folder, index=index, model=stand_in_model, workers=0)
    assert (report.added, report.removed) == (1, 1)  # the JPEG stands for both now
    with Store.open(index) as store:
        (record,) = store.iter_images()
        assert Path(record.path).name == "IMG_9.JPG" and Path(record.raw_path).name == "IMG_9.DNG"
    (folder / "IMG_9.DNG").unlink()
    report = build(folder, index=index, model=stand_in_model, workers=0)
    assert (report.added, report.encoded, report.unchanged) == (0, 0, 1)
    with Store.open(index) as store:
        assert next(store.iter_images()).raw_path is None


def test_a_stuck_decode_is_recorded_after_the_timeout(tmp_path: Path, stand_in_model, monkeypatch) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    make_video(folder / "v.mp4", ["синий круг"], seconds_each=1)
    _jpeg(folder / "ok.jpg")

    def stuck(*args, **kwargs):
        while True:  # a decoder that never returns (it does return to Python, as FFmpeg's packet loop does)
            time.sleep(0.01)

    monkeypatch.setattr(video, "sample_frames", stuck)
    monkeypatch.setattr(defaults, "DECODE_TIMEOUT", 0.3)
    t0 = time.perf_counter()
    report = build(folder, index=tmp_path / "index", model=stand_in_model, workers=0)
    assert time.perf_counter() - t0 < 10
    assert report.added == 1 and [Path(p).name for p, _ in report.errors] == ["v.mp4"]
    assert "longer than 0.3 s" in report.errors[0][1]


def test_missing_media_extra_is_an_error_that_names_it(tmp_path: Path, stand_in_model, monkeypatch) -> None:
    import sys

    folder = tmp_path / "photos"
    folder.mkdir()
    make_video(folder / "v.mp4", ["синий круг"], seconds_each=1)
    make_dng(folder / "r.dng", None)
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "rawpy", None)
    report = build(folder, index=tmp_path / "index", model=stand_in_model, workers=0)
    assert report.failed == 2
    assert all("ruclip-search[media]" in why for _, why in report.errors), report.errors


# -- search (the tiny trained model) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import TINY_MODEL

    base = tmp_path_factory.mktemp("media")
    photos = base / "photos"
    photos.mkdir()
    # 10 s: red circle for 6 s, then a blue square: only the later frames (t = 7, 9) show the square
    make_video(photos / "walk.mp4", ["красный круг"] * 3 + ["синий квадрат"] * 2, seconds_each=2, size=64)
    for i, cls in enumerate(["синий квадрат", "зелёный треугольник", "жёлтый круг"]):
        _jpeg(photos / f"photo{i}.jpg", cls)
    report = build(photos, index=base / "index", model=str(TINY_MODEL), workers=0, device="cpu")
    assert report.failed == 0 and report.added == 4
    return base / "index", photos


def test_a_video_is_found_by_a_later_frame_with_its_time(media_index) -> None:
    from ruclip_search.search import Index

    index, photos = media_index
    with Index.open(index, device="cpu") as idx:
        videos = idx.search("синий квадрат", k=5, media="video")
        assert [Path(h.path).name for h in videos] == ["walk.mp4"]
        assert videos[0].media == "video" and 6.0 <= videos[0].t <= 10.0 and videos[0].duration == pytest.approx(10)
        hits = idx.search("синий квадрат", k=10)
        assert len(hits) == 4 and len({h.id for h in hits}) == 4  # frames collapse: the video appears once
        red = idx.search("красный круг", k=1)[0]
        assert Path(red.path).name == "walk.mp4" and red.t < 6.0  # the same video, matched earlier
        photos_only = idx.search("синий квадрат", k=10, media="photo")
        assert {Path(h.path).name for h in photos_only} == {"photo0.jpg", "photo1.jpg", "photo2.jpg"}
        assert all(h.media == "photo" and h.t is None for h in photos_only)
        assert idx.duplicates(0.999) == []  # a video's frames are not its duplicates


def test_cli_and_http_filter_by_media(media_index) -> None:
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from ruclip_search.cli import main
    from ruclip_search.server import create_app

    index, _ = media_index
    result = CliRunner().invoke(main, ["search", "синий квадрат", "--index", str(index), "--media", "video",
                                       "--json", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (hit,) = json.loads(result.output)
    assert hit["media"] == "video" and 6.0 <= hit["t"] <= 10.0
    text = CliRunner().invoke(main, ["search", "синий квадрат", "--index", str(index), "--media", "video",
                                     "--device", "cpu"])  # fmt: skip
    assert "walk.mp4  (t=" in text.output
    bad = CliRunner().invoke(main, ["search", "кот", "--index", str(index), "--media", "audio"])
    assert bad.exit_code == 2
    info = CliRunner().invoke(main, ["info", "--index", str(index)])
    assert "(1 videos)" in info.output

    with TestClient(create_app([index], device="cpu")) as client:
        r = client.get("/search", params={"q": "синий квадрат", "media": "video"})
        assert r.status_code == 200, r.text
        (hit,) = r.json()["hits"]
        assert hit["media"] == "video" and 6.0 <= hit["t"] <= 10.0 and f"t={hit['t']:g}" in hit["thumbnail_url"]
        thumb = client.get(hit["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        r = client.get("/search", params={"q": "синий квадрат", "media": "photo", "k": 10})
        assert {h["media"] for h in r.json()["hits"]} == {"photo"}
        assert client.get("/search", params={"q": "x", "media": "audio"}).status_code == 422


# -- schema --------------------------------------------------------------------------------------------
def test_asking_whether_videos_are_stored_scans_no_table(tmp_path: Path) -> None:
    """Every search asks `has_videos`: at 1M photos a table scan for `media = 'video'` cost 1.05 s (m006)."""
    import sqlalchemy as sa

    store = Store.create(tmp_path)
    seen: list[tuple[str, object]] = []

    def record(conn: object, cursor: object, sql: str, params: object, *rest: object) -> None:
        seen.append((sql, params))

    sa.event.listen(store.engine, "before_cursor_execute", record)
    assert store.has_videos() is False
    sa.event.remove(store.engine, "before_cursor_execute", record)
    plans = []
    with store.engine.connect() as conn:
        for sql, params in seen:
            plans += [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert plans and not [p for p in plans if p.startswith("SCAN images")], plans
    store.close()


def test_m004_upgrades_an_index_in_place(tmp_path: Path) -> None:
    store = Store(tmp_path, readonly=False)
    store.migrate(3)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO roots (id, path) VALUES (1, x'2f70')")
        conn.exec_driver_sql(
            "INSERT INTO images (root_id, relpath, size, mtime_ns, embedding) VALUES (1, x'61', 1, 2, x'00')"
        )
    store.close()
    with Store.open(tmp_path, readonly=False) as store:
        assert store.schema_version() == SCHEMA_VERSION and store.get_meta("migration_004") == "m004_media"
        (record,) = store.iter_images()
        assert (record.media, record.t, record.raw_path, record.parent_id) == (None, None, None, None)
        assert store.counts() == {"images": 1, "errors": 0, "videos": 0, "raw_pairs": 0, "live_photos": 0}


def test_sync_of_a_live_photos_video_links_it_to_the_still(tmp_path: Path, stand_in_model) -> None:
    """The watcher's path: syncing just the MOV that arrives after its still updates the still's row."""
    from ruclip_search.indexer import sync_paths

    folder = tmp_path / "photos"
    folder.mkdir()
    still = _jpeg(folder / "IMG_5.JPG", "синий треугольник")
    index = tmp_path / "index"
    build(folder, index=index, model=stand_in_model, workers=0)
    mov = make_video(folder / "IMG_5.MOV", ["синий треугольник"], seconds_each=1)
    report = sync_paths(index, [folder], [mov], model=stand_in_model)
    assert (report.added, report.failed, report.encoded) == (0, 0, 0)
    with Store.open(index) as store:
        (record,) = store.iter_images()
        assert record.path == str(still) and record.live_path == str(mov)
    mov.unlink()
    sync_paths(index, [folder], [mov], model=stand_in_model)
    with Store.open(index) as store:
        assert next(store.iter_images()).live_path is None
