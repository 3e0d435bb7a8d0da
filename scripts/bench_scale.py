"""10 million images on one machine within a memory bound (issue 10): build, serve, search, grow.

    python scripts/bench_scale.py --prepare --n 10000000 --dir /work/scale    # untimed: generate + fill
    bench-exclusive python scripts/bench_scale.py --dir /work/scale            # the measured part
    python scripts/bench_scale.py --clean --dir /work/scale

--prepare writes --n CLIP-like synthetic 768-d embeddings (scripts/synth.py: many clusters of log-normal
sizes and varying spread, power-law spectrum) into a real index's store in chunks (rows straight into
SQLite, the fast path), and the exact top-10 of held-out text-like queries over the stored (float16)
vectors as ground truth. The measured part runs each step in a fresh process:
  build   `reindex(auto)` (streamed from the store; train on a sample, add in chunks, tune): seconds, peak RSS
  serve   Index.open with the full-size text tower (random weights) + single queries: RSS, FAISS p50
          (ANN + re-ranking on the stored vectors), Index.search p50, recall@10 vs exact
  grow    10k new photos through Index.add_many, then compact(): seconds, and whether it retrained
Each figure is printed beside the issue's goal. Serve-only runs: `--skip build,grow`; `--cold` first drops
index.db's pages from the OS page cache (that file's only), so that runs start alike; `--scan-parts` /
`--read-parts` set how one query's scan and row reads are split (1 / 4: as before the split scan).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from synth import CHUNK, Synth, TopK  # noqa: E402

DIM, K, QUERIES, ADD = 768, 10, 300, 10_000
MODEL = "ruclip-vit-large-patch14-224"


def prepare(folder: Path, n: int, start: int = 0, stop: int | None = None) -> None:
    """Fill a store with synthetic embeddings start..stop-1 of `n` (several processes may fill disjoint,
    CHUNK-aligned ranges of one store at once); a fresh store when start is 0 and no range is given."""
    from ruclip_search.store import Store

    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "index"
    if stop is None and start == 0 and index.exists():
        shutil.rmtree(index)
    if not index.exists():
        store = Store.create(index)
        with store.transaction() as conn:
            store.set_model(conn, MODEL, DIM)
        store.close()
    stop = n if stop is None else stop
    synth = Synth(DIM, n)
    db = sqlite3.connect(index / "index.db", timeout=600)
    db.execute("PRAGMA synchronous=OFF")
    t0 = time.perf_counter()
    for first, vecs in synth.images(start, stop):
        half = vecs.astype(np.float16)
        rows = [(first + 1 + j, 0, 0, half[j].tobytes()) for j in range(len(vecs))]
        db.executemany("INSERT INTO images (id, size, mtime_ns, embedding) VALUES (?,?,?,?)", rows)
        db.commit()
        if (first // CHUNK) % 10 == 0:
            print(f"  {first + len(vecs):,} rows, {time.perf_counter() - t0:.0f} s", flush=True)
    db.close()
    print(f"filled {start:,}..{stop:,} in {time.perf_counter() - t0:.0f} s", flush=True)


def ground_truth(folder: Path, n: int) -> None:
    """The exact top-10 of the held-out text-like queries over the stored (float16) vectors, read through the
    store's API in chunks; marks the folder prepared."""
    from ruclip_search.store import Store

    queries = Synth(DIM, n).text_queries(QUERIES)
    truth = TopK(queries, K)
    t0 = time.perf_counter()
    with Store.open(folder / "index") as store:
        count = store.counts()["images"]
        for ids, vecs in store.iter_embeddings(batch=100_000):
            truth.add(ids, vecs)
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", truth.ids)
    (folder / "prepared.json").write_text(json.dumps({"n": count, "queries": QUERIES}))
    db = folder / "index" / "index.db"
    print(f"ground truth over {count:,} rows in {time.perf_counter() - t0:.0f} s; db {db.stat().st_size / 1e9:.1f} GB")


