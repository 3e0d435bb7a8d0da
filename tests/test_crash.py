"""kill -9 at random moments: a re-run must end identical to an uninterrupted build."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import ROOT, TESTS, make_photos
from test_indexer import snapshot

SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import StandInModel
from ruclip_search.indexer import build
build({photos!r}, index={index!r}, model=StandInModel(), workers={workers}, batch_size=3)
"""


def run_builder(photos: Path, index: Path, workers: int = 0) -> subprocess.Popen:
    code = SCRIPT.format(root=str(ROOT), tests=str(TESTS), photos=str(photos), index=str(index), workers=workers)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(photos: Path, index: Path) -> None:
    proc = run_builder(photos, index)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()


def test_sigkill_at_random_points(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, 36, size=64)
    clean = tmp_path / "clean"
    t0 = time.monotonic()
    finish(photos, clean)
    duration = time.monotonic() - t0
    expected = snapshot(clean)
    assert len(expected) == 36

    rng = random.Random(1234)
    index = tmp_path / "crashy"
    kills = attempts = 0
    while kills < 10 and attempts < 30:
        attempts += 1
        if attempts == 6:  # change some files: later kills hit builds that start from partial state
            for p in sorted(photos.iterdir())[:5]:
                os.utime(p)
        proc = run_builder(photos, index, workers=1 if attempts % 4 == 3 else 0)
        time.sleep(rng.uniform(0.3, duration))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        elif kills % 3 == 0:
            shutil.rmtree(index)  # it finished: start over so the next kill lands mid-build again
        proc.wait(timeout=60)
    assert kills >= 10
    finish(photos, index)
    got = snapshot(index)
    assert got.keys() == expected.keys()
    for path, vec in expected.items():
        np.testing.assert_allclose(got[path], vec, atol=2e-3)
    leftovers = [p.name for p in index.iterdir() if p.name.endswith(".tmp") or p.name.startswith("faiss-")]
    assert len(leftovers) == 1, leftovers
