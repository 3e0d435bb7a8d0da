"""Tokenizer latency on a short query (a timing, so not a unit test: it depends on the machine and its load).

    python scripts/bench_tokenizer.py [--runs 5]

Prints the median time of one `tokenize` call on a short Russian query over --runs x 200 calls; the budget is
1 ms (a query's tokenizing must stay negligible beside the text encoder's 20-70 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ruclip_search.tokenizer import BPETokenizer  # noqa: E402

BUDGET_S = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bpe", default=str(ROOT / "tests" / "fixtures" / "tokenizer" / "bpe.model"))
    args = parser.parse_args()
    tok = BPETokenizer.from_file(args.bpe)
    query = "рыжий кот на подоконнике"
    tok.tokenize(query)
    per_call = []
    for _ in range(args.runs):
        start = time.perf_counter()
        for _ in range(200):
            tok.tokenize(query)
        per_call.append((time.perf_counter() - start) / 200)
    median = statistics.median(per_call)
    print(f"tokenize({query!r}): median {median * 1e6:.0f} µs per call (budget {BUDGET_S * 1e6:.0f} µs)")
    sys.exit(0 if median < BUDGET_S else 1)


if __name__ == "__main__":
    main()
