"""Exact and near-duplicate de-duplication across the whole dataset (not per shard).

Web crawls repeat the same image under many URLs; training on repeats over-weights them and
leaks evaluation images into training. Identity is the sha256 of the image bytes (what
img2dataset stores too) and, for ``mode="pair"``, the normalised caption as well, so one
image with several distinct captions survives while true repeats do not.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

DedupMode = Literal["image", "pair", "none"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SeenSet:
    """Remembers 16-byte digests of identities (~50 bytes each in a set: 100M items ~ 5 GB;
    a partitioned run keeps this set only in its merge, see data_tools/parts.py)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._seen)

    @staticmethod
    def digest(ident: str) -> bytes:
        """The 16 bytes stored for ``ident`` (what a part's identity index records)."""
        return hashlib.blake2b(ident.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def __contains__(self, ident: str) -> bool:
        return self.digest(ident) in self._seen

    def add(self, ident: str) -> None:
        self._seen.add(self.digest(ident))

    def has_digest(self, digest: bytes) -> bool:
        return digest in self._seen

    def add_digest(self, digest: bytes) -> None:
        self._seen.add(digest)

    def check_and_add(self, ident: str) -> bool:
        """True if ``ident`` was seen before; records it otherwise."""
        digest = self.digest(ident)
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


def pair_identity(mode: DedupMode, image_sha256: str, captions: list[str]) -> str | None:
    """What makes two pairs 'the same' under ``mode`` (None: never deduplicate)."""
    if mode == "none":
        return None
    if mode == "image":
        return image_sha256
    return image_sha256 + "\0" + "\n".join(c.lower() for c in captions)


def identity_digest(mode: DedupMode, image_sha256: str, captions: list[str]) -> bytes | None:
    """The exact-dedup identity as the 16 bytes :class:`SeenSet` keeps (None: never dedup)."""
    ident = pair_identity(mode, image_sha256, captions)
    return None if ident is None else SeenSet.digest(ident)


# --- near-duplicate images -------------------------------------------------------------------
# Exact hashes miss the commonest web duplicate: the same photo re-encoded, resized or with a
# different JPEG quality under another URL. A 64-bit DCT perceptual hash (imagehash.phash)
# changes by only a few bits under such edits, while unrelated photos differ in ~32 bits.


NEAR_DUP_DEFAULT = 4
"""Hamming distance (of 64 phash bits) at or below which two images count as the same
photo: re-encodes and resizes land at 0-4, unrelated photos around 32."""


def image_phash(image: Any) -> int:
    """64-bit perceptual hash of a PIL image as an int (hex in the sample json)."""
    import imagehash

    return int(str(imagehash.phash(image, hash_size=8)), 16)


def phash_hex(value: int) -> str:
    return f"{value:016x}"


class NearDupIndex:
    """Finds a stored 64-bit hash within Hamming distance ``d`` of a query, without O(N²).

    Multi-index hashing: split the 64 bits into d+1 disjoint bands. If two hashes differ in
    at most d bits, by pigeonhole at least one band is identical, so it suffices to look up
    each band of the query in that band's table and check only those candidates. With d=4
    each band has 12-13 bits: a query touches 5 buckets of ~N/2^12.8 hashes each, i.e.
    ~0.15% of the index instead of all of it (for d=0 it is one exact set lookup). Memory is
    one int per stored hash plus d+1 dict/list slots.
    """

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance < 32:
            raise ValueError(f"near-duplicate distance {max_distance} out of range 0..31")
        self.max_distance = max_distance
        n = max_distance + 1
        widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
        self._bands: list[tuple[int, int]] = []  # (shift, mask)
        shift = 0
        for w in widths:
            self._bands.append((shift, (1 << w) - 1))
            shift += w
        self._tables: list[dict[int, list[int]]] = [{} for _ in widths]
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def find(self, value: int) -> int | None:
        """A stored hash within the distance of ``value``, or None."""
        d = self.max_distance
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            for cand in table.get((value >> shift) & mask, ()):
                if (cand ^ value).bit_count() <= d:
                    return cand
        return None

    def add(self, value: int) -> None:
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            table.setdefault((value >> shift) & mask, []).append(value)
        self._n += 1
