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

HTTP: a real `python -m ruclip_search.cli serve --write-token T --no-access-log` on 127.0.0.1. Clients run on the
same 2 cores (one keep-alive HTTP/1.1 connection each, by hand (`Client`), request bodies encoded before the clock starts; the table
gives their CPU beside the server's): --readers searchers `GET /similar/{random id}?k=10` (threads of this
process), --writers writers (threads of a process of their own) `PUT /photos/{new key}` with JSON embeddings (each PUT adds a photo with a vector of its own,
never one sent before). Each writer's connection carries only PUTs, as a photo app's upload workers would: the
server hands it to the index's writer process on its first PUT (server/handoff.py). Five phases, 1 s of settling before each:
  FLAT OUT 1. searchers flat out, no writes (--read-seconds): their rate is the machine's search capacity;
           2. with writers flat out (--write-seconds): writes/s counts acknowledged (200) writes;
           3. with writers paced to --paced writes/s in all.
  PACED    4. searchers paced (open loop, Poisson arrivals, no catching up after a stall; paced writers too) to
              --search-load (0.5) of the capacity (or --search-rate searches/s, the same for runs compared)
              measured in 1, no writes: the machine about half busy, as a served index is between peaks;
           5. the same searchers with writers paced to --paced writes/s.
           4 and 5 alternate --rounds times (3), pooled: a drift of the machine during the run (the page cache,
           another tenant) then weighs on both alike; each round's own ratio is printed too.
