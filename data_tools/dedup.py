"""Exact de-duplication across the whole dataset (not per shard).

Web crawls repeat the same image under many URLs; training on repeats over-weights them and
leaks evaluation images into training. Identity is the sha256 of the image bytes (what
img2dataset stores too) and, for ``mode="pair"``, the normalised caption as well, so one
image with several distinct captions survives while true repeats do not.
"""

from __future__ import annotations

import hashlib
from typing import Literal

DedupMode = Literal["image", "pair", "none"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SeenSet:
    """Remembers 16-byte digests of identities (~50 bytes each in a set: 100M items ~ 5 GB;
    beyond that, partition the input by hash prefix across machines)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, ident: str) -> bool:
        """True if ``ident`` was seen before; records it otherwise."""
        digest = hashlib.blake2b(ident.encode("utf-8"), digest_size=16).digest()
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
