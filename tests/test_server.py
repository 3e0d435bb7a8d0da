"""HTTP API tests (FastAPI TestClient) over a real index of the fixture drawings: every endpoint and error path."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ruclip_search.errors import IndexNotFoundError
from ruclip_search.server import create_app


def _png(cls: str = "красный круг", seed: int = 9, size: int = 80, fmt: str = "PNG") -> bytes:
    from fixture_images import draw

    buf = io.BytesIO()
    draw(cls, seed=seed, size=size).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(search_index):
    index_dir, _ = search_index
    return create_app([index_dir, index_dir], max_upload_bytes=200_000, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def photos(search_index) -> list[dict]:
    return search_index[1]


def _id_of(client: TestClient, name: str) -> int:
    hits = client.get("/search", params={"q": name.rsplit(" ", 1)[0], "k": 48}).json()["hits"]
    return next(h["id"] for h in hits if Path(h["path"]).name.startswith(name))


def _names(hits: list[dict]) -> list[str]:
    return [Path(h["path"]).stem.rsplit(" ", 1)[0] for h in hits]


# -- meta ----------------------------------------------------------------------------------------------
def test_health_and_info(client):
    assert client.get("/health").json() == {"status": "ok", "indexes": 2}
    info = client.get("/info").json()
    assert [i["name"] for i in info["indexes"]] == ["index", "index-2"]
    assert info["indexes"][0]["default"] and not info["indexes"][1]["default"]
    assert info["indexes"][0]["info"]["images"] == 48
    assert info["indexes"][0]["version"] >= 1


def test_indexes_of_one_model_share_its_text_tower(app):
    """Two served indexes built with the same model hold one loaded text tower between them, not one each."""
    state = app.state.server
    first, second = (s.index for s in state.served.values())
    assert first.model is second.model
    assert len(state.models) == 1


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    for path in ("/search", "/search/image", "/similar/{image_id}", "/images/{image_id}", "/images/{image_id}/thumbnail",
                 "/images/{image_id}/file", "/info", "/health"):  # fmt: skip
        assert path in spec["paths"], path
    assert {"HitOut", "SearchOut", "ErrorOut", "InfoOut"} <= set(spec["components"]["schemas"])
    params = {p["name"] for p in spec["paths"]["/search"]["get"]["parameters"]}
    assert {"q", "k", "offset", "min_score", "under", "from", "to", "index"} <= params
    assert client.get("/docs").status_code == 200


def test_web_page(client):
    page = client.get("/")
    assert page.status_code == 200 and "рыжий кот на диване" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


# -- search ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["синий квадрат", "красный круг", "жёлтый треугольник"])
def test_search_ranks_its_class_first(client, query):
    r = client.get("/search", params={"q": query, "k": 6})
    assert r.status_code == 200
    body = r.json()
    assert body["index"] == "index" and body["k"] == 6 and body["offset"] == 0 and len(body["hits"]) == 6
    assert _names(body["hits"])[:4] == [query] * 4
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    hit = body["hits"][0]
    assert set(hit) == {"id", "path", "score", "width", "height", "taken_at", "format", "thumbnail_url", "file_url",
                        "key", "collection", "labels", "media", "t", "duration", "raw_path", "live_path"}  # fmt: skip
    assert (hit["key"], hit["collection"], hit["labels"]) == (None, None, [])  # a built photo, not an app's
    assert Path(hit["path"]).is_absolute() and hit["width"] == 64
    assert hit["thumbnail_url"] == f"/images/{hit['id']}/thumbnail"


def test_search_paging_and_filters(client, search_index):
    full = client.get("/search", params={"q": "зелёный круг", "k": 10}).json()["hits"]
    second = client.get("/search", params={"q": "зелёный круг", "k": 5, "offset": 5}).json()["hits"]
    assert [h["id"] for h in second] == [h["id"] for h in full[5:10]]
    strong = client.get("/search", params={"q": "зелёный круг", "k": 48, "min_score": 0.9}).json()["hits"]
    assert strong and all(h["score"] >= 0.9 for h in strong)
    under = str(search_index[0].parent / "photos" / "a")
    in_a = client.get("/search", params={"q": "зелёный круг", "k": 48, "under": under}).json()["hits"]
    assert len(in_a) == 24 and all(h["path"].startswith(under + "/") for h in in_a)
    pngs = client.get("/search", params={"q": "зелёный круг", "k": 48, "format": "PNG"}).json()["hits"]
    assert len(pngs) == 24 and {h["format"] for h in pngs} == {"PNG"}
    dated = client.get("/search", params={"q": "зелёный круг", "k": 48, "from": "2021-01-01", "to": "2021-01-04"})
    hits = dated.json()["hits"]  # красный круг seeds 0 and 2: Jan 1 and Jan 3
    assert dated.status_code == 200 and len(hits) == 2 and all(h["taken_at"].startswith("2021-01-0") for h in hits)
    aware = client.get(
        "/search", params={"q": "круг", "from": "2021-01-01T00:00:00+03:00", "to": "9999-12-31T23:59:59Z"}
    )
    assert aware.status_code == 200


def test_second_index_by_name(client):
    r = client.get("/search", params={"q": "синий круг", "k": 2, "index": "index-2"})
    assert r.status_code == 200 and r.json()["index"] == "index-2"
    assert r.json()["hits"][0]["thumbnail_url"].endswith("?index=index-2")
    r = client.get("/search", params={"q": "синий круг", "index": "nope"})
    assert r.status_code == 404 and r.json()["code"] == "unknown_index"


@pytest.mark.parametrize(
    "params, status",
    [
        ({}, 422),  # missing q
        ({"q": ""}, 422),
        ({"q": "   "}, 400),
        ({"q": "a\x00b"}, 400),
        ({"q": "x" * 1001}, 422),
        ({"q": "кот", "k": 0}, 422),
        ({"q": "кот", "k": 100000}, 422),
        ({"q": "кот", "k": "abc"}, 422),
        ({"q": "кот", "offset": -1}, 422),
        ({"q": "кот", "min_score": 5}, 422),
        ({"q": "кот", "min_score": "nan"}, 422),
        ({"q": "кот", "from": "yesterday"}, 422),
        ({"q": "кот", "under": "\x00"}, 422),
        ({"q": "кот", "format": "../../x"}, 400),
    ],
)
def test_search_bad_parameters(client, params, status):
    r = client.get("/search", params=params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert "detail" in r.json() and "code" in r.json()


# -- image search -----------------------------------------------------------------------------------------
def test_search_by_uploaded_image(client):
    r = client.post("/search/image", files={"file": ("q.png", _png("жёлтый квадрат"), "image/png")}, params={"k": 4})
    assert r.status_code == 200, r.text
    assert _names(r.json()["hits"]) == ["жёлтый квадрат"] * 4
    jpeg = _png("синий треугольник", fmt="JPEG")
    r = client.post("/search/image", files={"file": ("q.bin", jpeg, "application/octet-stream")}, params={"k": 2})
    assert _names(r.json()["hits"]) == ["синий треугольник"] * 2


@pytest.mark.parametrize(
    "content, status, code",
    [
        (b"", 400, "bad_image"),
        (b"hello, not an image", 415, "not_an_image"),
        (b"%PDF-1.4\n" + b"0" * 1000, 415, "not_an_image"),
        (None, 400, "bad_image"),  # truncated JPEG
        (b"x" * 300_000, 413, "upload_too_large"),
    ],
)
def test_search_image_bad_uploads(client, content, status, code):
    if content is None:
        content = _png(fmt="JPEG", size=200)[:600]
    r = client.post("/search/image", files={"file": ("a.jpg", content, "image/jpeg")})
    assert (r.status_code, r.json()["code"]) == (status, code), r.text


def test_search_image_pixel_cap(client):
    big = io.BytesIO()
    Image.new("RGB", (1500, 1000), "white").save(big, "PNG")  # 1.5 MP > 1 MP cap, small file
    r = client.post("/search/image", files={"file": ("a.png", big.getvalue(), "image/png")})
    assert (r.status_code, r.json()["code"]) == (413, "too_many_pixels")


def test_upload_cap_without_content_length(client):
    def chunks():
        for _ in range(40):
            yield b"y" * 10_000

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    r = client.post("/search/image", content=chunks(), headers=headers)
    assert r.status_code == 413 and r.json()["code"] == "upload_too_large"


def test_search_image_missing_file_field(client):
    r = client.post("/search/image", data={"other": "1"})
    assert r.status_code == 422


# -- similar, images ---------------------------------------------------------------------------------------
def test_similar(client):
    image_id = _id_of(client, "зелёный треугольник 0")
    r = client.get(f"/similar/{image_id}", params={"k": 3})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert image_id not in [h["id"] for h in hits]
    assert _names(hits) == ["зелёный треугольник"] * 3


@pytest.mark.parametrize("path", ["/similar/999999", "/similar/-1", "/similar/abc", "/similar/99999999999999999999999"])
def test_similar_unknown(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["code"] in ("image_not_found", "not_found")


def test_image_metadata(client):
    image_id = _id_of(client, "жёлтый круг 0")
    r = client.get(f"/images/{image_id}")
    assert r.status_code == 200
    meta = r.json()
    assert meta["id"] == image_id and "score" not in meta
    assert meta["format"] == "JPEG" and meta["taken_at"] == "2021-02-06T12:00:00"
    assert client.get("/images/123456").status_code == 404


def test_thumbnail(client):
    image_id = _id_of(client, "синий круг 1")
    r = client.get(f"/images/{image_id}/thumbnail", params={"size": 32})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) == 32
    again = client.get(f"/images/{image_id}/thumbnail", params={"size": 32})
    assert again.content == r.content and again.headers["etag"] == r.headers["etag"]
    cached = client.get(
        f"/images/{image_id}/thumbnail", params={"size": 32}, headers={"If-None-Match": r.headers["etag"]}
    )
    assert cached.status_code == 304
    default = Image.open(io.BytesIO(client.get(f"/images/{image_id}/thumbnail").content))
    assert default.size == (64, 64)  # never upscaled past the original
    for size in (0, 8, 5000, "big"):
        assert client.get(f"/images/{image_id}/thumbnail", params={"size": size}).status_code == 422
    assert client.get("/images/424242/thumbnail").status_code == 404


def _peak_concurrency(monkeypatch: pytest.MonkeyPatch, name: str) -> dict[str, int]:
    """Patch ruclip_search.decode.`name` with a slow wrapper that records how many calls run at once."""
    import ruclip_search.decode as decode

    real, lock, seen = getattr(decode, name), threading.Lock(), {"now": 0, "peak": 0, "calls": 0}

    def slow(*args, **kwargs):
        with lock:
            seen["now"] += 1
            seen["calls"] += 1
            seen["peak"] = max(seen["peak"], seen["now"])
        try:
            time.sleep(0.05)
            return real(*args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(decode, name, slow)
    return seen


def test_thumbnail_decoding_is_bounded(search_index, monkeypatch):
    """Regression: thumbnails decoded outside any bound, so many requests for huge images could each hold a
    full-size decode at once (FastAPI runs up to 40 at a time). Now at most `decode_slots` decode at once."""
    from concurrent.futures import ThreadPoolExecutor

    app = create_app([search_index[0]], thumbnail_cache_bytes=0)
    with TestClient(app) as c:
        ids = [h["id"] for h in c.get("/search", params={"q": "круг", "k": 16}).json()["hits"]]
        seen = _peak_concurrency(monkeypatch, "open_image")
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: c.get(f"/images/{i}/thumbnail", params={"size": 32}).status_code, ids))
    bound = app.state.server.decode_slots
    assert codes == [200] * 16 and seen["calls"] == 16
    assert 1 <= seen["peak"] <= bound < 16, seen


def test_uploads_decode_within_the_same_bound(search_index, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    app = create_app([search_index[0]])
    upload = _png("синий круг")
    with TestClient(app) as c:
        seen = _peak_concurrency(monkeypatch, "open_image")
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: c.post("/search/image", files={"file": ("q.png", upload, "image/png")},
                                                   params={"k": 1}).status_code, range(8)))  # fmt: skip
    assert codes == [200] * 8 and 1 <= seen["peak"] <= app.state.server.decode_slots, seen


def test_thumbnail_pixel_cap(search_index):
    """An image above the thumbnail pixel cap answers 404 image_unreadable with the reason, not a decode."""
    from ruclip_search import defaults

    app = create_app([search_index[0]])
    assert app.state.server.thumb_max_pixels == defaults.MAX_PIXELS  # every image the indexer took
    with TestClient(app) as c:
        image_id = _id_of(c, "синий круг 1")  # 64 x 64
        app.state.server.thumb_max_pixels = 64 * 64 - 1
        r = c.get(f"/images/{image_id}/thumbnail", params={"size": 17})
        assert (r.status_code, r.json()["code"]) == (404, "image_unreadable")
        assert "4,096 pixels" in r.json()["detail"]
        app.state.server.thumb_max_pixels = 64 * 64
        assert c.get(f"/images/{image_id}/thumbnail", params={"size": 17}).status_code == 200


def test_original_file(client):
    image_id = _id_of(client, "красный квадрат 1")
    meta = client.get(f"/images/{image_id}").json()
    r = client.get(f"/images/{image_id}/file")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == Path(meta["path"]).read_bytes()
    assert r.headers["content-disposition"].startswith("inline")
    # a request parameter never names a file: the path query is ignored
    same = client.get(f"/images/{image_id}/file", params={"path": "/etc/passwd"})
    assert same.content == r.content


@pytest.mark.parametrize(
    "raw",
    [
        "/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e/%2e%2e/etc/passwd",
        "/images/1/..%2F..%2Fetc%2Fpasswd",
        "/images/%2Fetc%2Fpasswd/file",
        "/images/..%2Fserver.py/file",
        "/images/1%00/file",
        "/static/..%2Fserver.py",
        "/static/%2e%2e/server.py",
        "/static/app.js%00",
        "/..%2F..%2Fetc%2Fpasswd",
        "/images/1.5/thumbnail",
    ],
)
def test_traversal_attempts_get_404(client, raw):
    r = client.get(raw)
    assert r.status_code == 404, (raw, r.status_code, r.text)
    assert r.json()["code"] in ("not_found", "image_not_found")
    assert b"root:" not in r.content


def test_unknown_route_and_method(client):
    assert client.get("/nothing").json()["code"] == "not_found"
    r = client.delete("/search")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


# -- security --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(search_index):
    with TestClient(create_app([search_index[0]], token="s3cret ключ")) as c:
        yield c


@pytest.mark.parametrize(
    "path", ["/search?q=кот", "/info", "/similar/1", "/images/1", "/images/1/thumbnail", "/images/1/file"]
)
def test_token_required(secured, path):
    r = secured.get(path)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert secured.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert secured.get(path, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
    assert secured.post("/search/image", files={"file": ("a.png", _png(), "image/png")}).status_code == 401


def test_token_accepted(secured):
    auth = {"Authorization": "Bearer s3cret ключ".encode()}
    assert secured.get("/search", params={"q": "кот", "k": 1}, headers=auth).status_code == 200
    secured.cookies.set("ruclip_token", "s3cret%20%D0%BA%D0%BB%D1%8E%D1%87")  # what the web page sets
    try:
        assert secured.get("/images/1/thumbnail").status_code == 200
    finally:
        secured.cookies.clear()
    assert secured.get("/health").status_code == 200  # stays open for monitors
    assert secured.get("/").status_code == 200  # the page itself holds no data; it asks for the token


def test_cors_off_unless_configured(client, search_index):
    origin = {"Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in client.get("/health", headers=origin).headers
    pre = client.options("/search", headers={**origin, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in pre.headers
    with TestClient(create_app([search_index[0]], cors_origins=["https://app.example"])) as c:
        r = c.get("/health", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in c.get("/health", headers=origin).headers


def test_create_app_errors(tmp_path):
    with pytest.raises(IndexNotFoundError):
        create_app([])
    with pytest.raises(IndexNotFoundError):
        create_app([tmp_path / "missing"])


class _Broken:
    """An index whose every call fails unexpectedly: the API must still answer JSON 500, not crash."""

    name, version = "broken", 1

    def refresh(self) -> bool:
        raise RuntimeError("refresh exploded")

    def __getattr__(self, name):
        def fail(*a, **k):
            raise RuntimeError("boom")

        return fail


def test_unexpected_errors_are_json_500():
    with TestClient(create_app([_Broken()]), raise_server_exceptions=False) as c:
        r = c.get("/search", params={"q": "кот"})
        assert r.status_code == 500 and r.json() == {
            "detail": "Internal error; see the server log.",
            "code": "internal_error",
        }
        assert c.get("/health").status_code == 200


# -- files that change under the server ------------------------------------------------------------------
@pytest.fixture
def own_index(tmp_path, tiny_model_path):
    """A small writable index (6 drawings) and its photo folder."""
    from conftest import make_photos

    from ruclip_search.indexer import build

    photos = tmp_path / "photos"
    make_photos(photos, n=6, size=48)
    build(photos, index=tmp_path / "index", model=str(tiny_model_path), workers=0, device="cpu")
    return tmp_path / "index", photos


def test_file_gone_or_broken(own_index):
    index_dir, photos = own_index
    with TestClient(create_app([index_dir])) as c:
        hits = c.get("/search", params={"q": "красный", "k": 6}).json()["hits"]
        gone, broken = hits[0], hits[1]
        Path(gone["path"]).unlink()
        Path(broken["path"]).write_bytes(b"garbage")
        for suffix in ("/file", "/thumbnail"):
            r = c.get(f"/images/{gone['id']}{suffix}")
            assert (r.status_code, r.json()["code"]) == (404, "file_missing")
        r = c.get(f"/images/{broken['id']}/thumbnail")
        assert (r.status_code, r.json()["code"]) == (404, "image_unreadable")


def test_live_update_serves_new_version_without_restart(tmp_path, tiny_model_path, db):
    """A build running next to the server: every request answers 200, then the new images are found."""
    from conftest import make_photos

    from ruclip_search.indexer import build

    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    make_photos(photos, n=6, size=48)
    build(photos, index=index_dir, model=str(tiny_model_path), workers=0, device="cpu", db=db)
    with TestClient(create_app([index_dir], refresh_interval=0.05, db=db)) as c:
        before = c.get("/info").json()["indexes"][0]
        assert before["info"]["images"] == 6
        make_photos(photos / "new", n=12, size=48, seed=100)
        done = threading.Event()
        errors: list = []

        def rebuild():
            try:
                build(photos, index=index_dir, model=str(tiny_model_path), workers=0, device="cpu", db=db)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
            finally:
                done.set()

        t = threading.Thread(target=rebuild)
        t.start()
        versions, counts = [], []
        while not done.is_set():
            r = c.get("/search", params={"q": "синий квадрат", "k": 48})
            assert r.status_code == 200, r.text
            body = r.json()
            versions.append(body["version"])
            counts.append(len(body["hits"]))
            for h in body["hits"]:  # every hit of any version is fully readable
                assert c.get(f"/images/{h['id']}").status_code == 200
            time.sleep(0.02)
        t.join()
        assert not errors
        assert versions == sorted(versions)
        assert set(counts) <= {6, 18}  # a whole old or a whole new version, never a half-written one
        time.sleep(0.1)
        after = c.get("/search", params={"q": "синий квадрат", "k": 48}).json()
        assert after["version"] > before["version"] and len(after["hits"]) == 18
        # the only blue square is a new photo: it must come first (any other order is a ranking bug)
        assert after["hits"][0]["path"] == str(photos / "new" / "007 синий квадрат.jpg")


def test_paths_with_odd_bytes(tmp_path, tiny_model_path):
    """Non-UTF-8 file names still give valid JSON and downloadable files."""
    import os

    from fixture_images import draw

    from ruclip_search.indexer import build

    photos = tmp_path / "photos"
    photos.mkdir()
    odd = os.fsdecode(b"bad-\xff-name.jpg")
    try:
        draw("синий круг", seed=1, size=48).save(photos / odd, "JPEG")
    except (OSError, UnicodeError):  # pragma: no cover - a file system that refuses such names
        pytest.skip("file system refuses non-UTF-8 names")
    shutil.copy(photos / odd, photos / "ok.jpg")
    build(photos, index=tmp_path / "index", model=str(tiny_model_path), workers=0, device="cpu")
    with TestClient(create_app([tmp_path / "index"])) as c:
        hits = c.get("/search", params={"q": "синий круг"}).json()["hits"]
        assert len(hits) == 2 and any("\ufffd" in h["path"] for h in hits)
        for h in hits:
            r = c.get(h["file_url"])
            assert r.status_code == 200 and r.content == (photos / "ok.jpg").read_bytes()
