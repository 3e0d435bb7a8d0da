"""Shared test fixtures: photo folders of synthetic images, a fast stand-in model, the tiny fixture model."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY_MODEL = TESTS / "fixtures" / "tiny-ruclip"
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)


class StandInModel:
    """Deterministic model with RuCLIP's indexing interface: pooled pixels through a fixed projection.

    Cheap (no weights), so pipeline tests run in milliseconds; `calls`/`encoded` count model work.
    """

    def __init__(self, dim: int = 32, image_size: int = 32, name: str = "stand-in") -> None:
        from ruclip_search.preprocess import Preprocessor

        self.name, self.dim, self.image_size, self.device = name, dim, image_size, "cpu"
        self.preprocessor = Preprocessor(image_size=image_size)
        self.proj = np.random.default_rng(0).normal(size=(3 * 16, dim)).astype(np.float32)
        self.calls = 0
        self.encoded = 0

    def encode_pixels(self, pixels) -> np.ndarray:
        import torch

        self.calls += 1
        self.encoded += len(pixels)
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), 4).reshape(len(pixels), -1).numpy()
        out = pooled @ self.proj
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def ctrl_c_default() -> None:
    """Popen `preexec_fn` for a child a test sends Ctrl-C: start it with SIGINT's default action. A child
    inherits an *ignored* SIGINT (a test run started as a shell's background job, `cmd &`, ignores it) and Python
    then installs no KeyboardInterrupt handler, so the Ctrl-C under test would be lost."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sigint_ignored(pid: int) -> bool:
    """Whether process `pid` ignores SIGINT (bit 2 of its SigIgn mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << 1))
    return False


def make_photos(folder: Path, n: int = 12, size: int = 48, seed: int = 0) -> list[Path]:
    """Write `n` JPEG/PNG drawings of the fixture classes into `folder`; returns their paths."""
    from fixture_images import FIXTURE_CLASSES, draw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        cls = FIXTURE_CLASSES[i % len(FIXTURE_CLASSES)]
        path = folder / f"{i:03d} {cls}.{'png' if i % 3 == 0 else 'jpg'}"
        draw(cls, seed=seed + i, size=size).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def stand_in_model() -> StandInModel:
    return StandInModel()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of 12 synthetic photos (one per fixture class)."""
    folder = tmp_path / "photos"
    make_photos(folder)
    return folder


@pytest.fixture
def tiny_model_path() -> Path:
    """The trained tiny RuCLIP fixture folder (skips when it is not there yet)."""
    if not (TINY_MODEL / "config.json").is_file():
        pytest.skip("tests/fixtures/tiny-ruclip is missing: run scripts/make_fixture_model.py")
    return TINY_MODEL


# -- no silent skips in CI --------------------------------------------------------------------------------
# A skip hides a missing fixture model, a broken HEIF encoder or a browser that failed to install: with CI set
# (any value but "" / "0" / "false"), every skip fails the run, except tests marked `gpu` (they skip without
# CUDA) and tests marked `allow_skip(reason=...)`, whose skip is an explained, accepted gap. Deselecting with
# -m is not a skip; CI only deselects the tiers it runs separately.
ALLOWED_SKIP_MARKERS = ("gpu", "allow_skip")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_skip(reason): this test may skip in CI (say why); any other skip fails a CI run"
    )


def _unexpected_skip(report: pytest.TestReport | pytest.CollectReport, item: pytest.Item | None) -> bool:
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return False
    return item is None or not any(item.get_closest_marker(m) for m in ALLOWED_SKIP_MARKERS)


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"unexpected skip in CI ({reason}): fix the cause, or mark the test allow_skip(reason=...) / gpu"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if _unexpected_skip(report, item):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()  # a whole module skipped at import (importorskip, module-level skip)
    if _unexpected_skip(report, None):
        _fail(report)


# -- where an index keeps its metadata: SQLite, or PostgreSQL ---------------------------------------------
PG_URL_VAR = "RUCLIP_TEST_PG_URL"  # a database the tests may create schemas in (.ci/run starts a server)


