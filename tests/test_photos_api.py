"""PUT/GET/DELETE /photos/{key}: a photo app writes its photos by key (upload, server path or embedding), scopes
searches by collection and label, and every bad write answers a clear 4xx with the index unchanged. The crash
test kills a real server with -9 while four clients write, and checks that every acknowledged write survived."""

from __future__ import annotations

import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT
from fastapi.testclient import TestClient

from ruclip_search.cli import main
from ruclip_search.server import create_app

READ, WRITE = "read-t0ken", "wr1te-t0ken"
R = {"Authorization": f"Bearer {READ}"}
W = {"Authorization": f"Bearer {WRITE}"}


def _image(cls: str = "красный круг", seed: int = 9, size: int = 64, fmt: str = "PNG") -> bytes:
    from fixture_images import draw

    buf = io.BytesIO()
    draw(cls, seed=seed, size=size).save(buf, fmt)
    return buf.getvalue()


def _unit(dim: int, seed: int) -> list[float]:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return [float(x) for x in v / np.linalg.norm(v)]


def _snapshot(index_dir: Path) -> tuple:
    """Everything a write could change: rows of images, labels and the change log (read-only connection)."""
    conn = sqlite3.connect(f"file:{index_dir / 'index.db'}?mode=ro", uri=True)
    try:
        images = conn.execute("SELECT id, key, collection, embedding, taken_at FROM images ORDER BY id").fetchall()
        labels = conn.execute("SELECT image_id, label FROM labels ORDER BY image_id, label").fetchall()
        seq = conn.execute("SELECT max(seq) FROM changes").fetchone()
        return images, labels, seq
    finally:
        conn.close()


@pytest.fixture
def env(tmp_path, tiny_model_path):
    """An empty index of the tiny model served with a read token, a write token and one allowed root."""
    from ruclip_search.search import Index

    index_dir = tmp_path / "index"
    Index.create(index_dir, model=str(tiny_model_path), device="cpu").close()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(_image("жёлтый квадрат", size=72))
    (allowed / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_image("синий круг"))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    app = create_app([index_dir], token=READ, write_token=WRITE, allow_roots=[allowed], device="cpu",
                     max_upload_bytes=200_000, max_pixels=1_000_000)  # fmt: skip
    with TestClient(app) as client:
        dim = client.get("/info", headers=R).json()["indexes"][0]["info"]["dim"]
        yield SimpleNamespace(c=client, index=index_dir, allowed=allowed, outside=outside, dim=dim, app=app)


def _put_json(c: TestClient, key: str, body: dict, headers: dict = W):
    return c.put(f"/photos/{key}", json=body, headers=headers)


def _keys(c: TestClient, **params) -> list[str]:
    r = c.get("/search", params={"q": "красный круг", "k": 50, **params}, headers=R)
    assert r.status_code == 200, r.text
    return [h["key"] for h in r.json()["hits"]]


# -- writes, reads, scoping ------------------------------------------------------------------------------
def test_put_upload_then_get_and_search_at_once(env):
    c = env.c
    files = {"file": ("cat.png", _image("красный круг"), "image/png")}
    r = c.put("/photos/alice-IMG_1", files=files, data={"collection": "alice", "labels": ["pets", "home"]}, headers=W)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["key"] == "alice-IMG_1" and rec["collection"] == "alice" and rec["labels"] == ["home", "pets"]
    assert rec["path"] is None and rec["thumbnail_url"] is None and rec["file_url"] is None
    assert rec["format"] == "PNG" and rec["width"] == 64 and "score" not in rec
    assert c.get("/photos/alice-IMG_1", headers=R).json() == rec
    assert c.get(f"/images/{rec['id']}", headers=R).json()["key"] == "alice-IMG_1"
    other = _put_json(c, "bob-1", {"embedding": _unit(env.dim, 1), "collection": "bob", "labels": ["cars"]})
    assert other.status_code == 200, other.text
    assert set(_keys(c)) == {"alice-IMG_1", "bob-1"}
    assert _keys(c, collection="alice") == ["alice-IMG_1"]
    assert _keys(c, collection="bob") == ["bob-1"]
    assert set(_keys(c, collection=["alice", "bob"])) == {"alice-IMG_1", "bob-1"}
    assert _keys(c, label="pets") == ["alice-IMG_1"] and _keys(c, label=["cars", "nope"]) == ["bob-1"]
    assert _keys(c, collection="alice", label="cars") == [] and _keys(c, collection="carol") == []
    hits = c.get("/search", params={"q": "красный круг", "collection": "alice"}, headers=R).json()["hits"]
    assert hits[0]["score"] is not None and hits[0]["collection"] == "alice"
    up = c.post("/search/image", files=files, params={"collection": "alice", "k": 1}, headers=R).json()["hits"]
    assert up[0]["key"] == "alice-IMG_1" and up[0]["score"] > 0.99  # the same picture
    sim = c.get(f"/similar/{rec['id']}", params={"label": "cars"}, headers=R).json()["hits"]
    assert [h["key"] for h in sim] == ["bob-1"]
    assert c.get(f"/images/{rec['id']}/thumbnail", headers=R).json()["code"] == "file_missing"


def test_put_by_path_reads_the_file_once(env):
    c = env.c
    r = _put_json(c, "by-path", {"path": str(env.allowed / "cat.png"), "taken_at": "2020-05-04T03:02:01"})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["width"] == 72 and rec["format"] == "PNG" and rec["path"] is None  # no reference to the file kept
    assert rec["taken_at"] == "2020-05-04T03:02:01" and rec["collection"] is None and rec["labels"] == []
    (env.allowed / "cat.png").unlink()
    assert c.get("/photos/by-path", headers=R).json() == rec
    found = c.get("/search", params={"q": "жёлтый квадрат", "k": 1}, headers=R).json()["hits"]
    assert found[0]["key"] == "by-path"
    dated = c.get("/search", params={"q": "кот", "from": "2020-05-04", "to": "2020-05-04"}, headers=R).json()
    assert [h["key"] for h in dated["hits"]] == ["by-path"]


