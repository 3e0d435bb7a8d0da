"""Pure-Python reader and encoder for youtokentome's ``bpe.model``, giving the same ids as youtokentome.

RuCLIP ships its text tokenizer in youtokentome's format; reading it ourselves keeps youtokentome
(no wheels, fragile builds) out of our dependencies.
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CheckpointError

__all__ = ["BPETokenizer"]

# youtokentome marks the start of each word with this character (U+2581); it also counts as a space.
WORD_START = 0x2581
# youtokentome's is_space: C isspace() for chars below 256 (only \t \n \v \f \r and space) plus U+2581.
_WORD_RE = re.compile("[^\t\n\v\f\r \u2581]+")
# Ids for runs of unknown characters start here, above any real id, so no merge rule can touch them.
_UNKNOWN_BASE = 10**9
_CACHE_LIMIT = 100_000


class BPETokenizer:
    """A youtokentome BPE model: encodes text to the ids youtokentome gives with dropout off."""

    # The reference RuCLIP processor hardcodes these, whatever the model file stores.
    RUCLIP_PAD_ID = 0
    RUCLIP_BOS_ID = 2
    RUCLIP_EOS_ID = 3

    def __init__(
        self,
        char2id: dict[int, int],
        rules: Sequence[tuple[int, int, int]],
        pad_id: int,
        unk_id: int,
        bos_id: int,
        eos_id: int,
    ) -> None:
        """Build from parsed model parts; most callers want :meth:`from_file`."""
        if WORD_START not in char2id:
            raise ValueError("the model has no id for the word-start character U+2581")
        self._char2id = {chr(c): i for c, i in char2id.items()}
        self._space_id = char2id[WORD_START]
        self._rules = list(rules)
        # A later rule for the same pair wins, as in youtokentome.
        self._rule2id = {(x, y): i for i, (x, y, _) in enumerate(self._rules)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = pad_id, unk_id, bos_id, eos_id
        n_special = sum(i != -1 for i in (pad_id, unk_id, bos_id, eos_id))
        self.vocab_size: int = len(char2id) + len(self._rules) + n_special
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a youtokentome ``bpe.model``; raise CheckpointError if it is missing or malformed."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"Tokenizer file {path} does not exist; download the model again or point to the folder "
                "that holds its bpe.model."
            ) from None
        except OSError as exc:
            raise CheckpointError(f"Cannot read tokenizer file {path}: {exc}.") from exc
        try:
            return cls._parse(data)
        except ValueError as exc:
            raise CheckpointError(
                f"Tokenizer file {path} is not a valid youtokentome BPE model ({exc}); "
                "delete it and download the model again."
            ) from None

    @classmethod
    def _parse(cls, data: bytes) -> BPETokenizer:
        """Parse the text format: 'n m', n lines 'char id', m lines 'x y z', then 'unk pad bos eos'."""
        fields = data.split()
        if len(fields) < 2:
            raise ValueError("file is empty or truncated")
        nums = [int(f) for f in fields]
        n, m = nums[0], nums[1]
        if n < 0 or m < 0 or len(nums) != 2 + 2 * n + 3 * m + 4:
            raise ValueError(f"expected {n} chars and {m} rules, found {len(nums)} numbers")
        chars = nums[2 : 2 + 2 * n]
        char2id = dict(zip(chars[0::2], chars[1::2], strict=True))
        if any(not 0 <= c < 0x110000 for c in char2id):
            raise ValueError("a character code is out of the Unicode range")
        flat = nums[2 + 2 * n : 2 + 2 * n + 3 * m]
        rules = list(zip(flat[0::3], flat[1::3], flat[2::3], strict=True))
        if any(v < 0 for v in chars[1::2]) or any(v < 0 for v in flat):
            raise ValueError("negative token id")
        unk_id, pad_id, bos_id, eos_id = nums[-4:]
        if any(i < -1 for i in (unk_id, pad_id, bos_id, eos_id)):
            raise ValueError("bad special token id")
        return cls(char2id, rules, pad_id=pad_id, unk_id=unk_id, bos_id=bos_id, eos_id=eos_id)

    def encode(self, text: str) -> list[int]:
        """Ids for ``text``, equal to youtokentome's ``encode([text], output_type=ID, dropout_prob=0)[0]``."""
        cache = self._cache
        out: list[int] = []
        for word in _WORD_RE.findall(text):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                ids = cache[word] = self._encode_word(word)
            out.extend(ids)
        return out

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Apply merge rules to one word (prefixed with U+2581) in youtokentome's order."""
        char2id = self._char2id
        tokens = [self._space_id]
        next_unknown = _UNKNOWN_BASE
        in_unknown = False
        for ch in word:
            cid = char2id.get(ch)
            if cid is None:
                # A run of unknown characters becomes one token, later written as unk_id.
                if not in_unknown:
                    tokens.append(next_unknown)
                    next_unknown += 1
                    in_unknown = True
            else:
                tokens.append(cid)
                in_unknown = False

        size = len(tokens)
        prev = list(range(-1, size - 1))
        nxt = list(range(1, size + 1))
        nxt[-1] = -1
        rule2id, rules = self._rule2id, self._rules
        heap = []
        for pos in range(size - 1):
            rule = rule2id.get((tokens[pos], tokens[pos + 1]))
            if rule is not None:
                heap.append((rule, pos))
        heapq.heapify(heap)
        # Lowest rule id first, leftmost position on ties; stale events are checked and skipped.
        while heap:
            rule, p1 = heapq.heappop(heap)
            x, y, z = rules[rule]
            p2 = nxt[p1]
            if tokens[p1] != x or p2 == -1 or tokens[p2] != y:
                continue
            p0, p3 = prev[p1], nxt[p2]
            tokens[p2], prev[p2], nxt[p2] = 0, -1, -1
            tokens[p1], nxt[p1] = z, p3
            if p3 != -1:
                prev[p3] = p1
            if p0 != -1:
                r = rule2id.get((tokens[p0], z))
                if r is not None:
                    heapq.heappush(heap, (r, p0))
            if p3 != -1:
                r = rule2id.get((z, tokens[p3]))
                if r is not None:
                    heapq.heappush(heap, (r, p1))

        # youtokentome starts from the first node whose id is not 0 and follows the links.
        pos = next((i for i, t in enumerate(tokens) if t != 0), -1)
        out = []
        while pos != -1:
            t = tokens[pos]
            out.append(self.unk_id if t >= _UNKNOWN_BASE else t)
            pos = nxt[pos]
        return tuple(out)

    def tokenize(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
        """Token matrix (N, context_length) int64 built exactly as RuCLIP's processor does.

        Each row is lower-cased text → [2] + ids[:context_length - 2] + [3], right-padded with 0.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), context_length), self.RUCLIP_PAD_ID, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text.lower())[: context_length - 2]
            out[row, 0] = self.RUCLIP_BOS_ID
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.RUCLIP_EOS_ID
        return out