@contextlib.contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """A fresh schema in the database at `url`, dropped afterwards; yields a URL whose search_path is it."""
    import uuid

    import psycopg
    import sqlalchemy as sa

    base = sa.make_url(url)
    plain = base.set(drivername="postgresql").render_as_string(hide_password=False)  # libpq's URI
    name = f"t_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield base.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')


def _pg_or_skip() -> str:
    url = os.environ.get(PG_URL_VAR)
    if not url:  # in CI (CI=true) this skip fails the run: .ci/run always sets it
        pytest.skip(f"{PG_URL_VAR} is not set: point it at a PostgreSQL database to run the PostgreSQL variant")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The `db` argument for a test's index: None (SQLite, index.db in the folder) or the URL of a fresh
    PostgreSQL schema. Tests of storage behaviour take this fixture, so they run against both."""
    if request.param == "sqlite":
        yield None
        return
    with pg_schema(_pg_or_skip()) as url:
        yield url


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A fresh PostgreSQL schema's URL, for tests of PostgreSQL-only behaviour (migrate, URLs, locking)."""
    with pg_schema(_pg_or_skip()) as url:
        yield url


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- a built index of fixture photos (search, cli search and server tests) ------------------------------
SEARCH_PER_CLASS = 4  # images per fixture class in `search_index`


def _exif_jpeg(img, path: Path, taken: str) -> None:
    """Save a JPEG whose EXIF DateTimeOriginal is `taken` ("YYYY:MM:DD HH:MM:SS")."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = taken
    img.save(path, "JPEG", quality=95, exif=exif)


def make_search_photos(folder: Path) -> list[dict]:
    """12 classes x 4 drawings: seeds 0-1 in a/, 2-3 in b/; even seeds JPEG with EXIF dates, odd seeds PNG.

    Returns one dict per file: path, cls, seed, format, taken (datetime or None). JPEG dates are
    2021-01-01 + (class index * 4 + seed) days, 12:00.
    """
    import datetime as dt

    from fixture_images import FIXTURE_CLASSES, draw

    out = []
    for ci, cls in enumerate(FIXTURE_CLASSES):
        for seed in range(SEARCH_PER_CLASS):
            sub = folder / ("a" if seed < 2 else "b")
            sub.mkdir(parents=True, exist_ok=True)
            img = draw(cls, seed=seed, size=64)
            if seed % 2 == 0:
                taken = dt.datetime(2021, 1, 1, 12) + dt.timedelta(days=ci * SEARCH_PER_CLASS + seed)
                path = sub / f"{cls} {seed}.jpg"
                _exif_jpeg(img, path, taken.strftime("%Y:%m:%d %H:%M:%S"))
                out.append({"path": str(path), "cls": cls, "seed": seed, "format": "JPEG", "taken": taken})
            else:
                path = sub / f"{cls} {seed}.png"
                img.save(path)
                out.append({"path": str(path), "cls": cls, "seed": seed, "format": "PNG", "taken": None})
    return out


@pytest.fixture(scope="session")
def search_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """(index dir, photo list) of `make_search_photos`, built once per session with the tiny model. Read-only."""
    if not (TINY_MODEL / "config.json").is_file():
        pytest.skip("tests/fixtures/tiny-ruclip is missing: run scripts/make_fixture_model.py")
    from ruclip_search.indexer import build

    base = tmp_path_factory.mktemp("search")
    photos = make_search_photos(base / "photos")
    report = build(base / "photos", index=base / "index", model=str(TINY_MODEL), workers=0, device="cpu")
    assert report.added == len(photos) and report.failed == 0
    return base / "index", photos


# -- a local Ray cluster (tests marked `ray`) ----------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """A 2-CPU local Ray cluster for the whole session (small object store, no dashboard); its GCS address.

    Its workers import the tests' modules (misbehaving loaders and models) through PYTHONPATH.
    """
    ray = pytest.importorskip("ray", reason="Ray tests need the dev extra: pip install -e '.[dev]'")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    info = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2,
                    logging_level="WARNING", log_to_driver=False)  # fmt: skip
    yield info.address_info["gcs_address"]
    ray.shutdown()