def test_put_by_embedding_is_stored_normalised(env):
    from ruclip_search.store import Store

    c = env.c
    vec = np.array(_unit(env.dim, 7)) * 3.0
    rec = _put_json(c, "emb", {"embedding": [float(x) for x in vec], "labels": ["x"]}).json()
    twin = _put_json(c, "emb-twin", {"embedding": _unit(env.dim, 7)}).json()
    with Store.open(env.index) as store:
        stored = store.get_embeddings([rec["id"]])[0]
    assert np.allclose(stored, vec / 3.0, atol=2e-3)
    sim = c.get(f"/similar/{rec['id']}", params={"k": 1}, headers=R).json()["hits"]
    assert sim[0]["id"] == twin["id"] and sim[0]["score"] > 0.999


def test_replace_keeps_the_id_and_replaces_everything(env):
    c = env.c
    first = _put_json(c, "k1", {"embedding": _unit(env.dim, 1), "collection": "old", "labels": ["a", "b"]}).json()
    before = _snapshot(env.index)
    second = c.put("/photos/k1", files={"file": ("x.png", _image(), "image/png")}, data={"collection": "new",
                   "labels": ["c"]}, headers=W)  # fmt: skip
    assert second.status_code == 200, second.text
    rec = second.json()
    assert rec["id"] == first["id"] and rec["collection"] == "new" and rec["labels"] == ["c"]
    after = _snapshot(env.index)
    assert len(after[0]) == len(before[0]) == 1 and after[1] == [(first["id"], "c")]
    assert after[0][0][3] != before[0][0][3]  # a new embedding
    assert _keys(c, collection="old") == [] and _keys(c, label="a") == []
    assert _keys(c, collection="new") == ["k1"] and _keys(c, label="c") == ["k1"]
    assert c.get("/photos/k1", headers=R).json() == rec


def test_delete_then_404(env):
    c = env.c
    rec = _put_json(c, "gone", {"embedding": _unit(env.dim, 3), "collection": "c", "labels": ["l"]}).json()
    _put_json(c, "stays", {"embedding": _unit(env.dim, 4)})
    r = c.delete("/photos/gone", headers=W)
    assert r.status_code == 200 and r.json() == {"deleted": True}
    for path in ("/photos/gone", f"/images/{rec['id']}"):
        r = c.get(path, headers=R)
        assert r.status_code == 404 and r.json()["code"] in ("photo_not_found", "image_not_found")
    assert _keys(c) == ["stays"] and _keys(c, collection="c") == [] and _keys(c, label="l") == []
    assert _snapshot(env.index)[1] == []  # its labels went with it
    r = c.delete("/photos/gone", headers=W)
    assert (r.status_code, r.json()["code"]) == (404, "photo_not_found")
    again = _put_json(c, "gone", {"embedding": _unit(env.dim, 3)}).json()
    assert again["id"] > rec["id"]  # ids are never reused


def test_keys_with_odd_characters_round_trip(env):
    c = env.c
    for key in ("user 42:IMG_0001.jpg", "ключ-фото", "a?b#c&d=e", "100%", "'; DROP TABLE images; --", "x" * 512):
        quoted = quote(key, safe="")
        r = _put_json(c, quoted, {"embedding": _unit(env.dim, len(key))})
        assert r.status_code == 200 and r.json()["key"] == key, (key, r.text)
        assert c.get(f"/photos/{quoted}", headers=R).json()["key"] == key
        assert c.delete(f"/photos/{quoted}", headers=W).status_code == 200
    assert _snapshot(env.index)[0] == []


# -- tokens -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, R, {"Authorization": f"Basic {WRITE}"}])
def test_writes_need_the_write_token(env, headers):
    c = env.c
    _put_json(c, "mine", {"embedding": _unit(env.dim, 1)})
    before = _snapshot(env.index)
    writes = [
        _put_json(c, "mine", {"embedding": _unit(env.dim, 2)}, headers),
        _put_json(c, "new", {"embedding": _unit(env.dim, 2)}, headers),
        c.put("/photos/new", files={"file": ("a.png", _image(), "image/png")}, headers=headers),
        c.delete("/photos/mine", headers=headers),
    ]
    for r in writes:
        assert (r.status_code, r.json()["code"]) == (401, "unauthorized"), r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert _snapshot(env.index) == before


def test_the_cookie_never_writes(env):
    env.c.cookies.set("ruclip_token", WRITE)
    try:
        r = _put_json(env.c, "k", {"embedding": _unit(env.dim, 1)}, {})
        assert r.status_code == 401
        assert env.c.get("/photos/k").status_code == 404  # the cookie reads (as the web page does)
    finally:
        env.c.cookies.clear()


