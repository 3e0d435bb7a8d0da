"""Where the true top-10 of text-like queries sit among the IVF lists of the 10M index (issue 10), and how many
codes a query must scan to reach a share of them, by how the lists are ranked:

- `centroid`: by the query's inner product with each list's centroid (what FAISS, and `search`, do);
- `tail a=…`: that plus a * sigma_l(q) * sqrt(2 ln n_l) / mean, a Gaussian estimate of the best score inside list l
  (sigma_l(q): the spread of list l's members along q, from their residuals; n_l: its size).

The scan's cost is the number of codes read, not of lists: the lists are uneven, and text-like queries' true
neighbours sit in the large ones. No scan is run: the share comes from the lists' ids and the exact top-10.

    python scripts/study_lists.py --dir /work/scale     # the folder bench_scale.py prepared (index/, queries.npy, truth.npy)

The residual spreads come from the first `--sample` synthetic images (bench_scale.py's data: row r is id r + 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import faiss
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from synth import CHUNK, Synth  # noqa: E402

TARGETS = (0.9, 0.95, 0.955, 0.965)


def codes_needed(score: np.ndarray, sizes: np.ndarray, truth_lists: np.ndarray) -> dict[float, float]:
    """For each target share: the codes scanned (lists taken best first) by which that share of the true top-10
    (pooled over queries) lies inside the lists read."""
    order = np.argsort(-score, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(score.shape[1])[None, :], axis=1)
    scanned = np.cumsum(sizes[order], axis=1)
    need = np.take_along_axis(scanned, np.take_along_axis(rank, truth_lists, 1), 1)
    return {t: float(np.quantile(need.ravel(), t)) for t in TARGETS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/work/scale"))
    p.add_argument("--sample", type=int, default=1_000_000, help="synthetic images whose residuals give the spreads")
    args = p.parse_args()
    files = sorted((args.dir / "index").glob("faiss-*.index"), key=lambda f: f.stat().st_mtime)
    index = faiss.read_index(str(files[-1]))
    ivf = faiss.extract_index_ivf(index)  # (`index` owns it: kept alive here)
    nlist = ivf.nlist
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    sizes = np.array([ivf.invlists.list_size(lst) for lst in range(nlist)])
    ids = [faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), int(sizes[lst])).copy() for lst in range(nlist)]
    list_of = np.full(max(int(i.max()) for i in ids if len(i)) + 1, -1, dtype=np.int32)
    for lst, members in enumerate(ids):
        list_of[members] = lst
    queries, truth = np.load(args.dir / "queries.npy"), np.load(args.dir / "truth.npy")
    print(f"{files[-1].name}: {nlist} lists, {int(sizes.sum()):,} codes; list sizes min/median/max "
          f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}; the true top-10's lists: median size "
          f"{int(np.median(sizes[list_of[truth]]))}")  # fmt: skip

    synth = Synth(centroids.shape[1], json.loads((args.dir / "prepared.json").read_text())["n"])
    sq, count = np.zeros(nlist), np.zeros(nlist)
    cov = np.zeros((centroids.shape[1],) * 2)
    for start in range(0, args.sample, CHUNK):
        x = synth.image_chunk(start, CHUNK)
        lists = list_of[np.arange(start, start + CHUNK) + 1]
        r = x - centroids[lists]
        np.add.at(sq, lists, (r * r).sum(1))
        np.add.at(count, lists, 1)
        cov += r[:20_000].T.astype(np.float64) @ r[:20_000]
    spread2 = sq / np.maximum(count, 1)
    spread2[count < 5] = np.median(spread2[count >= 5])
    along = np.einsum("qd,de,qe->q", queries, cov / np.trace(cov), queries)  # share of a residual's variance along q
    sigma = np.sqrt(spread2[None, :] * along[:, None])
    tail = np.sqrt(2 * np.log(np.maximum(sizes, 2)))
    tail = tail / tail.mean()

    base = queries @ centroids.T
    print("codes scanned (millions) until this share of the true top-10 lies in the lists read:")
    print("  ranking        " + "  ".join(f"{t:>6}" for t in TARGETS))
    for name, score in [("centroid", base)] + [(f"tail a={a}", base + a * sigma * tail) for a in (0.5, 1, 1.5, 2, 3)]:
        need = codes_needed(score, sizes, list_of[truth])
        print(f"  {name:<13}  " + "  ".join(f"{need[t] / 1e6:6.2f}" for t in TARGETS))


if __name__ == "__main__":
    main()
