"""search.Index with the tiny fixture model: ranking quality, filters vs exact search, combined queries,
similar, duplicates, zero-shot vs the reference Predictor, refresh, lazy loading and bad input."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import SEARCH_PER_CLASS, TINY_MODEL, make_photos
from fixture_images import FIXTURE_CLASSES, draw
from PIL import Image

from ruclip_search.errors import IndexNotFoundError, ModelMismatchError, QueryError
from ruclip_search.search import DEFAULT_TEMPLATES, Hit, Index, label_embeddings, zero_shot


@pytest.fixture(scope="module")
def idx(search_index):
    index = Index.open(search_index[0], device="cpu")
    yield index
    index.close()


@pytest.fixture(scope="module")
def photos(search_index) -> list[dict]:
    return search_index[1]


def classes_of(hits: list[Hit]) -> list[str]:
    return [Path(h.path).stem.rsplit(" ", 1)[0] for h in hits]


def exact_top(idx: Index, vec: np.ndarray, keep, k: int, offset: int = 0) -> list[int]:
    """Ground truth: brute force over every stored embedding, ids passing `keep(record)`, best first."""
    ids, vecs = idx.store.all_embeddings()
    records = idx.store.get_images(ids.tolist())
    scores = vecs @ vec
    order = np.lexsort((ids, -scores))
    ranked = [int(ids[j]) for j in order if keep(records[int(ids[j])])]
    return ranked[offset : offset + k]


# -- quality -----------------------------------------------------------------------------------------
def test_every_class_ranks_first(idx: Index, photos: list[dict]) -> None:
    for cls in FIXTURE_CLASSES:
        hits = idx.search(cls, k=SEARCH_PER_CLASS)
        assert classes_of(hits) == [cls] * SEARCH_PER_CLASS, (cls, [h.path for h in hits])
        assert all(Path(h.path).is_absolute() and h.path in {p["path"] for p in photos} for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_hit_fields_and_json(idx: Index, photos: list[dict]) -> None:
    by_path = {p["path"]: p for p in photos}
    hits = idx.search("жёлтый круг", k=10)
    for h in hits:
        p = by_path[h.path]
        assert (h.width, h.height, h.format) == (64, 64, p["format"])
        assert h.taken_at == p["taken"]
        d = json.loads(json.dumps(h.to_dict()))
        assert d["path"] == h.path and abs(d["score"] - h.score) < 1e-5
        assert d["taken_at"] == (p["taken"].isoformat() if p["taken"] else None)
    got = idx.get(hits[0].id)
    assert got is not None and got.path == hits[0].path and got.score == 0.0
    assert idx.file_path(hits[0].id) == Path(hits[0].path)


def test_offset_and_min_score(idx: Index) -> None:
    full = idx.search("синий треугольник", k=12)
    assert [h.id for h in idx.search("синий треугольник", k=5, offset=3)] == [h.id for h in full[3:8]]
    cut = full[3].score
    assert [h.id for h in idx.search("синий треугольник", k=12, min_score=cut)] == [h.id for h in full[:4]]


# -- filters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("filters", "keep"),
    [
        ({"formats": {"PNG"}}, lambda r: r.format == "PNG"),
        ({"formats": ["jpg"]}, lambda r: r.format == "JPEG"),
        ({"under": "B"}, lambda r: r.relpath.startswith("b/")),  # replaced by the real folder below
        ({"date_from": dt.date(2021, 1, 10), "date_to": dt.date(2021, 1, 30)},
         lambda r: r.taken_at is not None and "2021-01-10" <= r.taken_at[:10] <= "2021-01-30"),
        ({"date_from": "2021-01-05T12:00:00", "formats": {"JPEG"}, "under": "A"},
         lambda r: r.taken_at is not None and r.taken_at >= "2021-01-05T12:00:00" and r.relpath.startswith("a/")),
    ],
)  # fmt: skip
def test_filters_give_exactly_k_in_exact_order(idx: Index, search_index, filters: dict, keep) -> None:
    root = search_index[0].parent / "photos"
    filters = dict(filters)
    if filters.get("under") in ("A", "B"):
        filters["under"] = str(root / filters["under"].lower())
    for query in ("красный квадрат", "зелёный треугольник"):
        vec = idx.embed_query(query)
        for k, offset in ((5, 0), (3, 2)):
            truth = exact_top(idx, vec, keep, k, offset)
            assert len(truth) == k
            hits = idx.search(query, k=k, offset=offset, **filters)
            assert [h.id for h in hits] == truth, (filters, query)
            # every hit really passes the filter (not just same ids by luck)
            assert all(keep(idx.store.get_image(h.id)) for h in hits)


def test_the_same_index_in_postgresql_gives_the_same_results(idx: Index, search_index, pg_db: str, tmp_path) -> None:
    """The search fixture copied into PostgreSQL (`migrate`): every filter selects the same ids and every
    filtered search returns the same hits as on SQLite (EXIF dates, formats, relpath prefixes, scores)."""
    from ruclip_search.filters import SearchFilters
    from ruclip_search.indexer import migrate

    root = search_index[0].parent / "photos"
    migrate(search_index[0], index=tmp_path / "pg", db=pg_db)
    cases = [
        {"formats": ["png"]}, {"under": str(root / "b")}, {"under": str(root / "a" / "красный круг 0.jpg")},
        {"date_from": "2021-01-10", "date_to": "2021-01-30"}, {"date_to": "2021-01-01T12:00:00"},
        {"date_from": "2021-01-05T12:00:00", "formats": ["jpeg"], "under": str(root / "a")},
        {"under": str(root.parent)}, {"under": "/elsewhere"}, {"min_score": 0.2},
    ]  # fmt: skip
    with Index.open(tmp_path / "pg", device="cpu", db=pg_db) as pg:
        for case in cases:
            f = SearchFilters.parse(**case)
            a, b = idx.store.filter_ids(f), pg.store.filter_ids(f)
            assert (a is None and b is None) or a.tolist() == b.tolist(), case
            for query in ("красный квадрат", "зелёный треугольник"):
                ours, theirs = idx.search(query, k=7, filters=f), pg.search(query, k=7, filters=f)
                assert [(h.id, h.path, h.taken_at) for h in ours] == [(h.id, h.path, h.taken_at) for h in theirs]
                assert np.allclose([h.score for h in ours], [h.score for h in theirs], atol=1e-5)
        assert len(idx.store.filter_ids(SearchFilters.parse(formats=["png"]))) == 24


def test_under_relative_path_and_prefix_boundary(idx: Index, search_index, monkeypatch) -> None:
    root = search_index[0].parent / "photos"
    monkeypatch.chdir(root)
    hits = idx.search("синий круг", k=30, under="a")
    assert len(hits) == 24 and all("/photos/a/" in h.path for h in hits)
    assert idx.search("синий круг", k=5, under=str(root) + "/a-not-there") == []
    assert len(idx.search("синий круг", k=100, under=str(root))) == 48
    one = str(root / "a" / "синий круг 0.jpg")
    assert [h.path for h in idx.search("синий круг", k=5, under=one)] == [one]


def test_filter_matching_fewer_than_k(idx: Index) -> None:
    hits = idx.search("красный круг", k=10, date_from="2021-01-01", date_to="2021-01-01")
    assert [Path(h.path).name for h in hits] == ["красный круг 0.jpg"]
    assert idx.search("красный круг", k=10, formats={"GIF"}) == []


# -- query kinds -------------------------------------------------------------------------------------
def test_combined_query_is_weighted_sum(idx: Index) -> None:
    a, b = idx.embed_query("круг"), idx.embed_query("красный")
    want = a - 0.7 * b
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(idx.embed_query(["круг", ("красный", -0.7)]), want, atol=1e-6)
    np.testing.assert_allclose(idx.embed_query([("круг", 2.0)]), a, atol=1e-6)


def test_negative_term_pushes_class_down(idx: Index) -> None:
    plain = idx.search("круг", k=48)
    minus = idx.search(["круг", ("красный круг", -0.5)], k=48)
    assert classes_of(plain[:SEARCH_PER_CLASS]) == ["красный круг"] * SEARCH_PER_CLASS
    top = classes_of(minus[:SEARCH_PER_CLASS])
    assert "красный круг" not in top and all(c.endswith("круг") for c in top), top
    red_rank = lambda hits: np.mean([i for i, h in enumerate(hits) if "красный круг" in h.path])  # noqa: E731
    assert red_rank(minus) > red_rank(plain) + 3


def test_image_query_and_mixed_terms(idx: Index, photos: list[dict], tmp_path: Path) -> None:
    probe = tmp_path / "probe.png"
    draw("синий квадрат", seed=99, size=64).save(probe)
    for query in (probe, Image.open(probe), probe.read_bytes()):
        hits = idx.search_image(query, k=SEARCH_PER_CLASS)
        assert classes_of(hits) == ["синий квадрат"] * SEARCH_PER_CLASS
    assert classes_of(idx.search(probe, k=4)) == ["синий квадрат"] * 4
    # image of a blue square + text "круг" - text "квадрат" -> blue circles
    hits = idx.search([probe, ("круг", 1.0), ("квадрат", -1.0)], k=SEARCH_PER_CLASS)
    assert classes_of(hits) == ["синий круг"] * SEARCH_PER_CLASS


def test_similar_excludes_self(idx: Index, photos: list[dict]) -> None:
    for p in photos[::7]:
        hits = idx.similar(p["path"], k=SEARCH_PER_CLASS - 1)
        assert p["path"] not in {h.path for h in hits}
        assert classes_of(hits) == [p["cls"]] * (SEARCH_PER_CLASS - 1)
    first = idx.similar(photos[0]["path"], k=5)
    rec = idx.store.find_path(photos[0]["path"])
    assert [h.id for h in idx.similar(rec.id, k=5)] == [h.id for h in first]
    assert len(idx.similar(rec.id, k=100)) == 47
    assert photos[0]["path"] not in {h.path for h in idx.similar(rec.id, k=10, formats={"JPEG"})}


def test_lazy_towers(search_index) -> None:
    with Index.open(search_index[0], device="cpu") as index:
        assert index.model.parts == ("text",) and index._state.towers.image is None
        index.search("красный круг", k=1)
        assert index._state.towers.image is None and not index.info()["image_tower_loaded"]
        index.search_image(draw("красный круг", 5, 64), k=1)
        assert index._state.towers.image.parts == ("image",) and index.info()["image_tower_loaded"]


# -- zero-shot ---------------------------------------------------------------------------------------
def _reference_predictor():
    """The reference Predictor on the fixture weights, fed token ids by our tokenizer (youtokentome-exact)."""
    if "more_itertools" not in sys.modules:
        try:
            import more_itertools  # noqa: F401
        except ImportError:  # the reference only needs `chunked`
            mi = types.ModuleType("more_itertools")
            mi.chunked = lambda seq, n: [list(seq)[i : i + n] for i in range(0, len(list(seq)), n)]
            sys.modules["more_itertools"] = mi
    import torch
    from reference import model_module, predictor_module

    from ruclip_search.encoder import load_model
    from ruclip_search.model import load_state_dict

    cfg = json.loads((TINY_MODEL / "config.json").read_text())
    ref = model_module().CLIP(**{k: v for k, v in cfg.items() if k not in ("mean", "std")}).eval()
    missing, _ = ref.load_state_dict(load_state_dict(TINY_MODEL / "pytorch_model.bin"), strict=False)
    assert not missing, missing
    ours = load_model(TINY_MODEL, device="cpu")

    def processor(text, return_tensors="pt", padding=True, **_):
        return {"input_ids": torch.from_numpy(ours.tokenize(text))}

    return predictor_module().Predictor(ref, processor, "cpu", quiet=True), ours, ref


def test_zero_shot_matches_reference_predictor(tmp_path: Path) -> None:
    import torch

    predictor, ours, ref = _reference_predictor()
    labels = [c.upper() + "  " for c in FIXTURE_CLASSES]  # the reference lower()s and strip()s labels
    assert list(predictor.templates) == list(DEFAULT_TEMPLATES)
    want = predictor.get_text_latents(labels).detach().numpy()
    got = label_embeddings(ours, labels)
    assert np.abs(got - want).max() < 1e-5
    custom = ["рисунок: {}", "{} на белом фоне"]
    predictor.templates = custom
    assert (
        np.abs(label_embeddings(ours, labels, custom) - predictor.get_text_latents(labels).detach().numpy()).max()
        < 1e-5
    )

    images = [draw(c, seed=40 + i, size=64) for i, c in enumerate(FIXTURE_CLASSES)]
    result = zero_shot(ours, images, labels)
    pixels = torch.stack([ours.preprocess(im) for im in images])
    with torch.inference_mode():
        img = torch.nn.functional.normalize(ref.encode_image(pixels), dim=-1)
    ref_scores = (img @ torch.from_numpy(want).T).numpy()
    assert [lab for lab, _ in result] == [labels[j] for j in ref_scores.argmax(1)]
    np.testing.assert_allclose([s for _, s in result], ref_scores.max(1), atol=1e-5)
    assert [lab.strip().lower() for lab, _ in result] == list(FIXTURE_CLASSES)


def test_classify_index(idx: Index, photos: list[dict]) -> None:
    result = idx.classify(list(FIXTURE_CLASSES))
    assert len(result) == len(photos)
    truth = {p["path"]: p["cls"] for p in photos}
    assert all(label == truth[path] for path, label, _ in result), result
    with pytest.raises(QueryError):
        idx.classify([])
    with pytest.raises(QueryError, match="template"):
        idx.classify(["кот"], templates=["без места"])


# -- duplicates and refresh (own small indexes) ------------------------------------------------------
def test_duplicates_exact_and_reencoded(tmp_path: Path) -> None:
    from ruclip_search.indexer import build

    folder = tmp_path / "p"
    paths = make_photos(folder, 12, size=64)
    shutil.copy(paths[1], folder / "copy of 1.jpg")
    Image.open(paths[4]).save(folder / "re-encoded 4.jpg", quality=60)  # PNG -> JPEG q60: other bytes, same look
    build(folder, index=tmp_path / "idx", model=str(TINY_MODEL), workers=0, device="cpu")
    with Index.open(tmp_path / "idx", device="cpu") as index:
        groups = index.duplicates(threshold=0.9995)
        assert sorted(groups) == sorted(
            [
                sorted([str(paths[1]), str(folder / "copy of 1.jpg")]),
                sorted([str(paths[4]), str(folder / "re-encoded 4.jpg")]),
            ]
        )
        assert index.duplicates(threshold=1.0) == [sorted([str(paths[1]), str(folder / "copy of 1.jpg")])]
        assert len(index.duplicates(threshold=-1.0)) == 1  # everything links up
        with pytest.raises(QueryError):
            index.duplicates(threshold=1.5)


def test_refresh_swaps_after_rebuild(tmp_path: Path, db: str | None) -> None:
    from ruclip_search.indexer import build

    folder = tmp_path / "p"
    make_photos(folder, 12, size=64)
    build(folder, index=tmp_path / "idx", model=str(TINY_MODEL), workers=0, device="cpu", db=db)
    with Index.open(tmp_path / "idx", device="cpu", db=db) as index:
        v0 = index.version
        old_state = index._state
        assert index.refresh() is False
        new = folder / "new синий круг.png"
        draw("синий круг", seed=77, size=64).save(new)
        assert str(new) not in {h.path for h in index.search("синий круг", k=13)}
        build(folder, index=tmp_path / "idx", workers=0, device="cpu", db=db)
        # (a search now may already find it through the change log: see test_online.py)
        assert index.refresh() is True and index.version > v0
        assert index.refresh() is False
        assert str(new) in {h.path for h in index.search("синий круг", k=2)}
        assert old_state.faiss.ntotal == 12 and index._state.faiss.ntotal == 13  # old object left intact


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_queries(idx: Index, photos: list[dict], tmp_path: Path) -> None:
    for bad in ("", "   ", [], [("", 1.0)]):
        with pytest.raises(QueryError, match="empty"):
            idx.search(bad)
    with pytest.raises(QueryError, match="positive"):
        idx.search([("кот", -1.0)])
    with pytest.raises(QueryError, match="k must"):
        idx.search("кот", k=0)
    with pytest.raises(QueryError, match="No such image file"):
        idx.search_image(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(QueryError, match="Cannot use this image"):
        idx.search_image(tmp_path / "junk.jpg")
    with pytest.raises(QueryError, match="No image with id"):
        idx.similar(10**9)
    with pytest.raises(QueryError, match="not in this index"):
        idx.similar(tmp_path / "elsewhere.jpg")
    assert idx.get(10**9) is None
    with pytest.raises(QueryError, match="No image with id"):
        idx.file_path(10**9)
    with pytest.raises(QueryError, match="Bad date"):
        idx.search("кот", date_from="вчера")


def test_long_query_truncates(idx: Index) -> None:
    long = "красный круг " * 60
    assert idx.truncated(long) and not idx.truncated("красный круг")
    assert classes_of(idx.search(long, k=2)) == ["красный круг"] * 2


def test_open_errors(tmp_path: Path, search_index) -> None:
    with pytest.raises(IndexNotFoundError, match="ruclip-index build"):
        Index.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="ruclip-index build"):
        Index.open(tmp_path / "empty")
    with pytest.raises(ModelMismatchError):
        Index.open(search_index[0], model="ruclip-vit-base-patch32-224")
    assert Index.open(search_index[0], model=str(TINY_MODEL), device="cpu").name == "index"


def test_repeated_text_query_reuses_its_embedding(idx: Index) -> None:
    """Paging through results must not run the text encoder again for the same words."""
    idx._state.towers.text_cache.clear()  # the module's index has seen this query in earlier tests
    calls = []
    real = idx.model.encode_text
    idx.model.encode_text = lambda texts: calls.append(texts) or real(texts)
    try:
        first = idx.search("синий квадрат", k=2)
        second = idx.search(" синий квадрат ", k=2, offset=2)
    finally:
        del idx.model.encode_text  # back to the class's method
    assert len(calls) == 1
    assert classes_of(first + second) == ["синий квадрат"] * 4
    assert {h.id for h in first}.isdisjoint({h.id for h in second})


# -- SearchFilters: one value for every entry point ---------------------------------------------------
def test_filters_value_equals_loose_keywords(idx: Index, search_index) -> None:
    from ruclip_search import defaults
    from ruclip_search.filters import SearchFilters

    under = str(search_index[0].parent / "photos" / "a")
    loose = {"under": under, "date_from": "2021-01-05", "date_to": dt.date(2021, 2, 1), "formats": ["jpg"]}
    f = SearchFilters.parse(**loose)
    assert [h.id for h in idx.search("красный квадрат", k=5, filters=f)] == [
        h.id for h in idx.search("красный квадрат", k=5, **loose)
    ]
    rec = idx.store.find_path(search_index[1][0]["path"])
    assert [h.id for h in idx.similar(rec.id, k=3, filters=f)] == [h.id for h in idx.similar(rec.id, k=3, **loose)]
    assert len(idx.search("красный квадрат")) == defaults.K == 20  # one default page size everywhere
    with pytest.raises(QueryError, match="not both"):
        idx.search("кот", filters=f, under=under)
    with pytest.raises(TypeError):
        idx.search("кот", folder=under)
    with pytest.raises(QueryError, match="SearchFilters"):
        idx.search("кот", filters={"under": under})


def test_min_score_applies_to_every_method(idx: Index, photos: list[dict], tmp_path: Path) -> None:
    """min_score is the API's job for similar and search_image too (the CLI used to re-filter by hand)."""
    rec = idx.store.find_path(photos[0]["path"])
    full = idx.similar(rec.id, k=10)
    cut = full[3].score
    assert [h.id for h in idx.similar(rec.id, k=10, min_score=cut)] == [h.id for h in full[:4]]
    probe = tmp_path / "probe.png"
    draw("синий квадрат", seed=99, size=64).save(probe)
    full = idx.search_image(probe, k=10)
    assert [h.id for h in idx.search_image(probe, k=10, min_score=full[2].score)] == [h.id for h in full[:3]]