def test_read_token_reads_and_write_token_reads_too(env):
    c = env.c
    _put_json(c, "k", {"embedding": _unit(env.dim, 1)})
    assert c.get("/photos/k").status_code == 401
    assert c.get("/photos/k", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/photos/k", headers=R).status_code == 200
    assert c.get("/photos/k", headers=W).status_code == 200
    assert c.get("/search", params={"q": "кот"}, headers=W).status_code == 200


def test_writes_disabled_without_a_write_token(tmp_path, tiny_model_path):
    from ruclip_search.search import Index

    Index.create(tmp_path / "index", model=str(tiny_model_path), device="cpu").close()
    with TestClient(create_app([tmp_path / "index"], device="cpu", allow_roots=[tmp_path])) as c:
        assert c.app.state.server.served["index"].index.writable is False  # opened read-only
        before = _snapshot(tmp_path / "index")
        for headers in ({}, W):
            r = _put_json(c, "k", {"embedding": _unit(32, 1)}, headers)
            assert (r.status_code, r.json()["code"]) == (403, "writes_disabled"), r.text
            assert "--write-token" in r.json()["detail"]
            r = c.delete("/photos/k", headers=headers)
            assert (r.status_code, r.json()["code"]) == (403, "writes_disabled")
        assert c.get("/photos/k").json()["code"] == "photo_not_found"  # reads stay open (no --token)
        assert _snapshot(tmp_path / "index") == before


# -- bad input: a clear 4xx and nothing changes ---------------------------------------------------------
def _bad_requests(env) -> list[tuple[str, dict, int, str]]:
    """(url, request kwargs, status, code) for every kind of bad write."""
    emb = {"embedding": _unit(env.dim, 5)}
    png = _image()
    broken_jpeg = _image(fmt="JPEG", size=200)[:600]
    up = lambda data, **form: {"files": {"file": ("a.png", data, "image/png")}, "data": form}  # noqa: E731
    return [
        ("/photos/" + "k" * 10_000, {"json": emb}, 400, "bad_key"),
        ("/photos/" + "k" * 513, {"json": emb}, 400, "bad_key"),
        ("/photos/a%00b", {"json": emb}, 400, "bad_key"),
        ("/photos/a%01b", {"json": emb}, 400, "bad_key"),
        ("/photos/a%0Ab", {"json": emb}, 400, "bad_key"),
        ("/photos/a%2Fb", {"json": emb}, 404, "not_found"),  # a "/" is no key: no such route
        ("/photos/keep", up(b""), 400, "bad_image"),
        ("/photos/keep", up(b"definitely not an image"), 415, "not_an_image"),
        ("/photos/keep", up(broken_jpeg), 400, "bad_image"),
        ("/photos/keep", up(b"x" * 300_000), 413, "upload_too_large"),
        ("/photos/keep", up(png, collection="a/b"), 400, "bad_photo"),
        ("/photos/keep", up(png, collection="a\x00b"), 400, "bad_photo"),
        ("/photos/keep", up(png, labels=["ok", "it's"]), 400, "bad_photo"),
        ("/photos/keep", up(png, taken_at="yesterday"), 400, "bad_photo"),
        ("/photos/keep", up(png, other="1"), 400, "bad_photo"),
        ("/photos/keep", {"data": {"collection": "x"}}, 415, "unsupported_media_type"),  # form without a file
        ("/photos/keep", {"files": {"other": ("a.png", png, "image/png")}}, 400, "bad_photo"),
        ("/photos/keep", {"content": png, "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
        (
            "/photos/keep",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            "invalid_request",
        ),  # fmt: skip
        ("/photos/keep", {"json": {"embedding": _unit(env.dim + 1, 5)}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {"embedding": _unit(env.dim, 5)[:-1]}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {"embedding": [0.0] * env.dim}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {"embedding": []}}, 400, "bad_photo"),
        (
            "/photos/keep",
            {
                "content": '{"embedding": [NaN' + ", 0.5" * (env.dim - 1) + "]}",
                "headers": {"content-type": "application/json"},
            },
            None,
            None,
        ),  # fmt: skip
        ("/photos/keep", {"json": {"embedding": "0.1,0.2"}}, 422, "invalid_request"),
        ("/photos/keep", {"json": {}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "path": str(env.allowed / "cat.png")}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "colection": "typo"}}, 422, "invalid_request"),
        ("/photos/keep", {"json": {**emb, "collection": "a/b"}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "collection": "a%00b"}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "collection": "a\x00b"}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "collection": 'say "hi"'}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "collection": ""}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "labels": ["x" * 201]}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {**emb, "labels": [f"l{i}" for i in range(101)]}}, 422, "invalid_request"),
        ("/photos/keep", {"json": {**emb, "labels": "pets"}}, 422, "invalid_request"),
        ("/photos/keep", {"json": {**emb, "taken_at": "yesterday"}}, 422, "invalid_request"),
        ("/photos/keep", {"json": {"path": str(env.outside / "secret.png")}}, 403, "path_not_allowed"),
        (
            "/photos/keep",
            {"json": {"path": str(env.allowed / ".." / "outside" / "secret.png")}},
            403,
            "path_not_allowed",
        ),  # fmt: skip
        ("/photos/keep", {"json": {"path": str(env.allowed / "link.png")}}, 403, "path_not_allowed"),
        ("/photos/keep", {"json": {"path": "/etc/passwd"}}, 403, "path_not_allowed"),
        ("/photos/keep", {"json": {"path": "allowed/cat.png"}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {"path": str(env.allowed / "cat.png") + "\x00.png"}}, 400, "bad_photo"),
        ("/photos/keep", {"json": {"path": str(env.allowed / "missing.png")}}, 404, "file_not_found"),
        ("/photos/keep", {"json": {"path": str(env.allowed)}}, 404, "file_not_found"),
        ("/photos/keep", {"json": {"path": str(env.allowed / "notes.txt")}}, 400, "bad_image"),
        ("/photos/keep?index=nope", {"json": emb}, 404, "unknown_index"),
    ]