The target "search p50 within +25 % under writes" is judged on 5 vs 4 (writers reaching >= 95 % of --paced). With
every searcher flat out on 2 cores there is no idle CPU, so any write's CPU shows up as search latency: phases 2-3
are reported too, labelled FLAT OUT, but are not the target's rule.
With --reuse, the changes earlier runs left are compacted first (untimed: a server compacts by itself past
SEGMENT_MAX, which must not happen mid-run), and the photos a run's PUTs added are deleted after it, so that
repeated runs measure the same --n photos. Compaction runs in a fresh process (its own peak RSS) after the server stops. Server CPU counts its child
processes (the writer process of `serve --write-token`). Experiments: `--external-writer NICE` writes by
`Index.add` from a separate process at that niceness instead of HTTP PUTs (what the server pays to only follow
the change log), `--server-read-only` serves without a write token.
"""

from __future__ import annotations

import argparse
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
    jobs_ = [(f"c{rng.integers(0, data.collections)}", data.query(rng)) for _ in range(queries)]
    sizes = [len(idx.filter_ids(collections=[c])) for c, _ in jobs_]
    idx.search(jobs_[0][1], k=20, collections=[jobs_[0][0]])  # warm-up (builds the IVF-Flat id lookup once)
    passes: dict[str, list[float]] = {"cold": [], "warm": []}
    for name in ("cold", "warm"):  # cold: this index's files dropped from the page cache before each query
        for c, q in jobs_:
            if name == "cold":
                evict(folder)
            t = time.perf_counter()
            hits = idx.search(q, k=20, collections=[c])
            passes[name].append(time.perf_counter() - t)
            assert all(h.collection == c for h in hits)
    idx.close()
    return {
        "same": same,
        "cross": cross,
        "scoped": passes["warm"],
        "scoped_cold": passes["cold"],
        "scoped_sizes": sizes,
    }


def evict(folder: Path) -> None:
    """Drop this index's files (SQLite database, FAISS file) from the page cache: the next reads go to disk.
    Only these files (POSIX_FADV_DONTNEED), nothing else on the machine."""
    for path in folder.iterdir():
        if path.suffix in (".db", ".index") and path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def settle(folder: Path) -> None:
    """Untimed, before measuring: fold what earlier runs left in the segment into the FAISS file, so that every
    run starts from a compacted index (a server compacts by itself past SEGMENT_MAX, which a run must not
    trigger)."""
    from ruclip_search.search import Index

    with Index.open(folder, writable=True) as idx:
        state = idx._live_state()
        if state.segment is not None and state.segment.size:
            t = time.perf_counter()
            idx.compact()
            print(f"compacted {state.segment.size} earlier changes in {time.perf_counter() - t:.0f} s (untimed)")


def forget(folder: Path, keys: list[str]) -> None:
    """Untimed, after measuring: delete the photos this run's PUTs added, so that repeated runs keep the
    collection at --n photos (the next run's `settle` folds the deletions)."""
    from ruclip_search.search import Index

    with Index.open(folder, writable=True) as idx:
        for start in range(0, len(keys), 5000):
            idx.remove_many(keys[start : start + 5000])


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


class _Closed(Exception):
    """The server closed the connection (an idle keep-alive one: send again on a new one)."""


class Client:
    """One keep-alive HTTP/1.1 connection to the server, by hand: the clients share the server's 2 cores, and
    http.client's Python (header parsing through the email package, a file object per response) cost ~0.3 ms
    of CPU per request, as much as the server's own work on a write. This sends prepared bytes and reads the
    status line and Content-Length (every answer of this server's JSON routes has one)."""

    def __init__(self, port: int) -> None:
        self.port, self.sock, self.buf = port, None, b""

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        if body is not None or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body or b'')}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        for attempt in (0, 1):  # the server closes a connection idle past its keep-alive: reconnect, send again
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.buf = b""
                self.sock.sendall(request)
                return self._answer()
            except (BrokenPipeError, ConnectionResetError, _Closed):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _recv(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise _Closed
        self.buf += chunk

    def _answer(self) -> int:
        """Read one response; its status."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        head = self.buf[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.1 ") or at < 0:
            raise RuntimeError(f"unexpected response head {head[:200]!r}")
        length = int(head[at + 17 : head.find(b"\r\n", at + 2) if head.find(b"\r\n", at + 2) > 0 else None])
        while len(self.buf) < end + 4 + length:
            self._recv()
        self.buf = self.buf[end + 4 + length :]
        if b"\r\nconnection: close" in head:
            self.close()
        return int(head[9:12])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""


def _cpu(pid: int, children: bool = True) -> float:
    """User + system CPU seconds so far of a process and its running child processes (the server's writer)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if not children:
        return total
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                total += _cpu(int(child))
            except OSError:  # exited meanwhile
                pass
    return total


def http_part(
    folder: Path, data: Data, n: int, read_s: float, write_s: float, readers: int, writers: int, paced: float,
    search_load: float, external: int | None = None, read_only: bool = False, rounds: int = 3,
    search_rate: float | None = None,
) -> dict:  # fmt: skip
    """Serve the index and run five phases (see the module docstring): searchers flat out alone, with writers
    flat out, with writers paced to `paced`/s; then searchers paced to `search_load` of the flat-out search
    rate, alone and with writers paced to `paced`/s, alternately `rounds` times (so that a drift of the machine
    during the run weighs on both alike). Per phase: search latencies, acknowledged writes, server and client
    (this process) CPU seconds; `written`: how many PUTs each writer sent (keys w<run>-<writer>-<i>)."""
    port = _free_port()
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 (closed below)
    cmd = [sys.executable, "-m", "ruclip_search.cli", "serve", "--index", str(folder), "--write-token", TOKEN,
           "--port", str(port), "--no-access-log"]  # fmt: skip
    if read_only:  # EXPERIMENT (with --external-writer): the server only follows the change log
        del cmd[6:8]
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
        phase = ["settle"]
        lat: dict[str, list[float]] = {}
        put_lat: dict[str, list[float]] = {}
        search_pace = [0.0]  # seconds between one searcher's requests (0: flat out)
        errors: list[str] = []

        def paced_wait(due: float, pace: float, rng: random.Random) -> float:
            """Sleep until the next arrival of an open-loop Poisson schedule of mean gap `pace` (no catching up
            after a stall). Poisson, as independent users arrive: clients on a fixed period all started together
            sent their requests in lockstep bursts, and how the searchers' and writers' periods beat against each
            other moved the p50 more than the writes did (one run's rounds: +16 % to +57 %)."""
            due = max(due + rng.expovariate(1.0 / pace), time.perf_counter() - pace)
            time.sleep(max(0.0, due - time.perf_counter()))
            return due

        def read(seed: int) -> None:
            rng, client = random.Random(seed), Client(port)
            due = time.perf_counter()
            while not stop.is_set():
                if search_pace[0]:
                    due = paced_wait(due, search_pace[0], rng)
                t = time.perf_counter()
                status = client.call("GET", f"/similar/{rng.randint(1, n)}?k=10")
                dt, which = time.perf_counter() - t, phase[0]
                if status != 200:
                    errors.append(f"GET /similar {status}")
                elif which != "settle":
                    lat.setdefault(which, []).append(dt)

        # The writers run in a process of their own (HTTP_WRITERS), as a photo app's backends would: as threads
        # of this process their client work held this process's GIL and delayed the searchers' own clocks.
        # Every PUT sends a photo of its own (a vector never sent before), encoded before the clock starts.
        per = int(150 * (write_s + 1) + paced / writers * (write_s + 1) * (1 + rounds)) + 100 if writers else 0
        run = f"{os.getpid()}x{int(time.time())}"  # new keys every run: each PUT adds a photo
        ext = None
        if writers and external is None:
            ext = subprocess.Popen([sys.executable, "-c", HTTP_WRITERS, str(port), str(n), str(writers), str(per), run,
                                    str(ROOT / "scripts")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, cwd=ROOT)  # fmt: skip
            assert ext.stdout.readline().strip() == "ready"
        if external is not None:  # EXPERIMENT: writes from a separate process straight into the store
            ext = subprocess.Popen([sys.executable, "-c", EXTERNAL_WRITER, str(folder), str(n), str(external),
                                    str(ROOT / "scripts")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, cwd=ROOT)  # fmt: skip
            assert ext.stdout.readline().strip() == "ready"
        for _ in range(20):  # warm-up: first requests of each kind
            Client(port).call("GET", f"/similar/{random.randint(1, n)}?k=10")
        threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
        for t in threads:
            t.start()
        cpu: dict[str, tuple[float, ...]] = {}  # phase -> (seconds, server CPU s, client CPU s, server alone)

        ext_cpu: dict[str, float] = {}

        def tell(line: str) -> None:
            if ext is not None:
                ext.stdin.write(line + "\n")
                ext.stdin.flush()

        def run_phase(name: str, seconds: float, searchers: float, writes: float | None) -> None:
            search_pace[0] = searchers
            tell("pace " + ("none" if writes is None else str(writes)))
            tell("phase settle")
            phase[0] = "settle"
            time.sleep(1.0)
            c0, m0, t0 = _cpu(server.pid), time.process_time(), time.perf_counter()
            own0 = _cpu(server.pid, children=False)
            e0 = _cpu(ext.pid) if ext is not None else 0.0
            phase[0] = name
            tell(f"phase {name}")
            time.sleep(seconds)
            phase[0] = "settle"
            tell("phase settle")
            clients = time.process_time() - m0
            if ext is not None:
                ext_cpu[name] = _cpu(ext.pid) - e0
                clients += ext_cpu[name] if external is None else 0.0  # (the HTTP writers are clients)
            cpu[name] = (time.perf_counter() - t0, _cpu(server.pid) - c0, clients,
                         _cpu(server.pid, children=False) - own0)  # fmt: skip

        run_phase("flat_alone", read_s, 0.0, None)
        max_qps = len(lat["flat_alone"]) / cpu["flat_alone"][0]
        nw = writers
        run_phase("flat_writes", write_s, 0.0, 0.0)
        run_phase("flat_paced", write_s, 0.0, nw / paced)
        search_qps = search_rate if search_rate else search_load * max_qps
        pace = readers / search_qps
        for r in range(rounds):  # alternately, so that a drift of the machine weighs on both alike
            run_phase(f"paced_alone#{r}", read_s, pace, None)
            run_phase(f"paced_writes#{r}", write_s, pace, nw / paced)
        stop.set()
        for t in threads:
            t.join(120)
        written: list[int] = []
        if ext is not None:
            tell("stop")
            got = json.loads(ext.stdout.readline())
            put_lat.update(got["lat"])
            errors += got["errors"]
            written = got["written"]
            ext.wait(60)
            print("writers' process CPU s per phase:", {k: round(v, 2) for k, v in ext_cpu.items()})
        rss = _rss_peak(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    ratios = [float(np.median(lat.get(f"paced_writes#{r}", [np.nan])) / np.median(lat.get(f"paced_alone#{r}", [np.nan])))
              for r in range(rounds)]  # fmt: skip
    round_p50 = [(1000 * float(np.median(lat.get(f"paced_alone#{r}", [np.nan]))),
                  1000 * float(np.median(lat.get(f"paced_writes#{r}", [np.nan])))) for r in range(rounds)]  # fmt: skip
    for kind in ("paced_alone", "paced_writes"):  # the rounds pooled
        names = [f"{kind}#{r}" for r in range(rounds)]
        lat[kind] = [x for n in names for x in lat.pop(n, [])]
        put_lat[kind] = [x for n in names for x in put_lat.pop(n, [])]
        parts = [cpu.pop(n) for n in names]
        cpu[kind] = tuple(sum(p[i] for p in parts) for i in range(4))
    reused = sum(max(0, n - per) for n in written)
    return {"lat": lat, "put": put_lat, "cpu": cpu, "max_qps": max_qps, "search_qps": search_qps,
            "errors": errors, "server_rss": rss, "ratios": ratios, "reused": reused,
            "round_p50": round_p50,
            "keys": [f"w{run}-{w}-{i}" for w, count in enumerate(written) for i in range(count)]}  # fmt: skip


def follow_commands(ctl: dict, threads: list[threading.Thread]) -> None:
    """In a writers' process (HTTP_WRITERS, EXTERNAL_WRITER): start the writer threads, say "ready", then follow
    the commands on stdin (`pace S|none`, `phase NAME`, `stop`) in `ctl`, and join the threads on `stop`."""
    for t in threads:
        t.start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "pace":
            ctl["pace"] = None if arg == "none" else float(arg)
        elif cmd == "phase":
            ctl["phase"] = arg
        elif cmd == "stop":
            break
    ctl["stop"] = True
    for t in threads:
        t.join()


EXTERNAL_WRITER = """
import json, os, sys, threading, time
import numpy as np
sys.path.insert(0, sys.argv[4])
from bench_online import Data, follow_commands
from ruclip_search.search import Index
os.nice(int(sys.argv[3]))
idx = Index.open(sys.argv[1], writable=True)
data = Data(int(sys.argv[2]), 1000)
ctl = {"pace": None, "phase": "settle", "stop": False}
lat = {}
def write(w):
    rng = np.random.default_rng(100 + w)
    colls, vecs = data.photos(256, rng)
    vecs = [np.round(v, 6) for v in vecs]
    due, i = time.perf_counter(), 0
    while not ctl["stop"]:
        pace = ctl["pace"]
        if pace is None:
            time.sleep(0.01); due = time.perf_counter(); continue
        if pace:
            due = max(due + pace, time.perf_counter() - pace)
            time.sleep(max(0.0, due - time.perf_counter()))
        t = time.perf_counter()
        idx.add(f"e{os.getpid()}-{w}-{i}", embedding=vecs[i % 256], collection=f"c{colls[i % 256]}")
        dt, which = time.perf_counter() - t, ctl["phase"]
        i += 1
        if which != "settle":
            lat.setdefault(which, []).append(dt)
threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
follow_commands(ctl, threads)
print(json.dumps({"lat": lat, "errors": [], "written": []}), flush=True)
"""


HTTP_WRITERS = """
import json, os, random, sys, threading, time
import numpy as np
port, n, writers, per, run = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, sys.argv[6])
from bench_online import TOKEN, Client, Data, follow_commands
data = Data(n, 1000)
bodies = []
for w in range(writers):
    colls, vecs = data.photos(per, np.random.default_rng([int(time.time()), os.getpid(), w]))
    bodies.append([json.dumps({"embedding": np.round(v, 6).tolist(), "collection": f"c{c}"}).encode()
                   for c, v in zip(colls, vecs)])
ctl = {"pace": None, "phase": "settle", "stop": False}
lat, errors, written = {}, [], [0] * writers
def write(w):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    client, rng = Client(port), random.Random(1000 + w)
    due, i = time.perf_counter(), 0
    while not ctl["stop"]:
        pace = ctl["pace"]
        if pace is None:
            time.sleep(0.01); due = time.perf_counter(); continue
        if pace:  # open-loop Poisson arrivals, no catching up after a stall (as the searchers)
            due = max(due + rng.expovariate(1.0 / pace), time.perf_counter() - pace)
            time.sleep(max(0.0, due - time.perf_counter()))
        t = time.perf_counter()
        status = client.call("PUT", f"/photos/w{run}-{w}-{i}", bodies[w][i % per], headers)
        dt, which = time.perf_counter() - t, ctl["phase"]
        i += 1
        written[w] = i
        if status != 200:
            errors.append(f"PUT /photos {status}")
        elif which != "settle":
            lat.setdefault(which, []).append(dt)
threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
follow_commands(ctl, threads)
print(json.dumps({"lat": lat, "errors": errors, "written": written}), flush=True)
"""


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
    ap.add_argument("--paced", type=float, default=200.0, help="total writes/s of the paced phases (the target)")
    ap.add_argument("--rounds", type=int, default=3, help="paced phases 4 and 5 alternate this many times")
    ap.add_argument(
        "--search-rate",
        type=float,
        default=None,
        help="paced searches/s in all (instead of --search-load): the same load for runs compared",
    )
    ap.add_argument("--search-load", type=float, default=0.5,
                    help="paced searchers send this fraction of the flat-out search rate (0.5: the machine about "
                    "half busy without writes)")  # fmt: skip
    ap.add_argument(
        "--external-writer",
        type=int,
        default=None,
        metavar="NICE",
        help="EXPERIMENT: writes by Index.add from a separate process at this nice level, not HTTP",
    )
    ap.add_argument("--server-read-only", action="store_true", help="EXPERIMENT: serve without a write token")
    ap.add_argument("--dir", default="/tmp/bench-online")
    ap.add_argument("--prepare", action="store_true", help="only fill DIR (untimed work; run it apart)")
    ap.add_argument("--reuse", action="store_true", help="measure on DIR as --prepare left it")
    ap.add_argument("--no-compact", action="store_true", help="skip the compaction measure (minutes at 1M)")
    ap.add_argument("--http-only", action="store_true", help="skip the in-process part (add-one, scoped search)")
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
    settle(folder)
    t = time.perf_counter()
    # the HTTP part first: the in-process part's cold scoped searches drop the index files from the page cache
    web = http_part(folder, data, args.n, args.read_seconds, args.write_seconds, args.readers, args.writers, args.paced,
                    args.search_load, args.external_writer, args.server_read_only, args.rounds,
                    args.search_rate)  # fmt: skip
    print(f"HTTP part {time.perf_counter() - t:.0f} s, {len(web['errors'])} errors {sorted(set(web['errors']))}; "
          f"{web['reused']} PUTs reused a vector", flush=True)  # fmt: skip
    print("paced search p50 per round, no writes -> writes (ms):",
          ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in web["round_p50"]), flush=True)  # fmt: skip
    forget(folder, web["keys"])
    t = time.perf_counter()
    nothing = {"same": [], "cross": [], "scoped": [], "scoped_cold": [], "scoped_sizes": [0]}
    local = nothing if args.http_only else in_process(folder, data, args.adds, args.cross_adds, args.queries)
    print(f"in-process part {time.perf_counter() - t:.0f} s", flush=True)
    comp = {"seconds": float("nan"), "folded": 0, "type": "-", "params": "-", "recall": "-", "rss": float("nan")}
    if not args.no_compact:
        out = subprocess.run([sys.executable, "-c", COMPACT, str(folder)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(out.stderr)
        comp = json.loads(out.stdout.strip().splitlines()[-1])

    def ms(xs: list[float], p: float) -> float:
        return 1000 * float(np.percentile(xs, p)) if xs else float("nan")

    lat, put, cpu = web["lat"], web["put"], web["cpu"]

    def p50(name: str) -> float:
        return ms(lat.get(name, []), 50)

    def rate(name: str) -> float:
        return len(put.get(name, [])) / cpu[name][0]

    def cpu_per_write(name: str, base: str) -> str:
        """CPU per acknowledged write: what the phase cost above `base` (same searches, no writes), per write."""
        acked = len(put.get(name, []))
        if not acked:
            return "-"
        extra = [cpu[name][i] / cpu[name][0] - cpu[base][i] / cpu[base][0] for i in (1, 2, 3)]
        return (f"{1000 * extra[0] / rate(name):.2f} (its own process {1000 * extra[2] / rate(name):.2f}) / "
                f"{1000 * extra[1] / rate(name):.2f} ms")  # fmt: skip

    def busy(name: str) -> str:
        return f"server {cpu[name][1] / cpu[name][0]:.2f} + clients {cpu[name][2] / cpu[name][0]:.2f} cores"

    def vs(name: str, base: str) -> str:
        return f"{p50(name):.1f} ms ({100 * (p50(name) / p50(base) - 1):+.0f} %)"

    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    flat_put = put.get("flat_writes", [])
    paced_ok = p50("paced_writes") <= 1.25 * p50("paced_alone") and rate("paced_writes") >= 0.95 * args.paced
    rows = [
        ("N / FAISS type (compacted)", f"{args.n} / {comp['type']} {comp['params']} recall@10 {comp['recall']}", "",
         ""),
        ("add-one -> searchable, same process p50/p99", f"{ms(local['same'], 50):.1f} / {ms(local['same'], 99):.1f} ms",
         "<= 1 s", ok(ms(local["same"], 99) <= 1000)),
        ("add-one -> searchable, 2nd process p50/p99", f"{ms(local['cross'], 50):.0f} / {ms(local['cross'], 99):.0f} ms",
         "<= 1 s", ok(ms(local["cross"], 99) <= 1000)),
        ("HTTP PUT (searchable on 200) p50/p99, flat out", f"{ms(flat_put, 50):.1f} / {ms(flat_put, 99):.1f} ms",
         "<= 1 s", ok(ms(flat_put, 99) <= 1000)),
        (f"HTTP writes/s, {args.writers} writers + {args.readers} searchers, all flat out",
         f"{rate('flat_writes'):.0f} /s", ">= 200 /s", ok(rate("flat_writes") >= 200)),
        (f"FLAT OUT: /similar p50, {args.readers} searchers, no writes",
         f"{p50('flat_alone'):.1f} ms ({web['max_qps']:.0f} searches/s; {busy('flat_alone')})", "", ""),
        ("FLAT OUT: /similar p50, writers flat out", vs("flat_writes", "flat_alone"), "", ""),
        (f"FLAT OUT: /similar p50, writers paced ({rate('flat_paced'):.0f} /s reached)",
         vs("flat_paced", "flat_alone"), "", ""),
        (f"PACED {web['search_qps']:.0f} searches/s: /similar p50, no writes",
         f"{p50('paced_alone'):.1f} ms ({busy('paced_alone')})", "", ""),
        (f"PACED: /similar p50, writers paced ({rate('paced_writes'):.0f} /s reached)",
         f"{vs('paced_writes', 'paced_alone')} ({busy('paced_writes')})", "<= +25 %", ok(paced_ok)),
        (f"  the same, per round ({args.rounds} rounds alternating 4 and 5)",
         " ".join(f"{100 * (x - 1):+.0f} %" for x in web["ratios"]), "", ""),
        ("  CPU per write (phase 5 minus 4, per write): server / clients", cpu_per_write("paced_writes", "paced_alone"),
         "<= 2 ms", ok(cpu_per_write("paced_writes", "paced_alone") != "-" and 1000 * (
             cpu["paced_writes"][1] / cpu["paced_writes"][0] - cpu["paced_alone"][1] / cpu["paced_alone"][0]
         ) / rate("paced_writes") <= 2)),
        (f"scoped search p50 (1 of {args.collections}, median "
         f"{int(np.median(local['scoped_sizes']))} photos), page cache warm", f"{ms(local['scoped'], 50):.1f} ms",
         "<= 20 ms", ok(ms(local["scoped"], 50) <= 20)),
        ("scoped search p50, index files evicted before each query", f"{ms(local['scoped_cold'], 50):.1f} ms",
         "<= 20 ms", ok(ms(local["scoped_cold"], 50) <= 20)),
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
