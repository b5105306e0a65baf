"""Caption cleaning and image checks; every rejection returns a reason to be counted.

Image checks read only the header before any decode, so a decompression bomb (a 30000x30000
PNG of a few KB) is rejected by its declared size and never allocates its pixels.
"""

from __future__ import annotations

import html
import io
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

from PIL import Image

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]{1,200}>")


@dataclass
class FilterOptions:
    """Thresholds of the basic filters (DataComp's 'basic' uses min_side 200, aspect 3)."""

    min_caption_chars: int = 5
    min_caption_words: int = 2
    max_caption_chars: int = 1000
    min_side: int = 32
    max_aspect: float = 6.0
    max_pixels: int = 50_000_000
    verify_decode: bool = True
    """Fully decode every image once, catching truncated files that headers do not reveal."""

    def to_dict(self) -> dict:
        return asdict(self)


class DropCounter(Counter):
    """Reason -> count. Kept per run and written to the manifest."""

    def drop(self, reason: str) -> None:
        self[reason] += 1


def normalize_caption(text: str) -> str:
    """Unescape HTML entities, strip tags and control characters, NFC, collapse whitespace."""
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def caption_problem(text: str, opts: FilterOptions) -> str | None:
    if not text:
        return "caption_empty"
    if len(text) < opts.min_caption_chars or len(text.split()) < opts.min_caption_words:
        return "caption_too_short"
    if len(text) > opts.max_caption_chars:
        return "caption_too_long"
    return None


def looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or (
        head.startswith(b"<") and b"<html" in data[:4096].lower()
    )


@dataclass
class ImageInfo:
    format: str
    width: int
    height: int


def check_image(data: bytes, opts: FilterOptions) -> tuple[ImageInfo | None, str | None]:
    """Header checks first, then (optionally) one full decode. Returns (info, drop reason)."""
    if not data:
        return None, "image_empty"
    if looks_like_html(data):
        return None, "image_is_html"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: parses the header only
            width, height = img.size
            fmt = (img.format or "").lower()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_many_pixels"
    except Exception:
        return None, "image_undecodable"
    if width * height > opts.max_pixels:
        return None, "image_too_many_pixels"
    if min(width, height) < opts.min_side:
        return None, "image_too_small"
    if max(width, height) / max(1, min(width, height)) > opts.max_aspect:
        return None, "image_bad_aspect"
    if opts.verify_decode:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        except Exception:
            return None, "image_truncated"
    return ImageInfo(format="jpg" if fmt in ("jpeg", "mpo") else fmt, width=width, height=height), None