def test_bad_writes_answer_4xx_and_change_nothing(env):
    c = env.c
    kept = _put_json(c, "keep", {"embedding": _unit(env.dim, 9), "collection": "c", "labels": ["l"]}).json()
    before = _snapshot(env.index)
    for url, kwargs, status, code in _bad_requests(env):
        headers = {**W, **kwargs.pop("headers", {})}
        r = c.put(url, headers=headers, **kwargs)
        if status is None:  # the JSON parser's choice: either way a 4xx
            assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
        else:
            assert (r.status_code, r.json().get("code")) == (status, code), (url, kwargs, r.text[:300])
        assert r.headers["content-type"] == "application/json"
        assert _snapshot(env.index) == before, (url, kwargs)
    for url in ("/photos/" + "k" * 10_000, "/photos/a%00b", "/photos/nope"):
        assert c.delete(url, headers=W).status_code in (400, 404)
        assert c.get(url, headers=R).status_code in (400, 404)
    assert _snapshot(env.index) == before
    assert c.get("/photos/keep", headers=R).json() == kept


@pytest.mark.parametrize("params", [{"collection": "a/b"}, {"collection": "a\x00b"}, {"label": "it's"},
                                    {"label": ""}, {"collection": "x" * 201}, {"label": ["ok", 'a"b']}])  # fmt: skip
def test_search_rejects_bad_collection_and_label_names(env, params):
    for r in (
        env.c.get("/search", params={"q": "кот", **params}, headers=R),
        env.c.get("/similar/1", params=params, headers=R),
        env.c.post("/search/image", params=params, files={"file": ("a.png", _image(), "image/png")}, headers=R),
    ):
        assert (r.status_code, r.json()["code"]) == (400, "bad_query"), r.text
        assert "name" in r.json()["detail"]


def test_openapi_documents_the_photo_endpoints(env):
    spec = env.c.get("/openapi.json").json()
    ops = spec["paths"]["/photos/{key}"]
    assert set(ops) >= {"put", "get", "delete"}
    body = ops["put"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"path", "embedding", "collection", "labels", "taken_at"} <= set(body["application/json"]["schema"]
                                                                              ["properties"])  # fmt: skip
    assert {"file", "collection", "labels", "taken_at"} <= set(body["multipart/form-data"]["schema"]["properties"])
    assert {"200", "401", "403", "400", "415"} <= set(ops["put"]["responses"])
    for path in ("/search", "/search/image", "/similar/{image_id}"):
        method = "post" if path == "/search/image" else "get"
        assert {"collection", "label"} <= {p["name"] for p in spec["paths"][path][method]["parameters"]}
    assert {"key", "collection", "labels"} <= set(spec["components"]["schemas"]["HitOut"]["properties"])


