"""Search speed and memory on this machine, with random-weight full-size towers and synthetic data.

    python scripts/bench_search.py [--n 1000000] [--n-index 100000] [--queries 30] [--skip a,b,c]

(a) one text query end to end (encode + FAISS search + metadata; loading excluded) with the full-size
    ruclip-vit-large-patch14-224 text tower over a --n-index synthetic index written straight into a Store:
    p50/p95 per stage.
(b) FAISS search alone on --n clustered 768-d vectors: the `auto` index (tuned to recall@10 >= 0.95) beside
    exact flat search, p50 per query and measured recall@10.
(c) RSS of a process holding the text tower only beside one holding the full model (subprocesses).
No weights are downloaded; the tokenizer is the committed test fixture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

MODEL = "ruclip-vit-large-patch14-224"
QUERIES = ["рыжий кот спит на диване", "закат над морем", "дети играют в футбол во дворе", "горы зимой",
           "собака в парке", "свадебный торт", "ночной город", "старый автомобиль у дома"]  # fmt: skip


def clustered(n: int, dim: int, seed: int, centers: int = 1000, spread: float = 0.35) -> np.ndarray:
    """L2-normalised Gaussian-mixture vectors (real embeddings are clustered, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = c[rng.integers(0, centers, m)] + rng.standard_normal((m, dim), dtype=np.float32) * (spread / dim**0.5)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1e3, q))


def text_model(parts: tuple[str, ...]):
    import torch

    from ruclip_search.encoder import RuCLIP
    from ruclip_search.model import CLIP, CLIPConfig
    from ruclip_search.preprocess import Preprocessor
    from ruclip_search.registry import CONFIGS
    from ruclip_search.tokenizer import BPETokenizer

    torch.manual_seed(0)
    cfg = CONFIGS[MODEL]
    net = CLIP(CLIPConfig.from_dict(cfg), parts=parts).eval()
    tok = BPETokenizer.from_file(ROOT / "tests" / "fixtures" / "tokenizer" / "bpe.model")
    return RuCLIP(net, tok, Preprocessor(image_size=cfg["image_resolution"]), MODEL, torch.device("cpu"))


def write_synthetic_index(folder: Path, vecs: np.ndarray) -> None:
    """Rows straight into a Store (1 root, metadata, float16 embeddings) and its `auto` FAISS file."""
    from ruclip_search.indexer import write_faiss
    from ruclip_search.store import Store, encode_embedding

    store = Store.create(folder)
    rid = store.root_id("/photos")
    store.set_meta(model=MODEL, dim=str(vecs.shape[1]))
    with store.transaction() as conn:
        rows = [
            {"root_id": rid, "relpath": f"{i // 1000:03d}/IMG_{i:06d}.jpg".encode(), "size": 1000 + i,
             "mtime_ns": i, "width": 4000, "height": 3000, "format": "JPEG",
             "taken_at": f"20{10 + i % 14:02d}-0{1 + i % 9}-1{i % 10}T12:00:00", "embedding": encode_embedding(v),
             "indexed_at": 0.0}
            for i, v in enumerate(vecs)
        ]  # fmt: skip
        from ruclip_search.store import images_table

        conn.execute(images_table.insert(), rows)
    write_faiss(store, "auto")
    store.close()


