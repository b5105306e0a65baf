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


def inspect_image(data: bytes, opts: FilterOptions, images: ImageOptions | None = None,
                  ) -> tuple[ImageInfo | None, str | None, Image.Image | None]:
    """Header checks first, then at most one decode: with ``verify_decode``, or when
    ``images`` resizes or re-encodes. Returns (info, drop reason, decoded image) so hashing
    and resizing reuse the pixels. ``info`` keeps the original size; a JPEG whose output is
    at most half its size is decoded at a reduced scale (:func:`draft_for`)."""
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
    info = ImageInfo(format="jpg" if fmt in ("jpeg", "mpo") else fmt, width=width, height=height)
    pixels = images is not None and (images.resize_mode != "no" or images.reencode or info.format not in STORED_FORMATS)
    loaded = None
    if opts.verify_decode or pixels:
        try:
            if images is not None:
                draft_for(img, info, images)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
            loaded = img
        except Exception:
            return None, "image_truncated", None
    return info, None, loaded


# Formats the trainer decodes (trainer/data.py IMAGE_EXTS); anything else is re-encoded.
STORED_FORMATS = ("jpg", "png", "webp")

#: img2dataset's resize modes, with its meaning (see docs/DATA.md, "Resizing"):
#: keep_ratio: shorter side to image_size; keep_ratio_largest: longer side to image_size;
#: center_crop: keep_ratio, then the centred image_size square; border: keep_ratio_largest,
#: then white padding to the image_size square; no: the original bytes stay.
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")


@dataclass
class ImageOptions:
    """How kept images are stored: as downloaded (``no``), or resized and re-encoded as JPEG."""

    resize_mode: str = "no"
    image_size: int = 0
    """Target side in pixels for every mode but ``no``."""
    upscale: bool = False
    """Also enlarge images smaller than the target (img2dataset does unless
    ``--resize_only_if_bigger``); off, a small image is kept at its size."""
    jpeg_quality: int = 90
    reencode: bool = False
    """Re-encode every image as JPEG (strips EXIF and odd codecs), not only resized ones."""

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"--resize-mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.resize_mode != "no" and self.image_size < 1:
            raise ValueError(f"--resize-mode {self.resize_mode} needs --image-size N (pixels, at least 1)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality {self.jpeg_quality}: give 1..100")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Geometry:
    """What a resize mode does to one image: scale to ``scaled`` (None: keep the size), then
    crop to ``crop`` (left, top, right, bottom) or pad onto a ``canvas`` square at ``offset``."""

    scaled: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    canvas: int = 0
    offset: tuple[int, int] = (0, 0)

    @property
    def changes(self) -> bool:
        return self.scaled is not None or self.crop is not None or self.canvas > 0


def geometry(width: int, height: int, opts: ImageOptions) -> Geometry:
    """Output geometry of a ``width`` x ``height`` image under ``opts`` (img2dataset's rules).

    The scale is ``size / shorter side`` (keep_ratio, center_crop) or ``size / longer side``
    (keep_ratio_largest, border), each new side ``max(1, round(side * scale))``. Without
    ``upscale`` a scale above 1 becomes 1. center_crop then cuts the centred square when
    both sides reach the size; border pads to the square, centred, white (also an image
    kept small for want of ``upscale``: padding is not enlarging).
    """
    mode, size = opts.resize_mode, opts.image_size
    if mode == "no":
        return Geometry()
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    scaled: tuple[int, int] | None = None
    w, h = width, height
    if side != size and (side > size or opts.upscale):
        scale = size / side
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        scaled = (w, h)
    if mode == "center_crop" and w >= size and h >= size and (w, h) != (size, size):
        left, top = (w - size) // 2, (h - size) // 2
        return Geometry(scaled, crop=(left, top, left + size, top + size))
    if mode == "border" and (w, h) != (size, size):
        return Geometry(scaled, canvas=size, offset=((size - w) // 2, (size - h) // 2))
    return Geometry(scaled)


def _rgb(img: Image.Image) -> Image.Image:
    """RGB (or L) pixels for JPEG; alpha is composited on white, as a browser shows it."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.split()[-1])
        return rgb
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def draft_for(img: Image.Image, info: ImageInfo, opts: ImageOptions) -> None:
    """Before the decode: let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT
    domain when the output is at most that large, which skips most of the decode's work
    on big photos. The decoded image is never smaller than the scaled size."""
    if info.format != "jpg" or not hasattr(img, "draft"):
        return
    g = geometry(info.width, info.height, opts)
    if g.scaled is not None and 2 * g.scaled[0] <= info.width and 2 * g.scaled[1] <= info.height:
        img.draft(img.mode if img.mode in ("RGB", "L") else None, g.scaled)


def resize_image(img: Image.Image, info: ImageInfo, opts: ImageOptions) -> tuple[Image.Image, Geometry]:
    """The decoded image scaled per ``opts`` (before any crop or pad: what the phash is
    taken from), and the geometry still to apply."""
    g = geometry(info.width, info.height, opts)
    if g.scaled is not None and img.size != g.scaled:
        # BOX averages the source pixels each output pixel covers (img2dataset's "area"
        # filter); enlarging uses LANCZOS (img2dataset's too).
        up = g.scaled[0] > img.width
        img = _rgb(img).resize(g.scaled, Image.Resampling.LANCZOS if up else Image.Resampling.BOX)
    return img, g


def encode_image(img: Image.Image, info: ImageInfo, g: Geometry,
                 opts: ImageOptions) -> tuple[bytes, ImageInfo] | None:
    """JPEG bytes of ``img`` (already scaled) cropped or padded per ``g``; None to keep the
    original bytes: unchanged size, format the trainer reads, and no ``reencode``."""
    if not (g.changes or opts.reencode or info.format not in STORED_FORMATS):
        return None
    rgb = _rgb(img)
    if g.crop is not None:
        rgb = rgb.crop(g.crop)
    elif g.canvas:
        canvas = Image.new(rgb.mode, (g.canvas, g.canvas), 255 if rgb.mode == "L" else (255, 255, 255))
        canvas.paste(rgb, g.offset)
        rgb = canvas
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=opts.jpeg_quality)
    return buf.getvalue(), ImageInfo("jpg", rgb.width, rgb.height)
