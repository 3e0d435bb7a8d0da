"""Pillow's own test images (Tests/images of its sdist: ~1,000 fuzzed, truncated and odd files) against our decoder.

The rule, both ways: a file that Pillow (with pillow-heif registered) cannot fully load is an ImageError, never
an image; a file that Pillow loads within the pixel cap decodes. The sdist is downloaded with pip once and kept
under ~/.cache/ruclip-search-tests (not committed). Offline, the test skips, except in CI (``CI`` set): there
it fails.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from ruclip_search.decode import DEFAULT_MAX_PIXELS
from ruclip_search.errors import ImageError
from ruclip_search.preprocess import Preprocessor

pytestmark = pytest.mark.slow

#: Files Pillow loads within the cap that we deliberately refuse: relative path -> why. None today.
KNOWN_REFUSALS: dict[str, str] = {}

PER_FILE_TIMEOUT_S = 60  # the corpus has decompression bombs and fuzzer "timeout-*" files
_OFFLINE = re.compile(r"(?i)connection|name resolution|network is unreachable|timed out|proxy")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ruclip-search-tests"


def _download_sdist(dest: Path) -> Path:
    """pip-download Pillow's sdist (the installed version, else the newest) into ``dest``; skip if offline."""
    dest.mkdir(parents=True, exist_ok=True)
    output = ""
    for spec in (f"pillow=={Image.__version__}", "pillow"):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--retries", "1", "--timeout", "30", "-d", str(dest), spec]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        sdists = sorted(dest.glob("pillow-*.tar.gz"))
        if done.returncode == 0 and sdists:
            return sdists[-1]
        output = (done.stdout + done.stderr).strip()
    tail = "\n".join(output.splitlines()[-5:])
    if _OFFLINE.search(output) and not os.environ.get("CI"):
        pytest.skip(f"pip cannot reach the package index to download Pillow's sdist: {tail}")
    pytest.fail(f"pip could not download Pillow's sdist:\n{tail}")


@pytest.fixture(scope="module")
def corpus() -> Path:
    """Tests/images of Pillow's sdist, unpacked once into the cache."""
    root = _cache_dir() / f"pillow-{Image.__version__}"
    images = root / "images"
    if (root / "complete").is_file():
        return images
    sdist = _download_sdist(root / "sdist")
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if parts[1:3] == ("Tests", "images") and len(parts) > 3 and (member.isfile() or member.isdir()):
                member.name = str(Path("images", *parts[3:]))
                members.append(member)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=members, **extra)
    (root / "complete").write_text(sdist.name)
    return images


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException, so our decoder's `except Exception` cannot turn it into ImageError."""


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def _init_worker() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # what decode sets it to: PIL's bomb error only at twice the cap
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGALRM, _alarm)


def _pillow_loads(path: Path) -> str:
    """'ok', 'over cap', or why Pillow cannot load the first frame (what we index)."""
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > DEFAULT_MAX_PIXELS:
                return "over cap"
            im.load()
    except _Timeout:
        raise
    except BaseException as exc:  # any failure of Pillow's (some plugins raise odd types) is the answer
        return f"{type(exc).__name__}: {str(exc)[:100]}"
    return "ok"


def _ours(path: Path) -> dict[str, str]:
    """'ok' or the error per preprocessing mode ("exact": full decode; "fast": JPEG draft, no orientation)."""
    results = {}
    for mode in ("exact", "fast"):
        try:
            Preprocessor(mode=mode).load_with_info(path)
            results[mode] = "ok"
        except ImageError as exc:
            results[mode] = f"ImageError: {exc}"
        except _Timeout:
            raise
        except BaseException as exc:  # anything but ImageError is a bug of ours
            results[mode] = f"{type(exc).__name__} (not ImageError): {str(exc)[:100]}"
    return results


def _check(path: Path) -> tuple[str, str, dict[str, str]]:
    """(path, Pillow's answer, ours per mode), each within PER_FILE_TIMEOUT_S."""
    signal.alarm(PER_FILE_TIMEOUT_S)
    try:
        return str(path), _pillow_loads(path), _ours(path)
    except _Timeout:
        return str(path), "timeout", {}
    finally:
        signal.alarm(0)


def test_decoder_agrees_with_pillow_on_its_test_images(corpus: Path) -> None:
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    assert len(files) > 500, f"only {len(files)} files under {corpus}: a broken download? delete it and rerun"
    # spawn, not fork: earlier tests in the same session may have started torch's OpenMP threads, and a
    # forked child that then runs torch deadlocks in them (seen in CI: both workers hung, no answer at all).
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(2, os.cpu_count() or 1), initializer=_init_worker, maxtasksperchild=200) as pool:
        pending = {p: pool.apply_async(_check, (p,)) for p in files}
        checked, silent = [], []
        deadline = time.monotonic() + len(files) * 2 + 3 * PER_FILE_TIMEOUT_S
        for path, result in pending.items():
            try:
                checked.append(result.get(timeout=max(1.0, deadline - time.monotonic())))
            except multiprocessing.TimeoutError:
                silent.append(path.relative_to(corpus).as_posix())  # its worker died or hung in C code
    assert not silent, f"no answer (a worker died or hung where SIGALRM cannot reach): {silent}"
    accepted, refused, timeouts = [], [], []
    for path, pillow, ours in checked:
        name = Path(path).relative_to(corpus).as_posix()
        if pillow == "timeout":
            timeouts.append(name)
        elif pillow != "ok":
            accepted += [
                f"{name} ({mode}): Pillow {pillow!r}, ours {r!r}"
                for mode, r in ours.items()
                if not r.startswith("ImageError")
            ]
        elif name not in KNOWN_REFUSALS:
            refused += [f"{name} ({mode}): Pillow loads it, ours {r!r}" for mode, r in ours.items() if r != "ok"]
    assert not timeouts, f"over {PER_FILE_TIMEOUT_S} s: {timeouts}"
    assert not accepted, "not refused with ImageError although Pillow cannot load them:\n" + "\n".join(accepted)
    assert not refused, "refused although Pillow loads them within the cap:\n" + "\n".join(refused)
    stale = sorted(set(KNOWN_REFUSALS) - {Path(p).relative_to(corpus).as_posix() for p, _, _ in checked})
    assert not stale, f"KNOWN_REFUSALS names files not in the corpus: {stale}"
