"""One query's IVF scan split over threads (faiss_index._ivf_search): FAISS splits a search by query only, so a
single query's probed lists are scanned in parts at once and the parts' top lists merged. The answer must be the
one scan's: the same scores, the same hits (hits tied on score may differ in order, and at the last place in
which of them is kept), with filters too.

Data: 96-d clustered unit vectors with ids that are not row numbers, text-like queries, as in test_pq_refine.py.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest
from test_pq_refine import CountingFetch, data

from ruclip_search import faiss_index

DEPTH = 200


def _indexes() -> dict[str, tuple[faiss.Index, np.ndarray, np.ndarray]]:
    vecs, ids, queries = data()
    out = {}
    for kind in ("ivf", "ivfpq"):
        index, _ = faiss_index.build_faiss(vecs, ids, kind, min_ann=100)
        faiss_index._ivf_of(index).nprobe = 40  # more than SCAN_PART_MIN_LISTS per part: split
        out[kind] = (index, ids, queries)
    return out


@pytest.fixture(scope="module")
def indexes():
    return _indexes()


def _one_scan(index: faiss.Index, queries: np.ndarray, depth: int, selector=None) -> tuple[np.ndarray, np.ndarray]:
    ivf = faiss_index._ivf_of(index)
    params = faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
    return index.search(queries, depth, params=params)


def _assert_same(one: tuple[np.ndarray, np.ndarray], split: tuple[np.ndarray, np.ndarray]) -> None:
    """The same scores in the same places; the same ids wherever a score is not tied with another one."""
    (s1, i1), (s2, i2) = one, split
    np.testing.assert_array_equal(s2, s1)
    for row_s, a, b in zip(s1, i1, i2, strict=True):
        # a score held by two or more hits, or by the last one (which may tie with a hit left out)
        tied = np.isin(row_s, row_s[np.flatnonzero(np.diff(row_s) == 0)]) | (row_s == row_s[-1])
        np.testing.assert_array_equal(b[~tied], a[~tied])
        for score in np.unique(row_s[tied & (row_s != row_s[-1])]):  # ties within the list: the same hits
            assert set(b[row_s == score].tolist()) == set(a[row_s == score].tolist())


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_one_query_scans_its_lists_in_parts_with_the_one_scan_answer(indexes, kind, monkeypatch) -> None:
    index, ids, queries = indexes[kind]
    monkeypatch.setattr(faiss_index, "SCAN_PARTS", 2)
    threads: set[int] = set()
    real = faiss_index._split_scan

    def spy(*a, **kw):
        out = real(*a, **kw)
        threads.add(threading.get_ident())
        return out

    monkeypatch.setattr(faiss_index, "_split_scan", spy)
    for q in queries[:30]:
        split = faiss_index._search(index, q[None], DEPTH, None, 10)
        _assert_same(_one_scan(index, q[None], DEPTH), split)
    assert threads, "a single query's scan was not split"


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_split_scan_keeps_filters_and_short_lists(indexes, kind, monkeypatch) -> None:
    """An id filter holds in every part; a query whose lists hold fewer hits than asked gets -1 slots last."""
    index, ids, queries = indexes[kind]
    monkeypatch.setattr(faiss_index, "SCAN_PARTS", 3)
    called = []
    real = faiss_index._split_scan
    monkeypatch.setattr(faiss_index, "_split_scan", lambda *a, **kw: called.append(1) or real(*a, **kw))
    keep = np.ascontiguousarray(ids[::20])
    sel = faiss.IDSelectorBatch(len(keep), faiss.swig_ptr(keep))
    for q in queries[:10]:
        one = _one_scan(index, q[None], DEPTH, sel)
        split = faiss_index._ivf_search(index, q[None], DEPTH, sel, int(faiss_index._ivf_of(index).nprobe))
        _assert_same(one, split)
        assert np.isin(split[1][split[1] >= 0], keep).all()
        short = split[1][0] < 0
        assert short.any() and not (np.diff(short.astype(int)) < 0).any()  # too few hits: empty slots at the end
    assert len(called) == 10


def test_batches_and_short_scans_are_not_split(indexes, monkeypatch) -> None:
    """Batches are split by FAISS itself (by query), and a scan of few lists costs less than the threads."""
    index, _, queries = indexes["ivfpq"]
    monkeypatch.setattr(faiss_index, "SCAN_PARTS", 2)
    monkeypatch.setattr(faiss_index, "_split_scan", lambda *a, **kw: pytest.fail("split"))
    faiss_index._ivf_search(index, queries[: faiss_index.SINGLE_THREAD_BELOW + 1], DEPTH, None, 40)
    faiss_index._ivf_search(index, queries[:1], DEPTH, None, 2 * faiss_index.SCAN_PART_MIN_LISTS - 1)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
@pytest.mark.parametrize("nprobe", [5, 40])
def test_lists_ranked_by_the_caller_give_the_one_scan_answer(indexes, kind, nprobe, monkeypatch) -> None:
    """A caller that ranked the query's lists already (the recent segment probes the same ones) hands them in:
    the answer is the one scan's at that nprobe, in one part or several, and the quantizer is not asked again;
    lists ranked for another nprobe are not used."""
    index, ids, queries = indexes[kind]
    quantizer = faiss_index._ivf_of(index).quantizer
    monkeypatch.setattr(faiss_index, "SCAN_PARTS", 2)
    keep = np.ascontiguousarray(ids[::3])
    sel = faiss.IDSelectorBatch(len(keep), faiss.swig_ptr(keep))
    for selector in (None, sel):
        for q in queries[:10]:
            coarse = faiss_index.nearest_lists_scored(quantizer, q[None], nprobe)
            one = index.search(q[None], DEPTH, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))
            with monkeypatch.context() as m:
                m.setattr(faiss_index, "nearest_lists_scored", lambda *a: pytest.fail("ranked twice"))
                _assert_same(one, faiss_index._ivf_search(index, q[None], DEPTH, selector, nprobe, coarse))
            other = faiss_index.nearest_lists_scored(quantizer, q[None], nprobe + 1)
            _assert_same(one, faiss_index._ivf_search(index, q[None], DEPTH, selector, nprobe, other))


def test_refined_search_of_one_query_is_unchanged_by_the_split(indexes, monkeypatch) -> None:
    """The whole IVF-PQ search (scan, refine, re-rank) returns the same top 10 with and without parts."""

    vecs, ids, queries = data()
    index, _, _ = indexes["ivfpq"]
    fetch = CountingFetch(vecs, ids)
    monkeypatch.setattr(faiss_index, "SCAN_PARTS", 1)
    one = [faiss_index.search(index, q, 10, fetch=fetch) for q in queries[:20]]
    monkeypatch.setattr(faiss_index, "SCAN_PARTS", 2)
    split = [faiss_index.search(index, q, 10, fetch=fetch) for q in queries[:20]]
    for (s1, i1), (s2, i2) in zip(one, split, strict=True):
        np.testing.assert_allclose(s2, s1, rtol=1e-6)
        np.testing.assert_array_equal(i2, i1)