def test_store_filter_ids(idx: Index, photos: list[dict]) -> None:
    from ruclip_search.filters import NO_FILTERS, SearchFilters

    assert idx.store.filter_ids(NO_FILTERS) is None
    assert idx.store.filter_ids(SearchFilters.parse(min_score=0.5)) is None  # trims the ranking, not the ids
    day = idx.store.filter_ids(SearchFilters.parse(date_from="2021-01-01", date_to="2021-01-01"))
    assert [idx.store.get_image(i).path for i in day] == [
        p["path"] for p in photos if p["taken"] == dt.datetime(2021, 1, 1, 12)
    ]
    to_noon = SearchFilters.parse(date_to="2021-01-01T12:00:00")  # an explicit time is an inclusive bound
    assert len(idx.store.filter_ids(to_noon)) == 1
    assert len(idx.store.filter_ids(SearchFilters.parse(date_to="2021-01-01T11:59:59"))) == 0


def test_query_of_another_dimension_is_a_model_mismatch(idx: Index) -> None:
    """A vector the FAISS index cannot take raises ModelMismatchError, never a FAISS assertion."""
    with pytest.raises(ModelMismatchError, match="dimensions"):
        idx.search(np.ones(idx.model.dim + 3, dtype=np.float32), k=3)


# -- refresh after a rebuild with another model, and with new roots -----------------------------------
def _variant_model(folder: Path, *, dim: int | None = None) -> Path:
    """A copy of the tiny fixture model with other weights: the text projection negated (same dimension,
    reversed text rankings), or with `dim` the projections cut to their first `dim` columns."""
    import torch

    from ruclip_search.model import load_state_dict

    shutil.copytree(TINY_MODEL, folder)
    sd = load_state_dict(TINY_MODEL / "pytorch_model.bin")
    if dim is None:
        sd["text_projection"] = -sd["text_projection"]
    else:
        sd["text_projection"] = sd["text_projection"][:, :dim].contiguous()
        sd["visual.proj"] = sd["visual.proj"][:, :dim].contiguous()
        config = json.loads((TINY_MODEL / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "embed_dim": dim}))
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def small_index(tmp_path: Path) -> tuple[Path, Path]:
    from ruclip_search.indexer import build

    folder = tmp_path / "p"
    make_photos(folder, 12, size=64)
    build(folder, index=tmp_path / "idx", model=str(TINY_MODEL), workers=0, device="cpu")
    return tmp_path / "idx", folder


