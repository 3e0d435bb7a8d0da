"""The pure-Python youtokentome reader must give youtokentome's ids and RuCLIP's token rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ruclip_search.errors import CheckpointError
from ruclip_search.tokenizer import BPETokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
MODEL = FIXTURES / "bpe.model"


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.from_file(MODEL)


@pytest.fixture(scope="module")
def goldens() -> dict:
    return json.loads((FIXTURES / "goldens.json").read_text(encoding="utf-8"))


def ruclip_row(ids: list[int], context_length: int) -> np.ndarray:
    """RuCLIPProcessor.encode_text + prepare_tokens, without torch."""
    tokens = [2] + ids[: context_length - 2] + [3]
    empty = context_length - len(tokens)
    if empty > 0:
        tokens = np.hstack((tokens, np.zeros(empty)))
    if len(tokens) > context_length:
        tokens = tokens[: context_length - 1] + tokens[-1:]
    return np.asarray(tokens).astype(np.int64)


def test_model_header(tok: BPETokenizer, goldens: dict) -> None:
    assert tok.vocab_size == goldens["vocab_size"] == 1500
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)


def test_encode_matches_goldens(tok: BPETokenizer, goldens: dict) -> None:
    cases = goldens["cases"]
    assert len(cases) >= 2000
    mismatches = [(text, ids) for text, ids in cases if tok.encode(text) != ids]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[0]!r}"


def test_goldens_cover_the_edge_cases(goldens: dict) -> None:
    texts = [t for t, _ in goldens["cases"]]
    assert "" in texts
    assert any(len(ids) > 77 for _, ids in goldens["cases"])
    for needle in ["\t", "\n", "  ", "ё", "Ё", "😀", "\u2581", "\u00a0"]:
        assert any(needle in t for t in texts), needle


def test_tokenize_matches_ruclip_processor(tok: BPETokenizer, goldens: dict) -> None:
    ids_of = dict(goldens["cases"])
    texts = [t for t in ids_of if t.lower() in ids_of][:500]
    for context_length in (77, 16):
        got = tok.tokenize(texts, context_length=context_length)
        assert got.dtype == np.int64 and got.shape == (len(texts), context_length)
        want = np.stack([ruclip_row(ids_of[t.lower()], context_length) for t in texts])
        np.testing.assert_array_equal(got, want)


def test_tokenize_single_string(tok: BPETokenizer) -> None:
    row = tok.tokenize("Кот НА диване")
    assert row.shape == (1, 77)
    ids = tok.encode("кот на диване")
    assert row[0, : len(ids) + 2].tolist() == [2, *ids, 3]
    assert not row[0, len(ids) + 2 :].any()
    assert tok.tokenize("").tolist()[0][:3] == [2, 3, 0]


def test_unknown_run_is_one_unk(tok: BPETokenizer) -> None:
    word_start = tok.encode("😀")[:1]  # the lone U+2581 token
    assert tok.encode("😀😀😀") == [*word_start, tok.unk_id]
    assert tok.encode("😀 😀") == [*word_start, tok.unk_id] * 2
    assert tok.encode("") == tok.encode(" \t\n\u2581 ") == []


def random_text(rng: random.Random, alphabet: str) -> str:
    """Random mix of alphabet letters, whitespace and arbitrary non-surrogate code points."""
    out = []
    for _ in range(rng.randint(0, 60)):
        r = rng.random()
        if r < 0.7:
            out.append(rng.choice(alphabet))
        elif r < 0.85:
            out.append(rng.choice(" \t\n\r\v\f\u2581  "))
        else:
            c = rng.randint(0, 0x10FFFF)
            out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "?")
    return "".join(out)


def test_live_oracle(tok: BPETokenizer) -> None:
    yttm = pytest.importorskip("youtokentome")
    bpe = yttm.BPE(str(MODEL))
    rng = random.Random(1234)
    alphabet = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВЁЖabcdefghijklmnopqrstuvwxyzABC0123456789.,!?-«»"
    texts = [random_text(rng, alphabet) for _ in range(3000)]
    want = bpe.encode(texts, output_type=yttm.OutputType.ID, dropout_prob=0)
    mismatches = [(t, w) for t, w in zip(texts, want, strict=True) if tok.encode(t) != w]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]!r}"
    lowered = bpe.encode([t.lower() for t in texts], output_type=yttm.OutputType.ID, dropout_prob=0)
    want_rows = np.stack([ruclip_row(ids, 77) for ids in lowered])
    np.testing.assert_array_equal(tok.tokenize(texts), want_rows)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "bpe.model"
    with pytest.raises(CheckpointError, match="nope"):
        BPETokenizer.from_file(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff garbage \x89PNG",
        b"not a model at all\n",
        b"3 2\n9601 4\n97 5\n",  # truncated
        MODEL.read_bytes() + b"7 8 9\n",  # trailing junk
        b"1 0\n97 4\n1 0 2 3\n",  # no word-start character
    ],
)
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bpe.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        BPETokenizer.from_file(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        BPETokenizer.from_file(tmp_path)
