"""Deduplication keys: exact (normalized text), URL, and MinHash LSH band keys for near duplicates.

Every document is reduced, where it is read, to a few 64-bit keys: the hash of its normalized text, the hash of
its normalized URL, and one hash per LSH band of its MinHash signature. Two documents are duplicates when they
share any key (near duplicates: any band, so with b bands of r rows a pair of Jaccard similarity s is caught with
probability 1 - (1 - s^r)^b; 14 x 8 puts the 50% point near s = 0.72). Grouping keys is a shuffle by key, done in
parallel partitions; only the groups with more than one member produce edges, and the connected components of
those edges are the duplicate clusters. The survivor of a cluster is its member with the smallest rank (source
order in the config, then file order, then record order), so the result is deterministic.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import xxhash

from gptline.data.filters import ngram_hashes

MERSENNE_61 = np.uint64((1 << 61) - 1)
MAX_HASH_32 = np.uint64(0xFFFFFFFF)
_PUNCT_RE = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation removed, whitespace collapsed: what 'the same text' means for dedup."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE_RE.sub(" ", _PUNCT_RE.sub(" ", text)).strip()


def text_key(text: str) -> int:
    return xxhash.xxh64_intdigest(normalize(text).encode())


def url_key(url: str) -> int:
    """Scheme, 'www.', fragment and a trailing slash do not make a different page."""
    url = url.strip().lower().split("#", 1)[0]
    url = re.sub(r"^[a-z]+://", "", url)
    url = url.removeprefix("www.").rstrip("/")
    return xxhash.xxh64_intdigest(url.encode())


class MinHasher:
    """MinHash signatures over word shingles with universal hashing (a*x + b mod 2^61-1), then LSH band keys."""

    def __init__(self, shingle_words: int, bands: int, rows: int, seed: int):
        self.shingle_words, self.bands, self.rows = shingle_words, bands, rows
        rng = np.random.default_rng(seed)
        permutations = bands * rows
        # a, b < 2^32 and x < 2^32 keep a*x + b inside uint64: no silent overflow.
        self.a = rng.integers(1, 1 << 32, size=permutations, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=permutations, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the distinct word n-grams (the whole text when it is shorter than n words)."""
        words = normalize(text).split()
        if not words:
            return np.empty(0, dtype=np.uint64)
        cache: dict[str, int] = {}
        hashed = np.fromiter(
            (cache.setdefault(w, xxhash.xxh64_intdigest(w.encode())) for w in words), dtype=np.uint64, count=len(words)
        )
        grams = ngram_hashes(hashed, min(self.shingle_words, len(words)))
        return np.unique(grams & MAX_HASH_32)

    def signature(self, text: str) -> np.ndarray:
        hashes = self.shingles(text)
        if hashes.size == 0:
            return np.full(self.bands * self.rows, MAX_HASH_32, dtype=np.uint64)
        permuted = (np.outer(hashes, self.a) + self.b) % MERSENNE_61 & MAX_HASH_32
        return permuted.min(axis=0)

    def band_keys(self, text: str) -> list[int]:
        """One 64-bit key per band; the band index is mixed in so equal rows in different bands never collide."""
        sig = self.signature(text).astype(np.uint32).reshape(self.bands, self.rows)
        return [xxhash.xxh64_intdigest(row.tobytes(), seed=band) for band, row in enumerate(sig)]


def unit_hash(seed: int, salt: str, ids: list[str]) -> np.ndarray:
    """A number in [0, 1) per id, fixed by (seed, purpose): sampling decisions that need no shared state."""
    return np.array([xxhash.xxh64_intdigest(f"{salt}\0{i}".encode(), seed=seed) / 2.0**64 for i in ids])


def jaccard(a: str, b: str, shingle_words: int) -> float:
    """Exact shingle Jaccard similarity (for tests and reports, not the hot path)."""
    hasher = MinHasher(shingle_words, 1, 1, 0)
    sa, sb = set(hasher.shingles(a).tolist()), set(hasher.shingles(b).tolist())
    return len(sa & sb) / max(1, len(sa | sb))


def group_edges(keys: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Edges (min rank of the group, other member) for every key shared by more than one rank."""
    if keys.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = np.lexsort((ranks, keys))
    keys, ranks = keys[order], ranks[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    leader = np.repeat(ranks[starts], np.diff(np.r_[starts, keys.size]))
    member = leader != ranks
    return np.stack([leader[member], ranks[member]], axis=1)


def duplicates_to_drop(edges: Iterable[np.ndarray]) -> set[int]:
    """Union-find over duplicate edges; every member of a cluster but its smallest rank is dropped."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for chunk in edges:
        for a, b in chunk.tolist():
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {x for x in parent if find(x) != x}