QUERIES = ("синий круг", "красный квадрат", "зелёный треугольник")


def _rankings(index: Index) -> list[list[tuple[int, float]]]:
    return [[(h.id, round(h.score, 5)) for h in index.search(q, k=12)] for q in QUERIES]


@pytest.mark.parametrize("dim", [None, 16], ids=["same-dim", "other-dim"])
def test_refresh_follows_a_model_change(small_index, tmp_path: Path, dim: int | None) -> None:
    """A rebuild with another model: refresh loads its text tower (old code kept the old one and its text
    cache: a FAISS assertion for another dimension, silently wrong rankings for the same one)."""
    from ruclip_search.encoder import ModelCache
    from ruclip_search.indexer import build

    index_dir, folder = small_index
    other = _variant_model(tmp_path / "other-model", dim=dim)
    models = ModelCache(device="cpu")
    with Index.open(index_dir, device="cpu", models=models) as index:
        before = _rankings(index)  # fills the text cache with the old model's vectors
        old_state = index._state
        index.search_image(folder / "000 красный круг.png", k=1)  # loads the old image tower
        build(folder, index=index_dir, model=str(other), rebuild=True, workers=0, device="cpu")
        assert index.refresh() is True
        assert index.model.dim == (dim or 32) and index.model is models.get(other)
        assert index._state.towers.image is None and old_state.towers.image is not None  # old state intact
        after = _rankings(index)
        with Index.open(index_dir, device="cpu") as fresh:
            assert after == _rankings(fresh)
        if dim is None:
            assert after != before  # the negated text projection really changes the rankings
        assert index.info()["loaded_model"] == str(other.resolve())
        hits = index.search_image(folder / "000 красный круг.png", k=1)  # the new image tower, new dimension
        assert hits[0].path == str(folder / "000 красный круг.png")