# -- measured steps, each in its own process ---------------------------------------------------------
def step_build(folder: Path, budget: str | None) -> dict:
    from ruclip_search import faiss_index
    from ruclip_search.indexer import reindex

    t0 = time.perf_counter()
    info = reindex(folder / "index", "auto", memory_budget=faiss_index.parse_bytes(budget) if budget else None)
    return {"seconds": time.perf_counter() - t0, "info": info}


def _text_model():
    import torch

    from ruclip_search.encoder import RuCLIP
    from ruclip_search.model import CLIP, CLIPConfig
    from ruclip_search.preprocess import Preprocessor
    from ruclip_search.registry import CONFIGS
    from ruclip_search.tokenizer import BPETokenizer

    torch.manual_seed(0)
    cfg = CONFIGS[MODEL]
    net = CLIP(CLIPConfig.from_dict(cfg), parts=("text",)).eval()
    tok = BPETokenizer.from_file(ROOT / "tests" / "fixtures" / "tokenizer" / "bpe.model")
    return RuCLIP(net, tok, Preprocessor(image_size=cfg["image_resolution"]), MODEL, torch.device("cpu"))


def _rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out["VmRSS"], out["VmHWM"]


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def _cached_mb(path: Path) -> float | None:
    """How much of `path` is in the OS page cache (util-linux fincore), in MB; None where it cannot tell."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True,
                         text=True, check=False)  # fmt: skip
    return round(int(out.stdout.split()[0]) / 1e6) if out.returncode == 0 and out.stdout.split() else None


def step_serve(folder: Path, scan_parts: int | None = None, read_parts: int | None = None, cold: bool = False,
               rows_from: str = "file") -> dict:  # fmt: skip
    from ruclip_search import faiss_index, store
    from ruclip_search.search import Index

    if scan_parts:  # A/B against an earlier setting (1: one thread scans a query's lists, as before)
        faiss_index.SCAN_PARTS = scan_parts
    if read_parts:
        store.VECTOR_READ_THREADS = read_parts
    if cold:  # these files' pages out of the OS page cache (only theirs): every run starts from the same state
        for path in [folder / "index" / "index.db", *sorted((folder / "index").glob("vectors-*.f16"))]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    db_cached_before = _cached_mb(folder / "index" / "index.db")
    queries, truth = np.load(folder / "queries.npy"), np.load(folder / "truth.npy")
    t0 = time.perf_counter()
    idx = Index.open(folder / "index", model=_text_model())
    open_s = time.perf_counter() - t0
    state = idx._live_state()
    if rows_from == "store":  # A/B: the re-ranked rows read from the store, as before the vector file
        state = idx._state = dataclasses.replace(state, vectors=None)
    vector_file = state.vectors.path if state.vectors is not None else None
    faiss_ms, search_ms, found, same = [], [], [], 0
    for q in queries[:20]:  # warm-up: page in the lists and rows the first queries touch
        idx.search(q, k=K)
    scan_ms = []
    for q in queries[:100]:  # the ANN scan alone (no re-ranking read), to tell the two costs apart
        t0 = time.perf_counter()
        faiss_index.search(state.faiss, q[None], K)
        scan_ms.append((time.perf_counter() - t0) * 1e3)
    read_ms: list[float] = []  # per query: reading the re-ranked rows from the store

    def fetch(ids: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = state.stored_vectors(idx.store, ids)
        read_ms[-1] += (time.perf_counter() - t) * 1e3
        return out

    for q in queries:
        read_ms.append(0.0)
        t0 = time.perf_counter()
        pairs = idx._search_main(state.faiss, state.segment.tombs, q[None], K, None, set(), fetch=fetch)
        t1 = time.perf_counter()
        hits = idx.search(q, k=K)
        t2 = time.perf_counter()
        faiss_ms.append((t1 - t0) * 1e3)
        search_ms.append((t2 - t1) * 1e3)
        found.append([h.id for h in hits])
        same += [p[0] for p in pairs] == found[-1]
    t0 = time.perf_counter()
    idx.search("рыжий кот спит на диване", k=K)
    text_ms = (time.perf_counter() - t0) * 1e3
    rss, hwm = _rss_mb()
    meta = idx.store.meta()  # not idx.info(): its counts scan the whole table (fills the page cache with the store)
    info = {"index_type": meta.get("index_type"), "index_params": json.loads(meta.get("index_params") or "{}"),
            "recall_at_10": meta.get("recall_at_10")}  # fmt: skip
    idx.close()
    return {
        "open_s": open_s, "rss_mb": rss, "hwm_mb": hwm, "faiss_p50_ms": float(np.median(faiss_ms)),
        "faiss_p95_ms": float(np.percentile(faiss_ms, 95)), "search_p50_ms": float(np.median(search_ms)),
        "scan_p50_ms": float(np.median(scan_ms)), "read_p50_ms": float(np.median(read_ms)),
        "text_query_ms": text_ms, "recall_at_10": _recall(found, truth), "full_pages": all(len(f) == K for f in found),
        "same_as_faiss_path": same, "index_type": info.get("index_type"), "params": info.get("index_params"),
        "recorded_recall": info.get("recall_at_10"), "scan_parts": faiss_index.SCAN_PARTS,
        "read_parts": store.VECTOR_READ_THREADS, "db_cached_mb_before": db_cached_before,
        "db_cached_mb_after": _cached_mb(folder / "index" / "index.db"),
        "rows_from": str(vector_file) if vector_file else "store",
        "vector_file_cached_mb_after": _cached_mb(vector_file) if vector_file else None,
    }  # fmt: skip


def step_grow(folder: Path, n: int) -> dict:
    from ruclip_search.search import Index

    synth = Synth(DIM, n)
    vecs = synth.image_chunk((n // CHUNK + 1) * CHUNK, ADD)  # images the collection does not hold yet
    idx = Index.open(folder / "index", writable=True, model=_text_model())
    before = idx.store.get_meta("index_trained_n")
    t0 = time.perf_counter()
    idx.add_many({"key": f"new{i}", "embedding": v} for i, v in enumerate(vecs))
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = idx.compact()
    compact_s = time.perf_counter() - t0
    sample = range(0, ADD, 50)  # each a photo the fold took in: its own vector must find it first
    found_self = sum(idx.search(vecs[i], k=1)[0].key == f"new{i}" for i in sample) / len(sample)
    rss, hwm = _rss_mb()
    out = {"add_s": add_s, "compact_s": compact_s, "info": info, "trained_n_before": before,
           "trained_n_after": idx.store.get_meta("index_trained_n"), "found_self": found_self,
           "hwm_mb": hwm}  # fmt: skip
    idx.close()
    return out


def run_step(name: str, args: argparse.Namespace) -> dict:
    """Run one step in a fresh process; returns its result (with the process's peak RSS, VmHWM)."""
    cmd = [sys.executable, __file__, "--step", name, "--dir", str(args.dir), "--n", str(args.n)]
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    for flag in ("scan_parts", "read_parts"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.cold:
        cmd.append("--cold")
    cmd += ["--rows-from", args.rows_from]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"step {name} failed ({proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--prepare", action="store_true", help="fill the store (all of --n, or --start..--stop)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--truth", action="store_true", help="compute the ground truth over the filled store")
    p.add_argument("--clean", action="store_true")
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--skip", default="", help="comma-separated steps to skip: build,serve,grow")
    p.add_argument("--scan-parts", type=int, default=None, help="serve: parts one query's IVF scan runs in")
    p.add_argument("--read-parts", type=int, default=None, help="serve: parts the re-ranked rows are read in")
    p.add_argument("--cold", action="store_true", help="serve: drop index.db's pages from the OS cache first")
    p.add_argument("--rows-from", choices=("file", "store", "both"), default="file",
                   help="serve: read the re-ranked rows from the vector file (where the index has one), the store "
                   "(as before it), or both in turn (store first)")  # fmt: skip
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
        return
    if args.prepare:
        prepare(args.dir, args.n, args.start, args.stop)
        if args.stop is None and args.start == 0:
            ground_truth(args.dir, args.n)
        return
    if args.truth:
        ground_truth(args.dir, args.n)
        return
    if args.step:
        import logging

        logging.basicConfig(level=logging.INFO, format="  [%(relativeCreated)7.0f ms] %(message)s", stream=sys.stderr)
        if args.step == "build":
            out = step_build(args.dir, args.memory_budget)
        elif args.step == "serve":
            out = step_serve(args.dir, args.scan_parts, args.read_parts, args.cold, args.rows_from)
        else:
            out = step_grow(args.dir, json.loads((args.dir / "prepared.json").read_text())["n"])
        out["peak_rss_mb"] = _rss_mb()[1]
        out["load"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])  # others' work during the step
        print(json.dumps(out, default=str))
        return
    if not (args.dir / "prepared.json").exists():  # untimed: the ground truth of a store filled in parts
        ground_truth(args.dir, args.n)
    n = json.loads((args.dir / "prepared.json").read_text())["n"]
    skip = set(filter(None, args.skip.split(",")))
    print(f"bench_scale: {n:,} x {DIM} synthetic embeddings, {os.cpu_count()} CPUs")
    rows = []
    if "build" not in skip:
        b = run_step("build", args)
        print("build:", json.dumps({k: v for k, v in b["info"].items() if k != "recall_probe"}))
        rows += [("index build time", f"{b['seconds']:.0f} s (load {b['load']})", "-"),
                 ("recall@10 at build: tuning / kept held-out queries",
                  f"{b['info']['recall_at_10']} / {b['info'].get('probe_recall')}", ">= 0.95"),
                 ("index build peak RSS", f"{b['peak_rss_mb'] / 1024:.2f} GB", "<= 8 GB")]  # fmt: skip
    for rows_from in ("store", "file") if args.rows_from == "both" else (args.rows_from,):
        if "serve" in skip:
            break
        s = run_step("serve", argparse.Namespace(**{**vars(args), "rows_from": rows_from}))
        print("serve:", json.dumps(s))
        rows += [
            (f"-- serving, re-ranked rows from {rows_from}", s["rows_from"], "-"),
            ("(load average after the serve step)", s["load"], "-"),
            ("(index.db in the page cache before / after, MB)",
             f"{s['db_cached_mb_before']} / {s['db_cached_mb_after']}", "-"),
            ("(scan parts / row-read parts)", f"{s['scan_parts']} / {s['read_parts']}", "-"),
            ("serving RSS (open + 300 queries)", f"{s['rss_mb'] / 1024:.2f} GB (peak {s['hwm_mb'] / 1024:.2f})",
             "<= 4 GB"),
            ("single-query FAISS p50 (ANN + re-rank)", f"{s['faiss_p50_ms']:.1f} ms (p95 {s['faiss_p95_ms']:.1f})",
             "<= 20 ms"),
            ("  of which the ANN scan alone (k=10), p50", f"{s['scan_p50_ms']:.1f} ms", "-"),
            ("  of which reading the re-ranked rows, p50", f"{s['read_p50_ms']:.1f} ms", "-"),
            ("Index.search(vector) p50 (+ metadata)", f"{s['search_p50_ms']:.1f} ms", "-"),
            ("recall@10, held-out text-like queries vs exact", f"{s['recall_at_10']:.3f} (recorded "
             f"{s['recorded_recall']})", ">= 0.95"),
        ]  # fmt: skip
    if "grow" not in skip:
        g = run_step("grow", args)
        g["info"].pop("recall_probe", None)
        print("grow:", json.dumps(g))
        retrained = g["trained_n_before"] != g["trained_n_after"]
        rows += [
            (f"add {ADD:,} photos (add_many)", f"{g['add_s']:.1f} s", "-"),
            ("fold them into the FAISS file (compact)", f"{g['compact_s']:.1f} s, retrained: {retrained}",
             "seconds, no retrain"),
            ("recall@10 on the kept held-out queries after the fold", f"{g['info'].get('probe_recall')}",
             ">= 0.95 (else retrain)"),
            ("added photos found first by their own vector", f"{g['found_self']:.0%} of {len(range(0, ADD, 50))}",
             "all"),
        ]  # fmt: skip
    print(f"\n{'figure':<48} {'measured':<34} goal")
    for name, value, goal in rows:
        print(f"{name:<48} {value:<34} {goal}")


if __name__ == "__main__":
    main()
