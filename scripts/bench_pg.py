"""SQLite vs PostgreSQL as the metadata store (issue 10), side by side in one run:

1. the storage test suite's wall time: every test that takes the `db` fixture (test_store, test_online_store,
   test_indexer, test_pg, test_online, test_search, test_server; default tier), once with its `[sqlite]`
   variants and once with its `[postgresql]` variants, each in a fresh pytest process, alternating, `--runs`
   times each (median);
2. metadata filter query times at `--n` photos (`Store.filter_ids`: the SQL and the ids into numpy), for the
   SearchFilters cases: under (a folder of 1/10 of the photos), a date range (one month), formats (PNG),
   collections (1 of 1,000), labels (1 of 100), and all of them at once; median and min of `--reps` after a warm-up.

Data: `--n` photos of 768-d float16 embeddings (random bytes: no query reads them), each a file under one root
(100 folders), a key, a collection of 1,000 (lognormal sizes), 0-3 of 100 labels, a format (JPEG 70 %, PNG 20 %,
HEIF 10 %) and an EXIF date in 2015-2024. SQLite is filled by executemany (a benchmark shortcut); the
PostgreSQL copy is made by `Store.copy_into` (what `ruclip-index migrate` runs), and that copy is timed.

    python scripts/bench_pg.py --prepare --n 1000000 --dir /tmp/bench-pg --db postgresql+psycopg:///bench
    python scripts/bench_pg.py --n 1000000 --dir /tmp/bench-pg --db postgresql+psycopg:///bench   # measure
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ruclip_search.filters import SearchFilters  # noqa: E402
from ruclip_search.store import Store  # noqa: E402

DIM = 768
CHUNK = 20_000
SUITE = ["test_store.py", "test_online_store.py", "test_indexer.py", "test_pg.py", "test_online.py",
         "test_search.py", "test_server.py"]  # fmt: skip


def prepare(folder: Path, db: str, n: int) -> None:
    """The SQLite index at `folder` (n photos) and its copy in the empty database `db` (timed)."""
    import shutil

    import sqlalchemy as sa

    shutil.rmtree(folder, ignore_errors=True)
    with Store.create(folder) as store:
        store.set_meta(model="bench", dim=str(DIM))
        root = store.root_id("/photos")
    rng = np.random.default_rng(0)
    w = rng.lognormal(0.0, 1.0, 1000)
    coll_p = w / w.sum()
    start = np.datetime64("2015-01-01T00:00:00").astype("datetime64[s]").astype(np.int64)
    span = 10 * 365 * 86400
    conn = sqlite3.connect(folder / "index.db")
    t0 = time.perf_counter()
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        embs = np.frombuffer(rng.bytes(m * DIM * 2), dtype=np.uint8).reshape(m, DIM * 2)
        colls = rng.choice(1000, size=m, p=coll_p)
        fmts = rng.choice(["JPEG", "PNG", "HEIF"], size=m, p=[0.7, 0.2, 0.1])
        taken = (start + rng.integers(0, span, size=m)).astype("datetime64[s]")
        rows = []
        for j in range(m):
            i = lo + j
            rows.append((
                i + 1, root, f"d{i % 100:03d}/img_{i:07d}.jpg".encode(), 100_000 + i, 1_700_000_000_000_000_000 + i,
                rng.bytes(16), 4000, 3000, str(fmts[j]), str(taken[j]), "Canon", "EOS", 1.7e9, None,
                embs[j].tobytes(), f"k{i}", f"c{colls[j]}",
            ))  # fmt: skip
        conn.executemany("INSERT INTO images (id, root_id, relpath, size, mtime_ns, content_hash, width, height, "
                         "format, taken_at, camera_make, camera_model, indexed_at, error, embedding, key, collection) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)  # fmt: skip
        labels = [(lo + j + 1, f"l{x}") for j in range(m) for x in set(rng.integers(0, 100, size=rng.integers(0, 4)))]
        conn.executemany("INSERT INTO labels (image_id, label) VALUES (?, ?)", labels)
        conn.commit()
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()
    print(f"SQLite filled: {n} photos in {time.perf_counter() - t0:.0f} s", flush=True)
    with Store.create(folder / "pg-faiss", db=db) as dest, dest.engine.begin() as c:  # empty it first
        c.execute(sa.text("DROP TABLE IF EXISTS meta, roots, images, labels, changes CASCADE"))
    with Store.open(folder) as src, Store.create(folder / "pg-faiss", db=db) as dest:
        t0 = time.perf_counter()
        counts = src.copy_into(dest)
        secs = time.perf_counter() - t0
        with dest.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text("ANALYZE"))
    print(f"copy into PostgreSQL (Store.copy_into, as `migrate`): {counts} in {secs:.0f} s "
          f"({counts['images'] / secs:.0f} photos/s)", flush=True)  # fmt: skip


def cases() -> dict[str, SearchFilters]:
    return {
        "under (1 of 100 folders)": SearchFilters.parse(under="/photos/d007"),
        "date range (one month)": SearchFilters.parse(date_from="2019-03-01", date_to="2019-03-31"),
        "formats (PNG)": SearchFilters.parse(formats=["png"]),
        "collections (1 of 1,000)": SearchFilters.parse(collections=["c17"]),
        "labels (1 of 100)": SearchFilters.parse(labels=["l42"]),
        "all five at once": SearchFilters.parse(
            under="/photos/d007", date_from="2016-01-01", formats=["jpeg"], collections=["c3"], labels=["l1", "l2"]
        ),  # fmt: skip
    }


def filter_times(folder: Path, db: str, reps: int) -> dict[str, dict[str, tuple[float, float, int]]]:
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name, store in (("SQLite", Store.open(folder)), ("PostgreSQL", Store.open(folder / "pg-faiss", db=db))):
        out[name] = {}
        with store:
            for case, f in cases().items():
                ids = store.filter_ids(f)  # warm-up (page cache, plans)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    store.filter_ids(f)
                    times.append((time.perf_counter() - t0) * 1000)
                out[name][case] = (statistics.median(times), min(times), len(ids))
    return out


def suite_nodes(backend: str) -> list[str]:
    """Node ids of the suite's tests whose `db` parameter is `backend`."""
    files = [str(ROOT / "tests" / f) for f in SUITE]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *files], cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    nodes = []
    for line in res.stdout.splitlines():
        if "[" in line and line.endswith("]") and backend in line[line.index("[") + 1 : -1].split("-"):
            nodes.append(line)
    return nodes


