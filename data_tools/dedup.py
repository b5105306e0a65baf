"""Exact and near-duplicate de-duplication across the whole dataset (not per shard).

Web crawls repeat the same image under many URLs; training on repeats over-weights them and
leaks evaluation images into training. Identity is the sha256 of the image bytes (what
img2dataset stores too) and, for ``mode="pair"``, the normalised caption as well, so one
image with several distinct captions survives while true repeats do not.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
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


_PHASH_SIDE = 32  # hash_size 8 x highfreq_factor 4, imagehash's defaults
_dct_rows: Any = None


def _dct8() -> Any:
    """The first 8 rows of the 32-point DCT-II matrix, scaled as scipy.fftpack.dct's default."""
    global _dct_rows
    if _dct_rows is None:
        import numpy as np

        n = np.arange(_PHASH_SIDE)
        k = np.arange(8)[:, None]
        _dct_rows = 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * _PHASH_SIDE))
    return _dct_rows


_PRECISION = 22
"""Fixed-point fraction bits of Pillow's 8-bit resampling (Resample.c: 32 - 8 - 2)."""


@functools.lru_cache(maxsize=128)
def _lanczos_weights(in_size: int, out_size: int) -> Any:
    """(out_size, in_size) matrix of the integer weights Pillow's LANCZOS resize of 8-bit
    pixels uses along one axis, computed in its order of double operations (support 3
    scaled by the reduction, each row normalised to sum 1, rounded half away from zero
    to 22 fraction bits). Cached: photos come in a few sizes."""
    import numpy as np

    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    inv = 1.0 / filterscale

    def sinc(x: float) -> float:
        if x == 0.0:
            return 1.0
        x = x * math.pi
        return math.sin(x) / x

    out = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - lo
        ws = []
        for x in range(n):
            t = (x + lo - center + 0.5) * inv
            ws.append(sinc(t) * sinc(t / 3) if -3.0 <= t < 3.0 else 0.0)
        total = 0.0
        for w in ws:
            total += w
        for x, w in enumerate(ws):
            w = w / total if total != 0.0 else w
            out[xx, lo + x] = int(-0.5 + w * (1 << _PRECISION)) if w < 0 else int(0.5 + w * (1 << _PRECISION))
    return out


def _lanczos_passes(px: Any, side: int, rows_first: bool) -> Any:
    """``px`` (float64 grey pixels) resized to ``side`` x ``side`` with Pillow's LANCZOS
    arithmetic as two matrix products, each pass rounded and clipped to 8 bits as Pillow
    does. Every intermediate is an integer below 2^53, so float64 products are exact."""
    import numpy as np

    half, one = float(1 << (_PRECISION - 1)), float(1 << _PRECISION)
    across, down = _lanczos_weights(px.shape[1], side).T, _lanczos_weights(px.shape[0], side)
    if rows_first:
        tmp = np.clip(np.floor((px @ across + half) / one), 0, 255)
        return np.clip(np.floor((down @ tmp + half) / one), 0, 255)
    tmp = np.clip(np.floor((down @ px + half) / one), 0, 255)
    return np.clip(np.floor((tmp @ across + half) / one), 0, 255)


