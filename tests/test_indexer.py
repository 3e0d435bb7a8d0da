"""indexer.build: incremental counts, content-hash reuse, bad input recorded, lock, model checks, FAISS agreement."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import StandInModel, make_photos

from ruclip_search import faiss_index
from ruclip_search.errors import IndexLockedError, ModelMismatchError
from ruclip_search.indexer import build, reindex
from ruclip_search.loader import WORKER_DIED, _Decoder
from ruclip_search.store import IndexLock, Store


def snapshot(index: Path, db: str | None = None) -> dict[str, np.ndarray]:
    """path -> embedding of every indexed image; also checks FAISS and the database agree."""
    with Store.open(index, db=db) as store:
        ids, vecs = store.all_embeddings()
        records = store.get_images(ids.tolist())
        faiss = faiss_index.load(store.faiss_path())
        assert faiss.ntotal == len(ids)
        import faiss as faiss_lib

        assert sorted(faiss_lib.vector_to_array(faiss.id_map).tolist()) == sorted(ids.tolist())
        for i, v in zip(ids.tolist(), vecs, strict=True):
            np.testing.assert_allclose(faiss.reconstruct(i), v)
        paths = [records[i].path for i in ids.tolist()]
    assert len(set(paths)) == len(paths)
    return dict(zip(paths, vecs, strict=True))


def test_incremental_counts_and_reuse(tmp_path: Path, photos: Path, db: str | None) -> None:
    model, index = StandInModel(), tmp_path / "idx"
    r = build(photos, index=index, model=model, workers=0, batch_size=5, db=db)
    assert (r.added, r.failed, r.encoded) == (12, 0, 12) and model.encoded == 12
    assert r.index_type == "flat" and r.recall_at_10 == 1.0
    first = snapshot(index, db=db)

    r = build(photos, index=index, model=model, workers=0, db=db)
    assert (r.added, r.updated, r.moved, r.removed, r.unchanged, r.encoded) == (0, 0, 0, 0, 12, 0)

    files = sorted(photos.iterdir())
    files[0].rename(photos / "renamed.png")  # move
    shutil.copy(files[1], photos / "copy.jpg")  # exact duplicate
    files[2].unlink()  # delete
    make_photos(tmp_path / "new", 1, seed=100)[0].rename(photos / "brand new.png")  # add
    from fixture_images import draw

    draw("синий круг", seed=55, size=48).save(files[3])  # modify
    os.utime(files[4], ns=(1, 1))  # touch only: same content
    r = build(photos, index=index, model=model, workers=0, db=db)
    got = (r.added, r.updated, r.moved, r.removed, r.unchanged, r.failed, r.encoded, r.reused)
    assert got == (2, 1, 1, 1, 9, 0, 2, 1)  # the touched file counts as unchanged
    assert model.encoded == 14
    now = snapshot(index, db=db)
    np.testing.assert_array_equal(now[str(photos / "renamed.png")], first[str(files[0])])
    np.testing.assert_array_equal(now[str(photos / "copy.jpg")], first[str(files[1])])
    assert str(files[2]) not in now and len(now) == 13


def test_bad_inputs_are_recorded_not_fatal(tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = sorted(photos.iterdir())[1].read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "text.jpg").write_bytes(b"this is not a picture at all")
    from fixture_images import draw

    draw("красный круг", size=(200, 100)).save(photos / "bomb.png")
    (photos / "crash.jpg").write_bytes(good + b"x")
    (photos / "vanish.jpg").write_bytes(good + b"y")
    import functools

    from crashing_loader import exit_on_crash_jpg

    import ruclip_search.indexer as indexer

    # the workers die on crash.jpg: a loader from a tests module, which they import by name
    monkeypatch.setattr(indexer, "_Decoder", functools.partial(_Decoder, loader=exit_on_crash_jpg))

    real_walk = indexer.walk

    def walk_then_delete(*args, **kw):
        for entry in real_walk(*args, **kw):
            yield entry
            if entry.relpath == "vanish.jpg":
                os.unlink(entry.path)

    monkeypatch.setattr(indexer, "walk", walk_then_delete)
    index = tmp_path / "idx"
    r = build(photos, index=index, model=StandInModel(), workers=2, max_pixels=10_000)
    reasons = dict((os.path.basename(p), why) for p, why in r.errors)
    assert r.failed == 6 and r.added == 12, reasons
    assert reasons["crash.jpg"] == WORKER_DIED
    assert "vanish" in reasons["vanish.jpg"]
    assert "0 bytes" in reasons["zero.jpg"]
    assert set(reasons) == {"truncated.jpg", "zero.jpg", "text.jpg", "bomb.png", "crash.jpg", "vanish.jpg"}
    with Store.open(index) as store:
        assert store.counts() == {"images": 12, "errors": 6, "videos": 0, "raw_pairs": 0, "live_photos": 0}
    monkeypatch.setattr(indexer, "walk", real_walk)
    monkeypatch.setattr(indexer, "_Decoder", _Decoder)

    # failures are not retried until the file changes; then they are
    r = build(photos, index=index, model=StandInModel(), workers=0, max_pixels=10_000)
    assert (r.failed, r.unchanged, r.removed) == (0, 17, 1)
    (photos / "truncated.jpg").write_bytes(good)
    r = build(photos, index=index, model=StandInModel(), workers=0, max_pixels=10_000)
    assert (r.updated, r.failed, r.reused) == (1, 0, 1)


def test_lock_and_model_checks(tmp_path: Path, photos: Path) -> None:
    index = tmp_path / "idx"
    with IndexLock(index, create=True):
        with pytest.raises(IndexLockedError):
            build(photos, index=index, model=StandInModel(), workers=0)
    build(photos, index=index, model=StandInModel(), workers=0)
    with pytest.raises(ModelMismatchError, match="--rebuild"):
        build(photos, index=index, model=StandInModel(name="other"), workers=0)
    other = StandInModel(name="other", dim=16)
    r = build(photos, index=index, model=other, workers=0, rebuild=True)
    assert r.added == 12 and other.encoded == 12
    with Store.open(index) as store:
        assert store.model_name == "other" and store.dim == 16


def test_reindex_types(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    make_photos(folder, 24, size=24)
    index = tmp_path / "idx"
    build(folder, index=index, model=StandInModel(), workers=0)
    before = snapshot(index)
    for kind in ("hnsw", "ivf", "flat"):
        info = reindex(index, kind)
        # 24 vectors are too few to train IVF (faiss_index.MIN_ANN): it builds flat; test_ann.py builds real IVF
        assert info["type"] == ("flat" if kind == "ivf" else kind)
        assert info["n"] == 24 and info["recall_at_10"] >= 0.95
        assert len(list(index.glob("faiss-*.index"))) == 1
        assert snapshot(index).keys() == before.keys()


def test_fixture_model_finds_each_class(tmp_path: Path, tiny_model_path: Path) -> None:
    from fixture_images import FIXTURE_CLASSES

    from ruclip_search.encoder import load_model

    folder = tmp_path / "p"
    make_photos(folder, 2 * len(FIXTURE_CLASSES), size=64)
    index = tmp_path / "idx"
    r = build(folder, index=index, model=str(tiny_model_path), workers=0, device="cpu")
    assert r.added == 24 and r.failed == 0
    model = load_model(tiny_model_path, device="cpu", parts=("text",))
    with Store.open(index) as store:
        fx = faiss_index.load(store.faiss_path())
        _, ids = faiss_index.search(fx, model.encode_text(list(FIXTURE_CLASSES)), 1)
        top = store.get_images(ids[:, 0].tolist())
        for cls, hit in zip(FIXTURE_CLASSES, ids[:, 0], strict=True):
            assert cls in top[int(hit)].relpath


def test_unguarded_script_fails_fast_with_a_hint(tmp_path: Path, photos: Path, tiny_model_path: Path) -> None:
    """A script calling build() without `if __name__ == "__main__":` gets one clear error, not a stalled build."""
    import subprocess
    import sys
    import time

    script = tmp_path / "index_my_photos.py"
    script.write_text(
        "from ruclip_search import build\n"
        f"build([{str(photos)!r}], index={str(tmp_path / 'idx')!r}, model={str(tiny_model_path)!r}, workers=1)\n"
    )
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert 'if __name__ == "__main__":' in out.stderr
    assert time.perf_counter() - t < 120


@pytest.mark.parametrize("failure", ["corrupt model folder", "default model offline"])
def test_failed_first_build_does_not_bind_the_index_to_a_model(
    tmp_path: Path, photos: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A build whose model never loaded recorded it, and the next build with another model was refused."""
    from ruclip_search import registry
    from ruclip_search.errors import ModelNotFoundError, RuclipSearchError

    index = tmp_path / "idx"
    if failure == "corrupt model folder":  # the folder passes the early check; loading its weights fails
        model: str | None = str(tmp_path / "bad-model")
        (tmp_path / "bad-model").mkdir()
        for name in ("config.json", "bpe.model"):
            shutil.copy(tiny_model_path / name, tmp_path / "bad-model" / name)
        (tmp_path / "bad-model" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    else:  # `build ./photos` with no network and no cached copy of the default model

        def offline(name: str) -> Path:
            raise ModelNotFoundError(f"{name}: not in the Hugging Face cache and cannot be downloaded now")

        monkeypatch.setattr(registry, "_download", offline)
        model = None
    with pytest.raises(RuclipSearchError):
        build(photos, index=index, model=model, workers=0, device="cpu")
    r = build(photos, index=index, model=str(tiny_model_path), workers=0, device="cpu")
    assert r.added == 12 and r.encoded == 12
    with Store.open(index) as store:
        assert store.model_name == str(tiny_model_path) and store.counts()["images"] == 12


def test_rebuild_keeps_the_index_model_and_drops_other_roots(
    tmp_path: Path, tiny_model_path: Path, db: str | None
) -> None:
    """`build --rebuild` without --model switched to the default model; it keeps the index's own."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_photos(a, 3)
    make_photos(b, 2, seed=50)
    index = tmp_path / "idx"
    build([a, b], index=index, model=str(tiny_model_path), workers=0, device="cpu", db=db)
    r = build([a], index=index, workers=0, device="cpu", rebuild=True, db=db)
    assert r.model == str(tiny_model_path) and r.encoded == 3
    with Store.open(index, db=db) as store:
        assert store.model_name == str(tiny_model_path)
        assert list(store.roots().values()) == [str(a)]  # the rows of roots not passed to the rebuild are gone
        assert sorted(r.relpath for r in store.iter_images()) == sorted(p.name for p in a.iterdir())
        meta = store.meta()  # the staged file's largest id, recorded under the name it went live with
        assert meta["faiss_max_id"] == f"{meta['faiss_file']} {max(r.id for r in store.iter_images())}"
    assert len(snapshot(index, db=db)) == 3


def test_readers_see_the_old_index_until_a_rebuild_is_complete(tmp_path: Path, photos: Path, db: str | None) -> None:
    """A rebuild emptied `images` at its start: searches found nothing until it ended."""
    index = tmp_path / "idx"
    build(photos, index=index, model=StandInModel(), workers=0, db=db)
    before = snapshot(index, db=db)
    with Store.open(index, db=db) as store:
        version = store.index_version()
    seen: list[tuple] = []

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage == "encode":  # the rebuild is under way: a reader opens the index now
            with Store.open(index, db=db) as reader:
                fx = faiss_index.load(reader.faiss_path())
                seen.append((reader.counts()["images"], reader.model_name, reader.dim, fx.ntotal, fx.d))
                assert reader.index_version() == version

    new_model = StandInModel(name="other", dim=16)
    build(photos, index=index, model=new_model, workers=0, batch_size=4, rebuild=True, progress=progress, db=db)
    assert len(seen) == 3 and set(seen) == {(12, "stand-in", 32, 12, 32)}
    after = snapshot(index, db=db)
    assert after.keys() == before.keys() and new_model.encoded == 12
    with Store.open(index, db=db) as store:
        assert (store.model_name, store.dim) == ("other", 16) and store.index_version() > version
        assert store.get_meta("faiss_data_version") == str(store.data_version())
    assert not (index / ".rebuild").exists() and len(list(index.glob("faiss-*.index"))) == 1


def test_interrupted_rebuild_leaves_the_index_intact_and_resumes(tmp_path: Path, photos: Path, db: str | None) -> None:
    index = tmp_path / "idx"
    build(photos, index=index, model=StandInModel(), workers=0, db=db)
    before = snapshot(index, db=db)

    model = StandInModel(name="other", dim=16)
    encode = model.encode_pixels

    def interrupted(pixels):  # Ctrl-C during the second batch
        if model.calls >= 1:
            raise KeyboardInterrupt
        return encode(pixels)

    model.encode_pixels = interrupted
    with pytest.raises(KeyboardInterrupt):
        build(photos, index=index, model=model, workers=0, batch_size=4, rebuild=True, db=db)
    after = snapshot(index, db=db)
    assert after.keys() == before.keys()
    for path, vec in before.items():
        np.testing.assert_array_equal(after[path], vec)
    with Store.open(index, db=db) as store:
        assert (store.model_name, store.dim, store.counts()["images"]) == ("stand-in", 32, 12)
    assert build(photos, index=index, model=StandInModel(), workers=0, db=db).unchanged == 12  # still usable

    again = StandInModel(name="other", dim=16)
    r = build(photos, index=index, model=again, workers=0, batch_size=4, rebuild=True, db=db)
    assert again.encoded == 8 and r.unchanged == 4  # the batch staged before the interruption is kept
    assert snapshot(index, db=db).keys() == before.keys()
    with Store.open(index, db=db) as store:
        assert (store.model_name, store.dim) == ("other", 16)


def test_a_folder_without_photos_says_so_when_searched(tmp_path: Path) -> None:
    """A build of a folder with nothing to index ends normally; opening the index then says why it cannot be
    searched (no photo found), not only that a build may still be running."""
    from ruclip_search.errors import IndexNotFoundError
    from ruclip_search.search import Index

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("не фото")
    r = build(tmp_path / "photos", index=tmp_path / "idx", model=StandInModel(), workers=0)
    assert (r.added, r.failed) == (0, 0)
    with pytest.raises(IndexNotFoundError, match="found no photo it could index"):
        Index.open(tmp_path / "idx")
