"""kill -9 of a Ray build's driver mid-write, again and again: a re-run loses nothing, re-encodes only what
was not committed, ends identical to a local build, and the cluster gets the dead driver's resources back."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TESTS, TINY_MODEL, make_photos
from proctree import rows
from test_indexer import snapshot

from ruclip_search.indexer import build

N_PHOTOS = 60
BATCH = 3
KILLS = 6

DRIVER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from ruclip_search.indexer import build
r = build({photos!r}, index={index!r}, model={model!r}, device="cpu", batch_size={batch}, engine="ray",
          ray_address={address!r})
print(r.added, r.unchanged, r.encoded, r.reused, flush=True)
"""


def driver(photos: Path, index: Path, address: str) -> subprocess.Popen:
    code = DRIVER.format(root=str(ROOT), tests=str(TESTS), photos=str(photos), index=str(index),
                         model=str(TINY_MODEL), batch=BATCH, address=address)  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_cpus(timeout: float = 60.0) -> None:
    """Until the cluster has its 2 CPUs free again: a dead driver's tasks and actors were released."""
    import ray

    t0 = time.monotonic()
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() - t0 < timeout, (
            f"the killed driver's resources were not released: {ray.available_resources()}"
        )
        time.sleep(0.2)


@pytest.mark.crash
@pytest.mark.ray
def test_sigkill_ray_driver(ray_cluster: str, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, N_PHOTOS, size=64)
    clean = tmp_path / "clean"
    build(photos, index=clean, model=str(TINY_MODEL), device="cpu", batch_size=BATCH, workers=0)
    expected = snapshot(clean)

    rng = random.Random(11)
    index = tmp_path / "crashy"
    mid_write = 0
    for attempt in range(KILLS):
        before = max(rows(index), 0)
        assert N_PHOTOS - before >= 4 * BATCH, "too few photos left to kill mid-write: raise N_PHOTOS"
        target = rng.randint(before + 1, before + 2 * BATCH)  # a few batches into this run
        proc = driver(photos, index, ray_cluster)
        try:
            while proc.poll() is None and rows(index) < target:
                time.sleep(0.002)
            seen = rows(index)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        after = rows(index)
        assert proc.returncode == -signal.SIGKILL, f"attempt {attempt}: the driver ended by itself: {err[-2000:]}"
        if before < seen and after < N_PHOTOS:
            mid_write += 1
        wait_for_cpus()
    assert mid_write >= KILLS - 1, f"only {mid_write} of {KILLS} kills landed mid-write"

    committed = rows(index)
    proc = driver(photos, index, ray_cluster)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    added, unchanged, encoded, reused = map(int, out.split()[-4:])
    # what the killed runs committed is kept; only the rest is sent to the cluster again
    assert (unchanged, added) == (committed, N_PHOTOS - committed)
    assert encoded + reused == N_PHOTOS - committed
    got = snapshot(index)
    assert got.keys() == expected.keys()
    for path, vec in expected.items():
        np.testing.assert_allclose(got[path], vec, atol=1e-6, rtol=0)
