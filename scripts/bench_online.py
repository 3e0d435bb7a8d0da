"""Online-store benchmark: add-one -> searchable latency (same process and a second process), scoped search,
compaction, next to the full FAISS rewrite. Synthetic 768-d embeddings stored as float16; no model weights.

    python scripts/bench_online.py --n 1000000 --dir /tmp/bench-online

The store is filled by executemany (a benchmark shortcut, not the API) and the FAISS file written by
indexer.write_faiss (IVF above FLAT_BELOW). Prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

DIM = 768


class StubText:
    """Stands in for a text tower: searches here go by vector, so only `dim` and `name` are read."""

    def __init__(self, name: str) -> None:
        self.name, self.dim, self.parts = name, DIM, ("text",)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(folder: Path, n: int, collections: int) -> float:
    """A store of `n` photos (keys k<i>, collection c<i % collections>) and its FAISS file; returns rewrite s."""
    from ruclip_search.indexer import write_faiss
    from ruclip_search.store import Store

    shutil.rmtree(folder, ignore_errors=True)
    store = Store.create(folder)
    with store.transaction() as conn:
        store.set_model(conn, "bench-stub", DIM)
    db = sqlite3.connect(folder / "index.db")
    rng = np.random.default_rng(0)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        vecs = unit(rng, m).astype(np.float16)
        rows = [(f"k{start + i}", f"c{(start + i) % collections}", 0, 0, vecs[i].tobytes()) for i in range(m)]
        db.executemany("INSERT INTO images (key, collection, size, mtime_ns, embedding) VALUES (?,?,?,?,?)", rows)
        db.commit()
    db.close()
    t0 = time.perf_counter()
    write_faiss(store)
    seconds = time.perf_counter() - t0
    store.close()
    return seconds


def _reader(folder: str, key: str, ready, done) -> None:
    """Second process: poll a search by the added vector until `key` shows up; report the latency."""
    from ruclip_search.search import Index

    idx = Index.open(folder, model=StubText("bench-stub"))
    vec = np.random.default_rng(99).normal(size=DIM).astype(np.float32)
    vec /= np.linalg.norm(vec)
    idx.search(vec, k=1)
    ready.set()
    t_added = done.get()
    while True:
        hits = idx.search(vec, k=1)
        if hits and hits[0].key == key:
            done.put(time.time() - t_added)
            return
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--collections", type=int, default=1000)
    ap.add_argument("--adds", type=int, default=50)
    ap.add_argument("--dir", default="/tmp/bench-online")
    args = ap.parse_args()
    from ruclip_search.search import Index

    folder = Path(args.dir)
    t0 = time.perf_counter()
    rewrite = fill(folder, args.n, args.collections)
    print(f"filled {args.n} in {time.perf_counter() - t0:.1f}s")
    idx = Index.open(folder, writable=True, model=StubText("bench-stub"))
    rng = np.random.default_rng(1)
    lat = []
    for i in range(args.adds):
        vec = unit(rng, 1)[0]
        t = time.perf_counter()
        idx.add(f"new{i}", embedding=vec, collection="c7")
        hits = idx.search(vec, k=1)
        lat.append(time.perf_counter() - t)
        assert hits[0].key == f"new{i}"
    cross = []
    for i in range(5):
        ctx = multiprocessing.get_context("spawn")
        ready, done = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_reader, args=(str(folder), f"x{i}", ready, done))
        proc.start()
        ready.wait(120)
        vec = np.random.default_rng(99).normal(size=DIM).astype(np.float32)
        idx.add(f"x{i}", embedding=vec)
        done.put(time.time())
        time.sleep(0.05)
        cross.append(done.get(timeout=30))
        proc.join()
        idx.remove(f"x{i}")
    scoped = []
    for _ in range(30):
        q = unit(rng, 1)[0]
        t = time.perf_counter()
        hits = idx.search(q, k=20, collections=["c7"])
        scoped.append(time.perf_counter() - t)
        assert all(h.collection == "c7" for h in hits)
    t = time.perf_counter()
    info = idx.compact()
    compact = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    idx.close()
    ms = lambda xs, p: 1000 * float(np.percentile(xs, p))  # noqa: E731
    print(f"{'measure':46s} value")
    print(f"{'N / FAISS type':46s} {args.n} / {info['type']}")
    print(f"{'add-one -> searchable, same process p50/p99':46s} {ms(lat, 50):.1f} / {ms(lat, 99):.1f} ms")
    print(f"{'add-one -> searchable, second process p50/max':46s} {ms(cross, 50):.0f} / {1000 * max(cross):.0f} ms")
    print(f"{'scoped search (1 of ' + str(args.collections) + ' collections) p50':46s} {ms(scoped, 50):.1f} ms")
    print(f"{'compaction (write_faiss + reload)':46s} {compact:.1f} s")
    print(f"{'full FAISS rewrite (write_faiss)':46s} {rewrite:.1f} s")
    print(f"{'peak RSS of this process':46s} {rss:.0f} MiB")


if __name__ == "__main__":
    main()