# -- CLI: create, compact, serve options ---------------------------------------------------------------
def test_cli_create_and_compact(tmp_path, tiny_model_path):
    from ruclip_search.search import Index

    index_dir = tmp_path / "app"
    r = CliRunner().invoke(main, ["create", str(index_dir), "--model", str(tiny_model_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "0 images" in r.output and "32-d" in r.output
    again = CliRunner().invoke(main, ["create", str(index_dir), "--model", str(tiny_model_path), "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["images"] == 0  # same model: left as it is
    with Index.open(index_dir, writable=True, device="cpu") as idx:
        for i in range(5):
            idx.add(f"k{i}", embedding=np.array(_unit(32, i), dtype=np.float32))
    r = CliRunner().invoke(main, ["compact", "--index", str(index_dir), "--json"])
    assert r.exit_code == 0, r.output
    assert isinstance(json.loads(r.output), dict)
    with sqlite3.connect(f"file:{index_dir / 'index.db'}?mode=ro", uri=True) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        assert int(meta["faiss_seq"]) == conn.execute("SELECT max(seq) FROM changes").fetchone()[0]
    other = CliRunner().invoke(main, ["create", str(index_dir), "--model", "ruclip-vit-base-patch32-224"])
    assert other.exit_code == 1 and "Error:" in other.output and "model" in other.output


def test_cli_serve_write_options(tmp_path, monkeypatch):
    from ruclip_search import server

    seen: list[dict] = []
    monkeypatch.setattr(server, "serve", lambda dirs, **kw: seen.append(kw))
    monkeypatch.setenv("RUCLIP_SEARCH_WRITE_TOKEN", "from-env")
    args = ["serve", "--index", str(tmp_path)]
    r = CliRunner().invoke(main, [*args, "--allow-root", str(tmp_path), "--allow-root", str(ROOT)])
    assert r.exit_code == 0, r.output
    assert seen[-1]["write_token"] == "from-env" and list(seen[-1]["allow_roots"]) == [tmp_path, ROOT]
    assert "writes enabled" in r.output
    assert seen[-1]["writer_process"] is True  # writes are committed in a writer process by default
    r = CliRunner().invoke(main, [*args, "--write-token", "flag", "--no-writer-process"])
    assert r.exit_code == 0 and seen[-1]["write_token"] == "flag" and not seen[-1]["allow_roots"]
    assert seen[-1]["writer_process"] is False
    monkeypatch.delenv("RUCLIP_SEARCH_WRITE_TOKEN")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and seen[-1]["write_token"] is None
    r = CliRunner().invoke(main, [*args, "--allow-root", str(tmp_path)])
    assert r.exit_code == 2 and "--write-token" in r.output  # a root without writes is a mistake
    r = CliRunner().invoke(main, [*args, "--write-token", "t", "--allow-root", str(tmp_path / "missing")])
    assert r.exit_code == 2


# -- kill -9 while four clients write ----------------------------------------------------------------------
START_TIMEOUT_S = 60


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`python -m ruclip_search.cli serve` with a write token, restartable after kill -9."""

    def __init__(self, index_dir: Path, log: Path, db: str | None = None) -> None:
        self.index_dir, self.log, self.port, self.db = index_dir, log, _free_port(), db
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RUCLIP_SEARCH_WRITE_TOKEN": WRITE}
        cmd = [sys.executable, "-m", "ruclip_search.cli", "serve", "--index", str(self.index_dir), "--port",
               str(self.port), "--device", "cpu", *(["--db", self.db] if self.db else [])]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no clean-up of any kind
            self.proc.wait()


class _Writer(threading.Thread):
    """Owns its keys: PUTs fresh embeddings and DELETEs some; a key whose request got no answer is never
    touched again and may end in either state (before or after that request)."""

    def __init__(self, n: int, base: str, dim: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.n, self.base, self.dim, self.stop = n, base, dim, stop
        self.rng, self.vectors = random.Random(n), np.random.default_rng(n)
        self.state: dict[str, np.ndarray | None] = {}  # acknowledged: key -> embedding, or None (deleted)
        self.uncertain: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}  # key -> (before, after)
        self.acked = self.failed = 0
        self.next_key = 0
        self.errors: list[str] = []

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base, headers=W, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    self._one(client)
                except Exception as e:  # pragma: no cover - reported by the test
                    self.errors.append(repr(e))
                    return

    def _one(self, client) -> None:
        import httpx

        live = [k for k, v in self.state.items() if v is not None]
        if live and self.rng.random() < 0.25:
            key, op = self.rng.choice(live), "delete"
        elif live and self.rng.random() < 0.3:
            key, op = self.rng.choice(live), "replace"
        else:
            key, op = f"w{self.n}-{self.next_key}", "put"
        before, vec = self.state.get(key), None
        if op == "delete":
            request = lambda: client.delete(f"/photos/{key}")  # noqa: E731
        else:
            v = self.vectors.normal(size=self.dim)
            vec = (v / np.linalg.norm(v)).astype(np.float32)
            body = {"embedding": [float(x) for x in vec], "collection": f"w{self.n}"}
            request = lambda: client.put(f"/photos/{key}", json=body)  # noqa: E731
        try:
            r = request()
        except httpx.ConnectError:  # no connection, nothing sent: the server is restarting
            time.sleep(0.2)
            return
        except httpx.HTTPError:  # the server died around this request: it may or may not have been applied
            self.state.pop(key, None)
            self.uncertain[key] = (before, vec)
            self.failed += 1
        else:
            if r.status_code != 200:
                raise AssertionError(f"{op} {key}: {r.status_code} {r.text[:300]}")
            self.state[key] = vec
            self.acked += 1
        if op == "put":
            self.next_key += 1


def _same(stored: np.ndarray | None, expected: np.ndarray | None) -> bool:
    if stored is None or expected is None:
        return stored is None and expected is None
    return bool(np.allclose(stored, expected, atol=2e-3))


@pytest.mark.crash
def test_acknowledged_writes_survive_kill_9(tmp_path, tiny_model_path, db):
    """Four clients write while the server is killed with -9 ten times at random moments: after each restart,
    and at the end, every acknowledged PUT is there with its embedding and no acknowledged DELETE came back."""
    import httpx

    from ruclip_search.search import Index
    from ruclip_search.store import Store

    index_dir = tmp_path / "index"
    with Index.create(index_dir, model=str(tiny_model_path), device="cpu", db=db) as idx:
        dim = idx.info()["dim"]
    server = _Server(index_dir, tmp_path / "server.log", db=db)
    server.start()
    stop = threading.Event()
    writers = [_Writer(n, server.base, dim, stop) for n in range(4)]
    rng = random.Random(1234)
    try:
        for w in writers:
            w.start()
        for _ in range(10):
            time.sleep(rng.uniform(0.2, 0.8))
            server.kill()
            server.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    try:
        assert not [e for w in writers for e in w.errors], [e for w in writers for e in w.errors]
        assert sum(w.acked for w in writers) > 50 and sum(w.failed for w in writers) >= 1
        expected = {k: v for w in writers for k, v in w.state.items()}
        uncertain = {k: v for w in writers for k, v in w.uncertain.items()}
        with Store.open(index_dir, db=db) as store:

            def stored(key: str) -> np.ndarray | None:
                rec = store.get_by_key(key)
                return None if rec is None else store.get_embeddings([rec.id])[0]

            lost = [k for k, v in expected.items() if not _same(stored(k), v)]
            odd = [k for k, (a, b) in uncertain.items() if not (_same(stored(k), a) or _same(stored(k), b))]
            w0 = [k for k in [*writers[0].state, *writers[0].uncertain] if stored(k) is not None]
        assert not lost, f"{len(lost)} acknowledged writes lost or resurrected, e.g. {lost[:5]}"
        assert not odd, f"{len(odd)} unacknowledged writes in an impossible state, e.g. {odd[:5]}"
        with httpx.Client(base_url=server.base, timeout=10) as client:  # the restarted server agrees
            for key, vec in random.Random(5).sample(sorted(expected.items()), min(300, len(expected))):
                assert client.get(f"/photos/{key}").status_code == (404 if vec is None else 200), key
            hits = client.get("/search", params={"q": "кот", "k": 200, "collection": "w0"}).json()["hits"]
            assert {h["key"] for h in hits} <= set(w0) and len(hits) == min(200, len(w0))
    finally:
        server.kill()


def test_concurrent_puts_and_deletes_are_committed_together(env) -> None:
    """Requests arriving together are committed in groups (fewer commits than requests); each answers with its
    own record or its own error: a bad request in a group fails alone and writes nothing."""
    import asyncio

    import httpx

    served = env.app.state.server.served[env.app.state.server.default_name]
    for key in ("old1", "old2"):
        assert _put_json(env.c, key, {"embedding": _unit(env.dim, 1)}).status_code == 200
    before = served.writes.groups

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=env.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            calls = [ac.put(f"/photos/n{i}", json={"embedding": _unit(env.dim, 10 + i), "collection": f"u{i % 3}"},
                            headers=W) for i in range(24)]  # fmt: skip
            calls.append(ac.put("/photos/bad", json={"embedding": [1.0, 2.0]}, headers=W))  # wrong size
            calls += [ac.delete("/photos/old1", headers=W), ac.delete("/photos/old1", headers=W),
                      ac.delete("/photos/old2", headers=W)]  # fmt: skip
            return await asyncio.gather(*calls)

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers[:24]] == [200] * 24
    assert [a.json()["key"] for a in answers[:24]] == [f"n{i}" for i in range(24)]
    assert [a.json()["collection"] for a in answers[:24]] == [f"u{i % 3}" for i in range(24)]
    assert answers[24].status_code == 400 and answers[24].json()["code"] == "bad_photo"
    assert sorted(a.status_code for a in answers[25:27]) == [200, 404] and answers[27].status_code == 200
    assert served.writes.groups - before < 28  # combined
    assert env.c.get("/photos/bad", headers=R).status_code == 404
    assert env.c.get("/photos/old1", headers=R).status_code == 404
    found = env.c.get("/search", params={"q": "круг", "k": 50, "collection": ["u0", "u1", "u2"]}, headers=R).json()
    assert sorted(h["key"] for h in found["hits"]) == sorted(f"n{i}" for i in range(24))


# -- the fast path for hot writes ------------------------------------------------------------------------------
@pytest.mark.parametrize("writer_process", [False, True], ids=["in-process", "writer-process"])
def test_the_write_fast_path_answers_exactly_as_fastapi_does(tmp_path, tiny_model_path, monkeypatch,
                                                              writer_process) -> None:  # fmt: skip
    """PUT (JSON embedding) and DELETE /photos/{key} are answered by server/fastpath.py in front of FastAPI:
    every request, good or bad, gets the same status and body as from FastAPI's own route, the good ones are
    answered by the fast path and every bad one is handed to FastAPI (index unchanged). With a writer process
    the fast path's writes are parsed, checked and committed there (server/writer.py), with the same answers."""
    from ruclip_search.search import Index
    from ruclip_search.server import fastpath

    answered: list[str] = []
    real = fastpath.WriteFastPath._answer

    async def spy(self, scope, receive, method, key, body):
        try:
            response = await real(self, scope, receive, method, key, body)
        except fastpath._Declined:
            answered.append("fastapi")
            raise
        answered.append("fast")
        return response

    monkeypatch.setattr(fastpath.WriteFastPath, "_answer", spy)
    apps = []
    for name in ("fast", "plain"):
        Index.create(tmp_path / name / "index", model=str(tiny_model_path), device="cpu").close()
        app = create_app([tmp_path / name / "index"], token=READ, write_token=WRITE, device="cpu",
                         writer_process=writer_process and name == "fast",
                         max_upload_bytes=1)  # bodies over 64 KiB (MULTIPART_SLACK) + 1 byte: 413  # fmt: skip
        if name == "plain":  # the same app without the fast path
            app.write_fast_path = None
        apps.append(app)
    with TestClient(apps[0]) as fast, TestClient(apps[1]) as plain:
        dim = fast.get("/info", headers=R).json()["indexes"][0]["info"]["dim"]
        good = _unit(dim, 1)
        requests = [  # (method, path, json body or raw bytes, headers, answered by the fast path)
            ("PUT", "/photos/a", {"embedding": good, "collection": "c1", "labels": ["y", "x", "y"]}, W, True),
            ("PUT", "/photos/b", {"embedding": [int(x > 0) for x in good]}, W, True),
            ("PUT", "/photos/a", {"embedding": _unit(dim, 2), "collection": None, "labels": []}, W, True),
            ("PUT", "/photos/%D1%84%D0%BE%D1%82%D0%BE%201", {"embedding": good}, W, True),
            ("PUT", "/photos/c", {"embedding": good[:-1]}, W, True),  # wrong dimension: 400 bad_photo
            ("PUT", "/photos/c", {"embedding": good, "taken_at": "2021-06-01"}, W, False),
            ("PUT", "/photos/c", {"embedding": good}, R, False),  # the read token
            ("PUT", "/photos/c", {"embedding": good}, {}, False),
            ("PUT", "/photos/c", {"embedding": good}, {"Authorization": f"Basic {WRITE}"}, False),
            ("PUT", "/photos/c?index=index", {"embedding": good}, W, False),
            ("PUT", "/photos/c", {"embedding": good, "extra": 1}, W, False),
            ("PUT", "/photos/c", {"embedding": [True] * dim}, W, False),
            (
                "PUT",
                "/photos/c",
                ('{"embedding": [' + ", ".join(["1" + "0" * 400] + ["0.1"] * (dim - 1)) + "]}").encode(),
                W,
                False,
            ),  # an integer beyond float64: declined, FastAPI answers
            (
                "PUT",
                "/photos/c",
                ('{"embedding": [' + ", ".join(["1e999"] + ["0.1"] * (dim - 1)) + "]}").encode(),
                W,
                False,
            ),  # not finite
            ("PUT", "/photos/c", {"embedding": [0.0] * dim}, W, False),
            ("PUT", "/photos/c", {"embedding": []}, W, False),
            ("PUT", "/photos/c", {"embedding": good, "path": "/etc/passwd"}, W, False),
            ("PUT", "/photos/c", {"embedding": good, "collection": "a/b"}, W, False),
            ("PUT", "/photos/c", {"embedding": good, "collection": 5}, W, False),
            ("PUT", "/photos/c", {"embedding": good, "labels": "x"}, W, False),
            ("PUT", "/photos/c", {"embedding": good, "labels": ["x%00"]}, W, False),
            ("PUT", "/photos/c", [1, 2], W, False),
            ("PUT", "/photos/c", b'{"embedding": [1, 2', W, False),
            ("PUT", "/photos/c", b"NaN", W, False),
            ("PUT", "/photos/" + "k" * 600, {"embedding": good}, W, False),
            ("PUT", "/photos/%00", {"embedding": good}, W, False),
            ("PUT", "/photos/c", b"embedding=1", {**W, "Content-Type": "text/plain"}, False),
            ("PUT", "/photos/c", {"embedding": good}, {**W, "Origin": "https://app.example"}, False),  # CORS's
            ("PUT", "/photos/c", {"embedding": good * (4000 // dim + 1)}, W, False),  # over the limit: 413
            ("DELETE", "/photos/b", None, W, True),
            ("DELETE", "/photos/b", None, W, True),  # gone: 404 photo_not_found
            ("DELETE", "/photos/a", None, R, False),
            ("DELETE", "/photos/a/b", None, W, None),  # not /photos/{key}: FastAPI's 404 (never the fast path)
            ("GET", "/photos/a", None, R, None),
            ("DELETE", "/photos/a", None, W, True),
            ("GET", "/photos/a", None, R, None),
        ]
        for method, path, body, headers, fast_expected in requests:
            answers = []
            for client in (fast, plain):
                answered.clear()
                if isinstance(body, bytes):
                    r = client.request(method, path, content=body,
                                       headers={"Content-Type": "application/json", **headers})  # fmt: skip
                else:
                    r = client.request(method, path, json=body, headers=headers)
                answers.append((r.status_code, r.json(), list(answered)))
            (status, got, route), (plain_status, want, _) = answers
            assert (status, got) == (plain_status, want), (method, path, body)
            if fast_expected is not None:
                assert (route == ["fast"]) is fast_expected, (method, path, body, status, got)
        writer = apps[0].state.server.served["index"].writer
        assert (writer is not None and writer.started == 1 and writer.pid is not None) is writer_process
    fast_db, plain_db = _snapshot(tmp_path / "fast" / "index"), _snapshot(tmp_path / "plain" / "index")
    assert fast_db[1:] == plain_db[1:] and [r[:3] for r in fast_db[0]] == [r[:3] for r in plain_db[0]]


def test_a_server_with_writes_leaves_a_core_to_them(env, tmp_path, monkeypatch):
    """Searches run at most one per core; with writes enabled, one core fewer (at least one), so that the writer
    thread and the event loop answering PUT/DELETE are not starved by searches (writes/s at 1M on 2 cores)."""
    from ruclip_search.server.state import default_search_slots

    def slots(app) -> int:
        busy = app.state.server.busy
        n = 0
        while busy.acquire(blocking=False):
            n += 1
        for _ in range(n):
            busy.release()
        return n

    cores = os.cpu_count() or 1
    assert slots(env.app) == max(1, cores - 1)
    read_only = create_app([env.index], token=READ, device="cpu")
    assert slots(read_only) == cores
    read_only.state.server.close()
    with_writer = create_app([env.index], token=READ, write_token=WRITE, device="cpu", writer_process=True)
    assert slots(with_writer) == cores  # the writes take no core of this process
    with_writer.state.server.close()
    for n, writes, expected in ((8, True, 7), (8, False, 8), (2, True, 1), (1, True, 1), (1, False, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda n=n: n)
        assert default_search_slots("token" if writes else None) == expected


# -- the writer process ------------------------------------------------------------------------------------------
@pytest.fixture
def writer_env(tmp_path, tiny_model_path, monkeypatch):
    """An empty index served with writes committed by a writer process; the server's Index never catches up with
    the store on its own (only what the writer's answers bring), so a test sees what the answers do."""
    from ruclip_search import defaults
    from ruclip_search.search import Index

    monkeypatch.setattr(defaults, "REFRESH_INTERVAL", 3600.0)
    Index.create(tmp_path / "index", model=str(tiny_model_path), device="cpu").close()
    app = create_app([tmp_path / "index"], token=READ, write_token=WRITE, device="cpu", writer_process=True)
    with TestClient(app) as client:
        dim = client.get("/info", headers=R).json()["indexes"][0]["info"]["dim"]
        yield SimpleNamespace(c=client, app=app, dim=dim, served=app.state.server.served["index"])


def test_a_write_in_the_writer_process_is_searchable_when_answered(writer_env):
    """The 200 of a PUT or DELETE committed by the writer process comes after the server's own searches see it
    (read-your-writes), though the server never reads the store's change log here."""
    env = writer_env
    pid = env.served.writer.pid
    assert pid is not None and pid != os.getpid()
    for i in range(5):
        vec = _unit(env.dim, 40 + i)
        r = env.c.put(f"/photos/p{i}", json={"embedding": vec, "collection": "mine"}, headers=W)
        assert r.status_code == 200 and r.json()["key"] == f"p{i}", r.text
        hits = env.served.index.search(np.asarray(vec, dtype=np.float32), k=1)  # unscoped: the recent segment
        assert [h.key for h in hits] == [f"p{i}"]
        assert env.c.get(f"/photos/p{i}", headers=R).status_code == 200
    assert env.c.delete("/photos/p0", headers=W).status_code == 200
    assert sorted(_keys(env.c)) == ["p1", "p2", "p3", "p4"]
    assert env.served.writer.pid == pid  # one process did all of it


def test_the_writer_process_groups_writes_that_keep_coming(tmp_path, tiny_model_path, monkeypatch):
    """While writes keep coming, the writer process holds a write up to WRITER_COMMIT_DELAY so that the next ones
    share its commit (one transaction, one answer frame, one apply in the server); each is answered after that
    commit and is searchable then. A write after a quiet spell is committed at once, not held."""
    from ruclip_search import defaults
    from ruclip_search.search import Index

    monkeypatch.setattr(defaults, "REFRESH_INTERVAL", 3600.0)  # the server sees only what the answers bring
    monkeypatch.setattr(defaults, "WRITER_COMMIT_DELAY", 1.0)
    monkeypatch.setattr(defaults, "WRITER_BUSY", 5.0)
    Index.create(tmp_path / "index", model=str(tiny_model_path), device="cpu").close()
    app = create_app([tmp_path / "index"], token=READ, write_token=WRITE, device="cpu", writer_process=True)
    with TestClient(app) as client:
        served = app.state.server.served["index"]
        dim = client.get("/info", headers=R).json()["indexes"][0]["info"]["dim"]
        t = time.monotonic()
        assert client.put("/photos/first", json={"embedding": _unit(dim, 1)}, headers=W).status_code == 200
        assert time.monotonic() - t < 1.0  # nothing was written before it: not held for others
        before = served.writer.commits

        got: dict[int, object] = {}

        def send(i: int) -> None:
            if i < 6:
                got[i] = client.put(f"/photos/b{i}", json={"embedding": _unit(dim, 10 + i)}, headers=W)
            else:
                got[i] = client.delete("/photos/first", headers=W)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(7)]
        for t in threads:  # one every 20 ms, as paced writers send them
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(60)
        answers = [got[i] for i in range(7)]
        assert [a.status_code for a in answers] == [200] * 7, [a.text for a in answers]
        assert [a.json()["key"] for a in answers[:6]] == [f"b{i}" for i in range(6)]
        assert served.writer.commits - before <= 2  # 7 writes, one group (two if the first came too late)
        for i in range(6):  # each answered after its commit and the server's apply
            hits = served.index.search(np.asarray(_unit(dim, 10 + i), dtype=np.float32), k=1)
            assert [h.key for h in hits] == [f"b{i}"]
        assert sorted(_keys(client)) == [f"b{i}" for i in range(6)]


def test_a_bad_writer_niceness_is_a_clear_error(tmp_path, tiny_model_path, monkeypatch):
    """RUCLIP_SEARCH_WRITER_NICE that is not a whole number stops the app's creation with an error naming the
    variable (it was a bare ValueError) and closes the index it opened; a good one is the writer's niceness."""
    from ruclip_search.errors import RuclipSearchError
    from ruclip_search.search import Index
    from ruclip_search.server.writer import WriterProcess

    Index.create(tmp_path / "index", model=str(tiny_model_path), device="cpu").close()
    monkeypatch.setenv("RUCLIP_SEARCH_WRITER_NICE", "low")
    closed, close = [], Index.close
    monkeypatch.setattr(Index, "close", lambda self: (closed.append(self), close(self))[-1])
    with pytest.raises(RuclipSearchError, match="RUCLIP_SEARCH_WRITER_NICE.*'low'"):
        create_app([tmp_path / "index"], write_token=WRITE, device="cpu", writer_process=True)
    assert len(closed) == 1
    monkeypatch.setenv("RUCLIP_SEARCH_WRITER_NICE", "7")
    assert WriterProcess(None)._nice == 7


def test_a_dead_writer_process_fails_its_pending_writes_with_503_and_is_replaced(writer_env):
    """A write the writer process never answered (it died) gets 503 `writer_failed`; the next write starts a new
    writer process and succeeds; nothing half-written is visible."""
    import asyncio
    import signal

    import httpx

    env = writer_env
    old = env.served.writer.pid
    os.kill(old, signal.SIGSTOP)  # it reads nothing more until killed

    async def write_while_it_dies() -> httpx.Response:
        transport = httpx.ASGITransport(app=env.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            put = asyncio.ensure_future(ac.put("/photos/lost", json={"embedding": _unit(env.dim, 3)}, headers=W))
            await asyncio.sleep(0.5)
            assert not put.done()
            os.kill(old, signal.SIGKILL)
            return await asyncio.wait_for(put, 30)

    r = asyncio.run(write_while_it_dies())
    assert r.status_code == 503 and r.json()["code"] == "writer_failed", r.text
    deadline = time.monotonic() + 10
    while env.served.writer.pid is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    r = env.c.put("/photos/next", json={"embedding": _unit(env.dim, 4)}, headers=W)
    assert r.status_code == 200, r.text
    assert env.served.writer.pid not in (None, old) and env.served.writer.started == 2
    assert env.c.get("/photos/lost", headers=R).status_code == 404
    assert _keys(env.c) == ["next"]


@pytest.mark.crash
def test_the_writer_process_dies_with_a_killed_server(tmp_path, tiny_model_path):
    """`kill -9` of `serve`: its writer process exits too (no orphan keeps the index open)."""
    import httpx

    from ruclip_search.search import Index

    Index.create(tmp_path / "index", model=str(tiny_model_path), device="cpu").close()
    server = _Server(tmp_path / "index", tmp_path / "server.log")
    server.start()
    try:
        assert server.proc is not None
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        child = int(children[0])
        assert "ruclip_search.server.writer" in Path(f"/proc/{child}/cmdline").read_text()
        dim = httpx.get(f"{server.base}/info", timeout=10).json()["indexes"][0]["info"]["dim"]
        r = httpx.put(f"{server.base}/photos/a", json={"embedding": _unit(dim, 1)}, headers=W, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        server.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _proc_state(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child), "the writer process outlived the server"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