def suite_time(nodes: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *nodes], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"suite failed:\n{res.stdout[-3000:]}")
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-pg"))
    ap.add_argument("--db", default=os.environ.get("RUCLIP_TEST_PG_URL"), help="an empty PostgreSQL database")
    ap.add_argument("--prepare", action="store_true", help="make the data (not timed for the tables below)")
    ap.add_argument("--runs", type=int, default=2, help="suite runs per backend")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per filter")
    ap.add_argument("--skip-suite", action="store_true")
    args = ap.parse_args()
    if not args.db:
        raise SystemExit("give --db (or RUCLIP_TEST_PG_URL): a PostgreSQL database the benchmark may fill")
    if args.prepare:
        prepare(args.dir, args.db, args.n)
        return
    os.environ.setdefault("RUCLIP_TEST_PG_URL", args.db)
    if not args.skip_suite:
        nodes = {b: suite_nodes(b) for b in ("sqlite", "postgresql")}
        times: dict[str, list[float]] = {b: [] for b in nodes}
        for _ in range(args.runs):
            for b in nodes:
                times[b].append(suite_time(nodes[b]))
        print(f"\nstorage test suite ({len(nodes['sqlite'])} tests per backend, same tests), wall s per run:")
        for b, ts in times.items():
            print(f"  {b:<11} median {statistics.median(ts):6.1f} s   runs {', '.join(f'{t:.1f}' for t in ts)}")
    res = filter_times(args.dir, args.db, args.reps)
    print(f"\nfilter_ids at {args.n:,} photos, ms (median / min of {args.reps}), matching ids:")
    print(f"  {'case':<28} {'SQLite':>18} {'PostgreSQL':>18} {'ids':>8}")
    for case in cases():
        s, p = res["SQLite"][case], res["PostgreSQL"][case]
        assert s[2] == p[2], (case, s[2], p[2])
        print(f"  {case:<28} {s[0]:8.1f} / {s[1]:7.1f} {p[0]:8.1f} / {p[1]:7.1f} {s[2]:>8}")


if __name__ == "__main__":
    main()
