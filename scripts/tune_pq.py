"""Compare IVF-PQ recipes at 1M-2M on the synthetic CLIP-like data (issue 10): recall@10 vs exact on held-out
text-like queries (scripts/synth.py), by nprobe and re-rank depth R, and single-query (one thread) latency.

    python scripts/tune_pq.py --n 1000000 --nlist 2048 --recipes PQ48,PQ96,PQ192x4fs

Re-ranking uses the exact float16 vectors (what the store holds); the latency column is FAISS's scan alone
(the re-rank read is measured separately, on the store).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from synth import Synth  # noqa: E402

R_STEPS = (10, 20, 50, 100, 200, 500, 1000)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--recipes", default="PQ48;PQ96;PQ192x4fs", help="; between recipes")
    p.add_argument("--nprobes", default="16,32,64,128,256")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--train-per-list", type=int, default=40)
    p.add_argument("--tuning-queries", action="store_true", help="also the recall on the build's own tuning queries")
    a = p.parse_args()
    s = Synth(768, a.n)
    t0 = time.perf_counter()
    x = np.empty((a.n, 768), np.float32)
    for first, v in s.images(0, a.n):
        x[first : first + len(v)] = v
    x16 = x.astype(np.float16)
    q = s.text_queries(a.queries)
    _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"data {a.n:,} + truth in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    sample = x[np.sort(rng.choice(a.n, size=min(a.n, max(a.train_per_list * a.nlist, 256 * 39)), replace=False))]
    for recipe in a.recipes.split(";"):
        t0 = time.perf_counter()
        metric = faiss.METRIC_L2 if recipe.startswith("L2:") else faiss.METRIC_INNER_PRODUCT
        spec = recipe.removeprefix("L2:")  # L2 on unit vectors ranks as inner product, and encodes residuals
        index = faiss.index_factory(
            768, spec.replace("IVF", f"IVF{a.nlist}") if "IVF" in spec else f"IVF{a.nlist},{spec}", metric
        )
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10
        index.train(sample)
        t_train = time.perf_counter() - t0
        for s0 in range(0, a.n, 50_000):
            index.add(x[s0 : s0 + 50_000])
        t_add = time.perf_counter() - t0 - t_train
        print(
            f"\n{recipe} (by_residual {getattr(ivf, 'by_residual', '-')}): train {t_train:.0f} s, add {t_add:.0f} s ({a.n:,})",
            flush=True,
        )
        faiss.omp_set_num_threads(2)
        tq = ttruth = None
        if a.tuning_queries:  # what faiss_index tunes on: topics (sampled stored vectors) plus noise
            from ruclip_search import faiss_index

            tq = faiss_index.text_like_queries(faiss_index._topics(sample, 0), a.queries)
            ttruth = faiss.knn(tq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
        for nprobe in [int(v) for v in a.nprobes.split(",")]:
            ivf.nprobe = nprobe
            _, cand = index.search(q, 1000)
            rec = []
            for r in R_STEPS:
                c = cand[:, :r]
                sc = np.einsum("qd,qrd->qr", q, x16[np.maximum(c, 0)].astype(np.float32))
                sc[c < 0] = -np.inf
                top = np.take_along_axis(c, np.argsort(-sc, axis=1)[:, :10], 1)
                rec.append(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, top, strict=True)]))
            tune = ""
            if tq is not None:
                _, tc = index.search(tq, 320)
                ts_ = np.einsum("qd,qrd->qr", tq, x16[np.maximum(tc, 0)].astype(np.float32))
                ttop = np.take_along_axis(tc, np.argsort(-ts_, axis=1)[:, :10], 1)
                tr = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(ttruth, ttop, strict=True)])
                tune = f" | tuning queries R320={tr:.3f}"
            faiss.omp_set_num_threads(1)
            times = {}
            for r in (100, 1000):
                ts = []
                for qq in q[:60]:
                    t1 = time.perf_counter()
                    index.search(qq[None], r)
                    ts.append(time.perf_counter() - t1)
                times[r] = np.median(ts) * 1e3
            faiss.omp_set_num_threads(2)
            print(
                f"  nprobe {nprobe:4d} ({nprobe / a.nlist:.3f}): "
                + " ".join(f"R{r}={v:.3f}" for r, v in zip(R_STEPS, rec, strict=True))
                + f" | p50 {times[100]:.2f} ms (k=100) {times[1000]:.2f} ms (k=1000)"
                + tune,
                flush=True,
            )
        del index


if __name__ == "__main__":
    main()
