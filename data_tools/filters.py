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
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON "\udcff", or input bytes that are not UTF-8
        return "text_unencodable"
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


def inspect_image(data: bytes, opts: FilterOptions) -> tuple[ImageInfo | None, str | None, Image.Image | None]:
    """Header checks first, then (with ``verify_decode``) one full decode. Returns (info,
    drop reason, decoded image) so hashing and resizing do not decode the bytes again."""
    if not data:
        return None, "image_empty", None
    if looks_like_html(data):
        return None, "image_is_html", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: parses the header only
            width, height = img.size
            fmt = (img.format or "").lower()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_many_pixels", None
    except Exception:
        return None, "image_undecodable", None
    if width * height > opts.max_pixels:
        return None, "image_too_many_pixels", None
    if min(width, height) < opts.min_side:
        return None, "image_too_small", None
    if max(width, height) / max(1, min(width, height)) > opts.max_aspect:
        return None, "image_bad_aspect", None
    loaded = None
    if opts.verify_decode:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
            loaded = img
        except Exception:
            return None, "image_truncated", None
    info = ImageInfo(format="jpg" if fmt in ("jpeg", "mpo") else fmt, width=width, height=height)
    return info, None, loaded


# Formats the trainer decodes (trainer/data.py IMAGE_EXTS); anything else is re-encoded.
STORED_FORMATS = ("jpg", "png", "webp")


@dataclass
class ImageOptions:
    """Optional re-encoding of kept images (smaller shards, uniform format)."""

    max_side: int = 0
    """Downscale (keeping the aspect ratio) so the longer side is at most this; 0 = never."""
    jpeg_quality: int = 90
    reencode: bool = False
    """Re-encode every image as JPEG (strips EXIF and odd codecs), not only resized ones."""

    def to_dict(self) -> dict:
        return asdict(self)


def reencode_image(img: Image.Image, info: ImageInfo, opts: ImageOptions) -> tuple[bytes, ImageInfo] | None:
    """JPEG bytes of ``img`` downscaled to ``max_side`` when needed; None to keep the original.

    Re-encodes when the image is larger than max_side, when ``reencode`` is set, or when its
    format is one the trainer cannot read (gif, bmp, tiff...). Alpha is composited on white,
    as a browser would show it, before dropping to RGB for JPEG.
    """
    too_big = opts.max_side > 0 and max(info.width, info.height) > opts.max_side
    if not (too_big or opts.reencode or info.format not in STORED_FORMATS):
        return None
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.split()[-1])
    else:
        rgb = img.convert("RGB")
    if too_big:
        scale = opts.max_side / max(info.width, info.height)
        size = (max(1, round(info.width * scale)), max(1, round(info.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=opts.jpeg_quality, optimize=False)
    return buf.getvalue(), ImageInfo("jpg", rgb.width, rgb.height)
