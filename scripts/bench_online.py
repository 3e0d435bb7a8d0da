"""Online-store benchmark (issue 9): add-one -> searchable latency, sustained HTTP writes/s under concurrent
searches, scoped search, compaction time and peak RSS, beside today's cost of any change (a full FAISS rewrite).

    python scripts/bench_online.py --n 1000000 --dir /tmp/bench-online

Data: `--n` synthetic 768-d embeddings (precomputed, so the model's speed does not hide the store's), not
isotropic noise: a Gaussian mixture of ~n/400 clusters of lognormal sizes and varying spreads, in `--collections`
collections of lognormal sizes, each drawing most of its photos from a few "home" clusters (an album is
topical). The store is filled by executemany (a benchmark shortcut, not the API); the FAISS file is written by
indexer.write_faiss (`auto`: IVF above FLAT_BELOW), and that write is timed as the full rewrite.

Model: `serve` must load the index's recorded model, so the index records a 768-d *random-weight* model folder
made here (the tiny fixture's config with embed_dim 768, its bpe.model, random weights): it loads in a second
and no query goes through it (searches are by vector, `GET /similar/{id}`), so it costs nothing measured.

HTTP: a real `python -m ruclip_search.cli serve --write-token T` on 127.0.0.1; 4 reader threads call
`GET /similar/{random id}?k=10`, first alone (--read-seconds), then while 4 writer threads `PUT /photos/{new
key}` JSON embeddings (--write-seconds); writes/s counts acknowledged (200) writes. The clients are threads of
this process on the same machine (keep-alive connections), so they share its cores with the server.
Compaction runs in a fresh process (its own peak RSS) after the server stops.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 768
TOKEN = "bench-write-token"
CHUNK = 50_000


class Data:
    """The synthetic collection's generator: cluster centres, sizes and spreads, collection sizes and homes."""

    def __init__(self, n: int, collections: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.k = max(64, n // 400)
        centres = rng.standard_normal((self.k, DIM), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        w = rng.lognormal(0.0, 1.0, self.k)
        self.cluster_p = w / w.sum()
        self.spread = rng.uniform(0.3, 1.0, self.k).astype(np.float32)  # noise norm relative to the centre's
        w = rng.lognormal(0.0, 1.0, collections)
        self.coll_p = w / w.sum()
        self.homes = rng.choice(self.k, size=(collections, 4), p=self.cluster_p)
        self.collections = collections

    def vectors(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One L2-normalised vector per cluster index."""
        noise = rng.standard_normal((len(clusters), DIM), dtype=np.float32)
        x = self.centres[clusters] + noise * (self.spread[clusters] / DIM**0.5)[:, None]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def photos(self, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(collection index, vector) of `m` photos: 70 % from one of the collection's home clusters."""
        coll = rng.choice(self.collections, size=m, p=self.coll_p)
        home = self.homes[coll, rng.integers(0, 4, m)]
        clusters = np.where(rng.random(m) < 0.7, home, rng.choice(self.k, size=m, p=self.cluster_p))
        return coll, self.vectors(clusters, rng)

    def query(self, rng: np.random.Generator) -> np.ndarray:
        """A query near a random cluster (as a text or image query near a topic)."""
        return self.vectors(rng.choice(self.k, size=1, p=self.cluster_p), rng)[0]


def make_model(folder: Path) -> Path:
    """A random-weight 768-d model folder in the released layout (config.json, bpe.model, pytorch_model.bin)."""
    import torch

    from ruclip_search.model import CLIP, CLIPConfig

    src = ROOT / "tests" / "fixtures" / "tiny-ruclip"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["embed_dim"] = DIM
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "bpe.model", folder / "bpe.model")
    torch.manual_seed(0)
    net = CLIP(CLIPConfig.from_dict(cfg))
    torch.save({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, folder / "pytorch_model.bin")
    return folder.resolve()


def fill(folder: Path, model: Path, data: Data, n: int) -> float:
    """A store of `n` photos (keys k<i>, collections c<j>) and its FAISS file; returns the write_faiss seconds."""
    from ruclip_search.indexer import write_faiss
    from ruclip_search.registry import model_key
    from ruclip_search.store import Store

    store = Store.create(folder)
    with store.transaction() as conn:
        store.set_model(conn, model_key(model), DIM)
    db = sqlite3.connect(folder / "index.db")
    rng = np.random.default_rng(1)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        coll, vecs = data.photos(m, rng)
        vecs = vecs.astype(np.float16)
        rows = [(f"k{start + i}", f"c{coll[i]}", 0, 0, vecs[i].tobytes()) for i in range(m)]
        db.executemany("INSERT INTO images (key, collection, size, mtime_ns, embedding) VALUES (?,?,?,?,?)", rows)
        db.commit()
    db.close()
    t0 = time.perf_counter()
    write_faiss(store)
    seconds = time.perf_counter() - t0
    store.close()
    return seconds


def _reader(folder: str, jobs, results) -> None:
    """Second process: for each (key, vector, t_before_add), poll a search until the key shows up."""
    from ruclip_search.search import Index

    idx = Index.open(folder)
    idx.search(np.ones(DIM, dtype=np.float32), k=1)
    results.put("ready")
    while (job := jobs.get()) is not None:
        key, vec, t0 = job
        deadline = time.time() + 30
        while time.time() < deadline:
            hits = idx.search(np.asarray(vec, dtype=np.float32), k=1)
            if hits and hits[0].key == key:
                break
            time.sleep(0.005)
        results.put(time.time() - t0)
    idx.close()


def in_process(folder: Path, data: Data, adds: int, cross_adds: int, queries: int) -> dict:
    """Add-one -> searchable (this process, a second process) and scoped-search latencies."""
    from ruclip_search.search import Index

    idx = Index.open(folder, writable=True)
    rng = np.random.default_rng(2)
    idx.search(data.query(rng), k=10)  # warm-up
    same = []
    for i in range(adds):
        coll, vecs = data.photos(1, rng)
        t = time.perf_counter()
        idx.add(f"new{i}", embedding=vecs[0], collection=f"c{coll[0]}")
        hits = idx.search(vecs[0], k=1)
        same.append(time.perf_counter() - t)
        assert hits[0].key == f"new{i}", hits[:1]
    ctx = multiprocessing.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_reader, args=(str(folder), jobs, results))
    proc.start()
    assert results.get(timeout=300) == "ready"
    cross = []
    for i in range(cross_adds):
        time.sleep(random.Random(i).uniform(0.0, 0.6))  # decorrelate from the reader's refresh timer
        _, vecs = data.photos(1, rng)
        t0 = time.time()
        idx.add(f"x{i}", embedding=vecs[0])
        jobs.put((f"x{i}", vecs[0].tolist(), t0))
        cross.append(results.get(timeout=60))
    jobs.put(None)
    proc.join(60)
    scoped, sizes = [], []
    for _ in range(queries + 3):
        c = f"c{rng.integers(0, data.collections)}"
        q = data.query(rng)
        t = time.perf_counter()
        hits = idx.search(q, k=20, collections=[c])
        scoped.append(time.perf_counter() - t)
        assert all(h.collection == c for h in hits)
        sizes.append(len(idx.filter_ids(collections=[c])))
    idx.close()
    return {"same": same, "cross": cross, "scoped": scoped[3:], "scoped_sizes": sizes[3:]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_peak(pid: int) -> float:
    """VmHWM of a running process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        resp.read()
        return resp.status


def http_part(
    folder: Path, data: Data, n: int, read_s: float, write_s: float, readers: int, writers: int, paced: float
) -> dict:
    """Serve the index; reader p50 alone, then reader p50 and acknowledged writes/s with writers running flat
    out, then reader p50 with the writers paced to `paced` writes/s in all (the target rate)."""
    port = _free_port()
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 (closed below)
    cmd = [sys.executable, "-m", "ruclip_search.cli", "serve", "--index", str(folder), "--write-token", TOKEN,
           "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + 600
        while True:
            try:
                if Client(port).call("GET", "/health") == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"serve did not start: see {folder / 'serve.log'}")
            time.sleep(0.5)
        stop = threading.Event()
        lat: dict[str, list[float]] = {"alone": [], "writes": [], "paced": []}
        put_lat: list[float] = []
        paced_acks: list[float] = []
        pace = [0.0]  # seconds between one writer's PUTs (0: flat out)
        errors: list[str] = []
        phase = ["alone"]

        def read(seed: int) -> None:
            rng, client = random.Random(seed), Client(port)
            for _ in range(1_000_000):  # bounded; ends on `stop`
                if stop.is_set():
                    return
                t = time.perf_counter()
                status = client.call("GET", f"/similar/{rng.randint(1, n)}?k=10")
                dt, which = time.perf_counter() - t, phase[0]
                if status != 200:
                    errors.append(f"GET /similar {status}")
                elif which != "settle":
                    lat[which].append(dt)

        def write(w: int) -> None:
            rng = np.random.default_rng(100 + w)
            colls, vecs = data.photos(256, rng)
            bodies = [json.dumps({"embedding": np.round(v, 6).tolist(), "collection": f"c{c}"}).encode()
                      for c, v in zip(colls, vecs, strict=True)]  # fmt: skip
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            client = Client(port)
            due = time.perf_counter()
            for i in range(1_000_000):  # bounded; ends on `stop`
                if stop.is_set():
                    return
                if pace[0]:
                    due = max(due + pace[0], time.perf_counter() - pace[0])  # no catching up after a stall
                    time.sleep(max(0.0, due - time.perf_counter()))
                t = time.perf_counter()
                status = client.call("PUT", f"/photos/w{w}-{i}", bodies[i % len(bodies)], headers)
                if status != 200:
                    errors.append(f"PUT /photos {status}")
                elif phase[0] == "paced":
                    paced_acks.append(time.perf_counter())
                else:
                    put_lat.append(time.perf_counter() - t)

        for _ in range(20):  # warm-up: first requests of each kind
            Client(port).call("GET", f"/similar/{random.randint(1, n)}?k=10")
        threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
        for t in threads:
            t.start()
        time.sleep(read_s)
        phase[0] = "settle"
        wthreads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in wthreads:
            t.start()
        time.sleep(1.0)
        put_lat.clear()
        phase[0] = "writes"
        t0 = time.perf_counter()
        time.sleep(write_s)
        acked = len(put_lat)
        elapsed = time.perf_counter() - t0
        pace[0] = writers / paced
        phase[0] = "settle"
        time.sleep(1.0)
        phase[0] = "paced"
        t1 = time.perf_counter()
        time.sleep(write_s)
        paced_rate = len(paced_acks) / (time.perf_counter() - t1)
        stop.set()
        for t in threads + wthreads:
            t.join(120)
        rss = _rss_peak(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return {
        **lat,
        "writes_per_s": acked / elapsed,
        "put": put_lat[:acked],
        "errors": errors,
        "server_rss": rss,
        "paced_per_s": paced_rate,
    }


COMPACT = """
import json, resource, sys, time
from ruclip_search.search import Index
idx = Index.open(sys.argv[1], writable=True)
t = time.perf_counter()
info = idx.compact()
seconds = time.perf_counter() - t
idx.close()
print(json.dumps({"seconds": seconds, "folded": info["folded"], "type": info["type"], "params": info["params"],
                  "recall": info["recall_at_10"], "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--collections", type=int, default=1000)
    ap.add_argument("--adds", type=int, default=200, help="add-one -> searchable rounds in this process")
    ap.add_argument("--cross-adds", type=int, default=20, help="rounds seen from a second process")
    ap.add_argument("--queries", type=int, default=50, help="scoped searches")
    ap.add_argument("--read-seconds", type=float, default=10.0)
    ap.add_argument("--write-seconds", type=float, default=20.0)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--paced", type=float, default=200.0, help="total writes/s of the paced phase (the target)")
    ap.add_argument("--dir", default="/tmp/bench-online")
    ap.add_argument("--prepare", action="store_true", help="only fill DIR (untimed work; run it apart)")
    ap.add_argument("--reuse", action="store_true", help="measure on DIR as --prepare left it")
    ap.add_argument("--no-compact", action="store_true", help="skip the compaction measure (minutes at 1M)")
    args = ap.parse_args()
    folder = Path(args.dir)
    t0 = time.perf_counter()
    data = Data(args.n, args.collections)
    stamp = folder / "bench-fill.json"
    if args.reuse:
        rewrite = json.loads(stamp.read_text())["write_faiss"]  # (the compaction at the end folded earlier writes)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        model = make_model(folder.with_name(folder.name + "-model"))
        rewrite = fill(folder, model, data, args.n)
        stamp.write_text(json.dumps({"write_faiss": rewrite, "n": args.n}))
        print(f"filled {args.n} in {time.perf_counter() - t0:.0f} s (write_faiss {rewrite:.1f} s)", flush=True)
    if args.prepare:
        return
    t = time.perf_counter()
    local = in_process(folder, data, args.adds, args.cross_adds, args.queries)
    print(f"in-process part {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    web = http_part(folder, data, args.n, args.read_seconds, args.write_seconds, args.readers, args.writers, args.paced)
    print(f"HTTP part {time.perf_counter() - t:.0f} s, {len(web['errors'])} errors {sorted(set(web['errors']))}")
    comp = {"seconds": float("nan"), "folded": 0, "type": "-", "params": "-", "recall": "-", "rss": float("nan")}
    if not args.no_compact:
        out = subprocess.run([sys.executable, "-c", COMPACT, str(folder)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(out.stderr)
        comp = json.loads(out.stdout.strip().splitlines()[-1])

    def ms(xs: list[float], p: float) -> float:
        return 1000 * float(np.percentile(xs, p)) if xs else float("nan")

    alone, busy, paced = ms(web["alone"], 50), ms(web["writes"], 50), ms(web["paced"], 50)
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    rows = [
        ("N / FAISS type (compacted)", f"{args.n} / {comp['type']} {comp['params']} recall@10 {comp['recall']}", "",
         ""),
        ("add-one -> searchable, same process p50/p99", f"{ms(local['same'], 50):.1f} / {ms(local['same'], 99):.1f} ms",
         "<= 1 s", ok(ms(local["same"], 99) <= 1000)),
        ("add-one -> searchable, 2nd process p50/p99", f"{ms(local['cross'], 50):.0f} / {ms(local['cross'], 99):.0f} ms",
         "<= 1 s", ok(ms(local["cross"], 99) <= 1000)),
        ("HTTP PUT (searchable on 200) p50/p99", f"{ms(web['put'], 50):.1f} / {ms(web['put'], 99):.1f} ms", "<= 1 s",
         ok(ms(web["put"], 99) <= 1000)),
        (f"HTTP writes/s ({args.writers} writers + {args.readers} searchers)", f"{web['writes_per_s']:.0f} /s",
         ">= 200 /s", ok(web["writes_per_s"] >= 200)),
        (f"HTTP /similar p50, {args.readers} clients, no writes", f"{alone:.1f} ms", "", ""),
        ("HTTP /similar p50 while writing flat out", f"{busy:.1f} ms ({100 * (busy / alone - 1):+.0f} %)", "", ""),
        (f"HTTP /similar p50 while writing {web['paced_per_s']:.0f} /s (paced)",
         f"{paced:.1f} ms ({100 * (paced / alone - 1):+.0f} %)", "<= +25 %",
         ok(paced <= 1.25 * alone and web["paced_per_s"] >= 0.95 * args.paced)),
        (f"scoped search p50 (1 of {args.collections}, median "
         f"{int(np.median(local['scoped_sizes']))} photos)", f"{ms(local['scoped'], 50):.1f} ms", "<= 20 ms",
         ok(ms(local["scoped"], 50) <= 20)),
        (f"compaction (folds {comp['folded']} changes)", f"{comp['seconds']:.1f} s", "", ""),
        ("peak RSS: compaction process / server", f"{comp['rss']:.0f} / {web['server_rss']:.0f} MiB", "", ""),
        ("today: full FAISS rewrite (write_faiss) per change", f"{rewrite:.1f} s", "", ""),
    ]  # fmt: skip
    print(f"\n{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end")
    print(f"{'measure':56s} {'ours':44s} {'target':10s}")
    for name, ours, target, verdict in rows:
        print(f"{name:56s} {ours:44s} {target:10s} {verdict}")
    print(f"(today, without the online store, every change costs the full rewrite: {rewrite:.1f} s to visible, "
          f"~{1 / rewrite:.2f} writes/s if each must be visible)")  # fmt: skip


if __name__ == "__main__":
    main()