def bench_end_to_end(n: int, queries: int) -> None:
    import torch

    from ruclip_search import faiss_index
    from ruclip_search.search import Index

    print(f"\n(a) one text query end to end, {MODEL} text tower (random weights), {n} images, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_synthetic_index(Path(tmp), clustered(n, 768, seed=1))
        print(f"  synthetic index written in {time.perf_counter() - t0:.0f} s")
        idx = Index.open(tmp, model=text_model(("text",)))
        info = idx.info()
        print(f"  index type {info['index_type']} {info['index_params']} recall@10 {info['recall_at_10']}")
        stages: dict[str, list[float]] = {"encode": [], "search": [], "metadata": [], "total": [], "filtered": []}
        for i in range(queries + 3):
            q = QUERIES[i % len(QUERIES)]
            t0 = time.perf_counter()
            vec = idx.embed_query(q)
            t1 = time.perf_counter()
            _, ids = faiss_index.search(idx._state.faiss, vec[None], 10)
            t2 = time.perf_counter()
            hits = idx.store.get_images(ids[0].tolist())
            t3 = time.perf_counter()
            assert len(hits) == 10
            t4 = time.perf_counter()
            idx.search(q, k=10, under="/photos/007", formats={"JPEG"})
            t5 = time.perf_counter()
            if i >= 3:  # warm-up
                for key, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, t5 - t4), strict=True):
                    stages[key].append(v)
        for key, v in stages.items():
            label = "search() with under+format filter" if key == "filtered" else key
            print(f"  {label:<34} p50 {pct(v, 50):7.1f} ms   p95 {pct(v, 95):7.1f} ms")
        idx.close()


def bench_faiss(n: int, queries: int) -> None:
    import faiss

    from ruclip_search import faiss_index

    print(f"\n(b) FAISS alone, {n} clustered 768-d vectors ({n * 768 * 4 / 1e9:.1f} GB), faiss threads "
          f"{faiss.omp_get_max_threads()}")  # fmt: skip
    vecs = clustered(n, 768, seed=2)
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    index, info = faiss_index.build_faiss(vecs, ids, "auto")
    print(f"  auto -> {info['type']} {info['params']}, build+tune {time.perf_counter() - t0:.0f} s, "
          f"recall@10 (build sample) {info['recall_at_10']}")  # fmt: skip
    rng = np.random.default_rng(3)
    qs = vecs[rng.choice(n, queries, replace=False)] + rng.standard_normal((queries, 768), dtype=np.float32) * 0.01
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(768)
    flat.add(vecs)
    times_flat, times_ann, hits = [], [], 0
    for q in qs:
        t0 = time.perf_counter()
        _, truth = flat.search(q[None], 10)
        t1 = time.perf_counter()
        _, found = faiss_index.search(index, q[None], 10)
        t2 = time.perf_counter()
        times_flat.append(t1 - t0)
        times_ann.append(t2 - t1)
        hits += len(set(truth[0].tolist()) & set(found[0].tolist()))
    print(f"  exact flat:  p50 {pct(times_flat, 50):7.1f} ms   p95 {pct(times_flat, 95):7.1f} ms   recall@10 1.0")
    print(f"  auto ({info['type']}):  p50 {pct(times_ann, 50):7.1f} ms   p95 {pct(times_ann, 95):7.1f} ms   "
          f"recall@10 {hits / (10 * queries):.3f} on {queries} held-out queries")  # fmt: skip


RSS_CHILD = """
import sys, json, resource
sys.path[:0] = [{root!r}, {scripts!r}]
from bench_search import text_model
m = text_model({parts!r})
m.encode_text("кот")
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
print(json.dumps({{"rss": rss, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def bench_rss() -> None:
    print(f"\n(c) RSS of a process with {MODEL} (random weights, fp32) after one text query")
    for parts in (("text",), ("text", "image")):
        code = RSS_CHILD.format(root=str(ROOT), scripts=str(ROOT / "scripts"), parts=parts)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  parts={'+'.join(parts):<11} RSS {r['rss'] / 2**20:7.0f} MiB   peak {r['peak'] / 2**20:7.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors for (b)")
    ap.add_argument("--n-index", type=int, default=100_000, help="images in the synthetic index for (a)")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, c")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    print(f"{os.cpu_count()} CPUs")
    if "a" not in skip:
        bench_end_to_end(args.n_index, args.queries)
    if "c" not in skip:
        bench_rss()
    if "b" not in skip:
        bench_faiss(args.n, args.queries * 3)


if __name__ == "__main__":
    main()
