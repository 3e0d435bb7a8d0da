"""The web page end to end in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

Marked `browser` (run with -m browser); skipped where /usr/bin/chromium or the playwright package is missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [  # run with -m browser (.ci/run does)
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(search_index) -> Iterator[str]:
    """The app on a loopback port, served by uvicorn in a thread."""
    import uvicorn

    from ruclip_search.server import create_app

    port = _free_port()
    config = uvicorn.Config(create_app([search_index[0]]), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _names(page) -> list[str]:
    return [Path(t).stem.rsplit(" ", 1)[0] for t in page.locator(".card").evaluate_all("els => els.map(e => e.title)")]


def test_search_view_and_similar(browser, base_url, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760}, locale="ru-RU", bypass_csp=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(base_url + "/")
    box = page.locator("#q")
    assert box.get_attribute("placeholder") == "рыжий кот на диване"

    box.fill("синий квадрат")
    box.press("Enter")
    page.wait_for_selector(".card")
    assert _names(page)[:4] == ["синий квадрат"] * 4
    scores = [float(s) for s in page.locator(".card .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert "«синий квадрат»" in page.locator("#status").inner_text()
    page.wait_for_function(
        "[...document.querySelectorAll('.card img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(tmp_path / "results.png"), full_page=True)
    page.screenshot(path="/tmp/ruclip-web.png", full_page=True)

    first = page.locator(".card").first
    first_path = first.get_attribute("title")
    first.click()
    viewer = page.locator("#viewer")
    viewer.wait_for(state="visible")
    assert page.locator("#meta-path").inner_text() == first_path
    page.wait_for_function("document.getElementById('big').complete && document.getElementById('big').naturalWidth > 0")
    assert page.locator("#original").get_attribute("href").endswith("/file")
    page.screenshot(path=str(tmp_path / "viewer.png"))
    shutil.copy(tmp_path / "viewer.png", "/tmp/ruclip-web-viewer.png")

    page.get_by_role("button", name="Похожие").click()
    viewer.wait_for(state="hidden")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Похожие')")
    page.wait_for_selector(".card")
    titles = page.locator(".card").evaluate_all("els => els.map(e => e.title)")
    assert first_path not in titles  # the photo itself is not "similar to itself"
    assert _names(page)[:3] == ["синий квадрат"] * 3
    assert "#similar=" in page.url
    page.screenshot(path=str(tmp_path / "similar.png"), full_page=True)
    assert not errors, errors
    page.close()


def test_search_by_uploaded_photo_and_errors(browser, base_url, tmp_path):
    from fixture_images import draw

    photo = tmp_path / "мой жёлтый круг.png"
    draw("жёлтый круг", seed=77, size=96).save(photo)
    page = browser.new_page(bypass_csp=True)  # the page's CSP forbids the eval wait_for_function needs
    page.goto(base_url + "/")
    page.set_input_files("#upload", str(photo))
    page.wait_for_function("document.getElementById('status').textContent.includes('мой жёлтый круг')")
    page.wait_for_selector(".card")
    assert _names(page)[:4] == ["жёлтый круг"] * 4

    not_image = tmp_path / "notes.txt"
    not_image.write_text("не картинка")
    page.set_input_files("#upload", str(not_image))
    page.wait_for_selector("#status.error")
    assert "not an image" in page.locator("#status").inner_text()
    page.close()


def test_link_with_query_in_hash(browser, base_url):
    page = browser.new_page(bypass_csp=True)  # the page's CSP forbids the eval wait_for_function needs
    page.goto(base_url + "/#q=" + "зелёный треугольник")
    page.wait_for_selector(".card")
    assert page.locator("#q").input_value() == "зелёный треугольник"
    assert _names(page)[:4] == ["зелёный треугольник"] * 4
    page.close()
