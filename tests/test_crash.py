"""kill -9 mid-write, chosen on evidence of progress: a re-run must end identical to an uninterrupted build,
and nothing of a killed build (forkserver, decoding workers) may outlive it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import make_photos
from proctree import descendants, describe, kill_all, rows, run_builder, wait_gone
from test_indexer import snapshot

from ruclip_search.store import Store

N_PHOTOS = 48
BATCH = 3
KILLS = 10


def finish(photos: Path, index: Path, db: str | None = None) -> None:
    proc = run_builder(photos, index, batch_size=BATCH, db=db)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()


@pytest.mark.crash
def test_sigkill_mid_write(tmp_path: Path, db: str | None) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, N_PHOTOS, size=256)
    clean = tmp_path / "clean"
    finish(photos, clean)  # the reference: an uninterrupted build into SQLite
    expected = snapshot(clean)
    assert len(expected) == N_PHOTOS

    rng = random.Random(1234)
    index = tmp_path / "crashy"
    mid_write = 0
    for attempt in range(KILLS):
        if attempt == KILLS // 2:  # change some files: later builds start from partial state with updates
            for p in sorted(photos.iterdir())[:5]:
                os.utime(p)
        before = max(rows(index, db), 0)
        if N_PHOTOS - before < 4 * BATCH:  # too little left to kill mid-write: start over
            shutil.rmtree(index)
            if db is not None:
                with Store(index, readonly=False, db=db) as store, store.engine.begin() as conn:
                    conn.execute(sa.text("DROP TABLE meta, roots, images, labels, changes CASCADE"))
            before = 0
        # kill once this many rows are committed: at least one batch of this run, and several batches before the end
        target = rng.randint(before + 1, N_PHOTOS - 3 * BATCH)
        proc = run_builder(photos, index, workers=1 if attempt % 3 == 1 else 0, batch_size=BATCH, db=db)
        try:
            while proc.poll() is None and rows(index, db) < target:
                time.sleep(0.002)
            tree = descendants(proc.pid)
            seen = rows(index, db)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
        after = rows(index, db)
        if proc.returncode == -signal.SIGKILL and before < seen and after < N_PHOTOS:
            mid_write += 1  # after this run's first committed batch, before its last one
        left, _ = wait_gone(tree)
        message = f"attempt {attempt}: still running 5 s after kill -9: {describe(left)}"
        kill_all(left)
        assert not left, message
    assert mid_write >= KILLS - 2, f"only {mid_write} of {KILLS} kills landed mid-write"

    finish(photos, index, db)
    got = snapshot(index, db)
    assert got.keys() == expected.keys()
    for path, vec in expected.items():
        np.testing.assert_allclose(got[path], vec, atol=2e-3)
    leftovers = [p.name for p in index.iterdir() if p.name.endswith(".tmp") or p.name.startswith("faiss-")]
    assert len(leftovers) == 1, leftovers