def test_refresh_refuses_a_pinned_model(small_index, tmp_path: Path) -> None:
    """Opened with an explicit model= that the rebuilt index no longer uses: ModelMismatchError (the server
    answers 503), and the old version keeps being served rather than wrong rankings."""
    from ruclip_search.indexer import build

    index_dir, folder = small_index
    other = _variant_model(tmp_path / "other-model")
    with Index.open(index_dir, model=str(TINY_MODEL), device="cpu") as index:
        _rankings(index)
        build(folder, index=index_dir, model=str(other), rebuild=True, workers=0, device="cpu")
        with pytest.raises(ModelMismatchError, match="rebuilt with model"):
            index.refresh()
        for search in (lambda: index.search("синий круг"), lambda: index.similar(1), lambda: index.classify(["кот"])):
            with pytest.raises(ModelMismatchError, match="rebuilt with model"):
                search()  # the old FAISS file against the rebuilt database would rank wrongly
        assert index.refresh() is False and "rebuilt with model" in index.info()["error"]  # not retried
    with Index.open(index_dir, device="cpu") as index:  # reopened without a model: the index's own
        assert index.model_name == str(other.resolve()) and len(index.search("синий круг")) == 12


def test_models_are_shared_through_the_cache(small_index, search_index) -> None:
    from ruclip_search.encoder import ModelCache

    models = ModelCache(device="cpu")
    with Index.open(small_index[0], models=models) as a, Index.open(search_index[0], models=models) as b:
        assert a.model is b.model and len(models) == 1


def test_refresh_sees_a_new_root(small_index, tmp_path: Path) -> None:
    """A root added by a later build is visible to `under=` (old code cached the roots list forever)."""
    from ruclip_search.indexer import build

    index_dir, folder = small_index
    second = tmp_path / "second"
    make_photos(second, 6, size=64, seed=50)
    with Index.open(index_dir, device="cpu") as index:
        assert len(index.search("синий круг", k=50, under=folder)) == 12  # reads (and used to cache) the roots
        build([folder, second], index=index_dir, workers=0, device="cpu")
        assert index.refresh() is True
        hits = index.search("синий круг", k=50, under=second)
        assert len(hits) == 6 and all(h.path.startswith(str(second) + "/") for h in hits)
        rec = index.store.find_path(second / "000 красный круг.png")
        assert rec is not None and rec.root == str(second)
