"""Parquet export and import of a large index: time and peak RSS, each in its own process.

    python scripts/bench_parquet.py fill DIR [--rows 1000000] [--dim 768]   # synthetic index via the store API
    python scripts/bench_parquet.py run DIR                                 # export, then import into a new index

`fill` writes random unit float16 embeddings (every 10th photo in a collection, every 7th with labels) under
keys p0000000..., bound to the default model's name, through Store.put_photos in transactions of 10,000.
`run` times `export_index` (Parquet shards and clip-retrieval layout separately) and `import_shards` (without
the FAISS rewrite, which `reindex`/`compact` measure) in child processes and reads their peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fill(folder: Path, rows: int, dim: int) -> None:
    import numpy as np

    from ruclip_search import defaults
    from ruclip_search.store import PhotoWrite, Store

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with Store.create(folder) as store:
        with store.transaction() as conn:
            store.set_model(conn, defaults.MODEL, dim)
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            vecs = rng.normal(size=(n, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs.astype(np.float16)
            store.put_photos([
                PhotoWrite(f"p{start + k:07d}", vecs[k].tobytes(),
                           collection=f"c{(start + k) % 100}" if (start + k) % 10 == 0 else None,
                           labels=("cat", "sofa") if (start + k) % 7 == 0 else ())
                for k in range(n)
            ])  # fmt: skip
    print(json.dumps({"filled": rows, "dim": dim, "seconds": round(time.perf_counter() - t, 1)}))


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from ruclip_search.parquet import export_index, import_shards
t = time.perf_counter()
result = {call}
result["wall_s"] = round(time.perf_counter() - t, 1)
result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(result))
"""


def child(call: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), call=call)], check=True,
                         capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(folder: Path, skip_cr: bool = False) -> None:
    work = folder.parent / (folder.name + "-bench")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    out = {"index_db_mb": round((folder / "index.db").stat().st_size / 1e6)}
    out["export_parquet"] = child(f"export_index({str(folder)!r}, {str(work / 'pq')!r})")
    out["parquet_mb"] = round(sum(p.stat().st_size for p in (work / "pq").iterdir()) / 1e6)
    out["import"] = child(f"import_shards({str(work / 'imported')!r}, {str(work / 'pq')!r}, write_index=False)")
    shutil.rmtree(work / "pq")  # one output on disk at a time (1M x 768 float32 is 3 GB)
    shutil.rmtree(work / "imported")
    if not skip_cr:
        out["export_clip_retrieval"] = child(f"export_index({str(folder)!r}, None, {str(work / 'cr')!r})")
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["fill", "run"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--skip-clip-retrieval", action="store_true", help="time the Parquet export and import only")
    args = ap.parse_args()
    if args.what == "fill":
        fill(args.folder, args.rows, args.dim)
    else:
        run(args.folder, args.skip_clip_retrieval)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
