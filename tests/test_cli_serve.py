"""`ruclip-index serve` through the real CLI: token (flag and RUCLIP_SEARCH_TOKEN), --cors-origin, and the
warning for a non-loopback address. The server process binds 127.0.0.1 only."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from ruclip_search.cli import main

START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.subprocess
@pytest.mark.parametrize("token_from", ["env", "flag"])
def test_serve_token_and_cors_in_a_real_process(search_index, token_from: str) -> None:
    """README: `RUCLIP_SEARCH_TOKEN=s3cret ruclip-index serve ...` (or --token) guards every API call;
    /health stays open; --cors-origin allows exactly that origin."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ruclip_search.cli", "serve", "--index", str(search_index[0]),
           "--port", str(port), "--device", "cpu", "--cors-origin", "https://app.example"]  # fmt: skip
    if token_from == "env":
        env["RUCLIP_SEARCH_TOKEN"] = "s3cret"
    else:
        cmd += ["--token", "s3cret"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if _get(f"{base}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        status, headers, _ = _get(f"{base}/search?q=%D0%BA%D0%BE%D1%82")
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert _get(f"{base}/info", {"Authorization": "Bearer wrong"})[0] == 401
        status, _, body = _get(f"{base}/search?q=%D0%BA%D0%BE%D1%82&k=2", {"Authorization": "Bearer s3cret"})
        assert status == 200 and b'"hits"' in body
        headers = _get(f"{base}/health", {"Origin": "https://app.example"})[1]
        assert headers.get("access-control-allow-origin") == "https://app.example"
        headers = _get(f"{base}/health", {"Origin": "https://evil.example"})[1]
        assert "access-control-allow-origin" not in {k.lower() for k in headers}
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert "without a token" not in out


def test_serve_warns_on_a_non_loopback_address_without_token(
    search_index, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """README: binds 127.0.0.1 unless --host; on any other address, set a token (the CLI warns). Nothing binds:
    uvicorn.run is replaced, so the CLI and the server module run for real up to the socket."""
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    args = ["serve", "--index", str(search_index[0]), "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(main, [*args, "--host", "192.0.2.7"])  # TEST-NET-1: never reachable
    assert r.exit_code == 0, r.output
    assert calls[-1]["host"] == "192.0.2.7"
    assert any("without a token" in rec.getMessage() for rec in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for extra in (["--host", "192.0.2.7", "--token", "t"], []):
            r = CliRunner().invoke(main, [*args, *extra])
            assert r.exit_code == 0, r.output
    assert not any("without a token" in rec.getMessage() for rec in caplog.records)
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000  # the defaults


def test_serve_reads_the_token_from_the_environment(search_index, monkeypatch: pytest.MonkeyPatch) -> None:
    from ruclip_search import server

    seen: list[dict] = []
    monkeypatch.setattr(server, "serve", lambda dirs, **kw: seen.append(kw))
    monkeypatch.setenv("RUCLIP_SEARCH_TOKEN", "from-env")
    r = CliRunner().invoke(main, ["serve", "--index", str(search_index[0]), "--cors-origin", "https://a.example"])
    assert r.exit_code == 0, r.output
    assert seen[-1]["token"] == "from-env" and tuple(seen[-1]["cors_origins"]) == ("https://a.example",)
    assert Path(search_index[0]).is_dir()