@functools.lru_cache(maxsize=4096)
def _pass_order(width: int, height: int, side: int) -> bool | None:
    """Which pass Pillow runs first for this input size (True: along rows), found by
    resizing a random picture of that size both ways and comparing with Pillow's own
    result; None when neither reproduces it (then :func:`image_phash` calls Pillow).
    Pillow 13 does not always run the row pass first, and a wrong order moves pixels by
    one level.
    Once per size per process: output images come in few sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 65537 + height)
    grey = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    want = np.asarray(grey.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)
    px = np.asarray(grey, dtype=np.float64)
    for rows_first in (True, False):
        if np.array_equal(_lanczos_passes(px, side, rows_first), want):
            return rows_first
    return None


def image_phash(image: Any) -> int:
    """64-bit perceptual hash of a PIL image as an int (hex in the sample json).

    imagehash.phash's algorithm, bit for bit (tests compare the two): grey, 32x32 LANCZOS,
    2-D DCT-II, the 8x8 lowest frequencies against their median, row by row, first bit
    highest. The resize is Pillow's arithmetic done as two matrix products, ~2.5x cheaper
    than its loop over every filter tap on a 341 x 256 image (:func:`_lanczos_passes`,
    checked against Pillow once per input size); only the 64
    DCT coefficients it keeps are computed (two small matrix products instead of two
    FFT-based transforms), without importing scipy. The coefficients are rounded to 1e-6
    before the comparison so that flat images, whose AC terms are zero up to
    floating-point noise, hash the same on every machine.
    """
    import numpy as np
    from PIL import Image

    grey = image if image.mode == "L" else image.convert("L")
    order = None if grey.size == (_PHASH_SIDE, _PHASH_SIDE) else _pass_order(*grey.size, _PHASH_SIDE)
    if order is None:  # also 32 x 32, which Pillow returns as it is
        px = np.asarray(grey.resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    else:
        px = _lanczos_passes(np.asarray(grey, dtype=np.float64), _PHASH_SIDE, order)
    m = _dct8()
    low = np.round(m @ px @ m.T, 6)
    ranked = np.sort(low, axis=None)
    bits = low > (ranked[31] + ranked[32]) / 2  # np.median of the 64, without its generic machinery
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_hex(value: int) -> str:
    return f"{value:016x}"


def _band_plan(n: int, d: int) -> tuple[int, int]:
    """(bands m, probe radius r) that make a lookup cheapest with ``n`` stored hashes.

    Generalised pigeonhole: if two hashes differ in at most d bits, one of m disjoint bands
    differs in at most r = d // m bits, so probing every value within radius r of each of
    the query's m band values finds every match. Cost = probes + 2 x expected candidates
    (a candidate is an xor + popcount); candidates per probe are n / 2^width.
    """
    best: tuple[float, int, int] | None = None
    for m in range(1, d + 2):
        r = d // m
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        per_band = [sum(math.comb(w, k) for k in range(r + 1)) for w in widths]
        cost = sum(per_band) + 2 * sum(p * n / 2 ** w for p, w in zip(per_band, widths, strict=True))
        if best is None or cost < best[0]:
            best = (cost, m, r)
    assert best is not None
    return best[1], best[2]


class NearDupIndex:
    """Finds a stored 64-bit hash within Hamming distance ``d`` of a query, without O(N²).

    Multi-index hashing: split the 64 bits into m disjoint bands. If two hashes differ in at
    most d bits, by pigeonhole one band differs in at most r = d // m bits, so it suffices to
    probe each band's table at the query's band value and its neighbours within r bits, and
    check only the hashes found there. Small indexes use m = d+1 bands (r = 0: one exact
    lookup per band; with d=4, 5 bands of ~13 bits). As the index grows those buckets fill
    (N/2^13 hashes each), so at every doubling the index re-plans m and r for the cheapest
    lookup (:func:`_band_plan`) and rebuilds once: with d=4, 3 bands probed at radius 1 from
    ~3M hashes, 2 bands of 32 bits at radius 2 from ~40M. A lookup then costs about the
    same at 10M hashes as at 10k. The answer is exact either way; only the work changes.
    Memory: m dict entries per stored hash (a bucket of one holds the int itself).
    """

    def __init__(self, max_distance: int, plan: tuple[int, int] | None = None) -> None:
        """``plan`` = (bands, radius) fixes the layout (it must satisfy radius >= d // bands);
        by default it adapts to the index size."""
        if not 0 <= max_distance < 32:
            raise ValueError(f"near-duplicate distance {max_distance} out of range 0..31")
        if plan is not None and not (1 <= plan[0] <= 64 and plan[1] >= max_distance // plan[0]):
            raise ValueError(f"plan {plan} misses matches at distance {max_distance}")
        self.max_distance = max_distance
        self._n = 0
        self._next_plan = 1024 if plan is None else math.inf
        self._layout(*(plan or (max_distance + 1, 0)))

    def _layout(self, m: int, r: int) -> None:
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        self._bands: list[tuple[int, int, list[int]]] = []  # (shift, mask, probe xor masks)
        shift = 0
        for w in widths:
            probes = [sum(1 << b for b in bits) for k in range(r + 1) for bits in itertools.combinations(range(w), k)]
            self._bands.append((shift, (1 << w) - 1, probes))
            shift += w
        self._tables: list[dict[int, Any]] = [{} for _ in widths]
        self.plan = (m, r)

    def __len__(self) -> int:
        return self._n

    def find(self, value: int) -> int | None:
        """A stored hash within the distance of ``value``, or None."""
        d = self.max_distance
        for (shift, mask, probes), table in zip(self._bands, self._tables, strict=True):
            key = (value >> shift) & mask
            for x in probes:
                bucket = table.get(key ^ x)
                if bucket is None:
                    continue
                if isinstance(bucket, int):
                    if (bucket ^ value).bit_count() <= d:
                        return bucket
                    continue
                for cand in bucket:
                    if (cand ^ value).bit_count() <= d:
                        return cand
        return None

    def _insert(self, value: int) -> None:
        for (shift, mask, _), table in zip(self._bands, self._tables, strict=True):
            key = (value >> shift) & mask
            bucket = table.get(key)
            if bucket is None:
                table[key] = value
            elif isinstance(bucket, int):
                table[key] = [bucket, value]
            else:
                bucket.append(value)

    def add(self, value: int) -> None:
        self._insert(value)
        self._n += 1
        if self._n >= self._next_plan:
            self._next_plan *= 2
            plan = _band_plan(self._n, self.max_distance)
            if plan != self.plan:
                values = [v for b in self._tables[0].values() for v in ((b,) if isinstance(b, int) else b)]
                self._layout(*plan)
                for v in values:
                    self._insert(v)
