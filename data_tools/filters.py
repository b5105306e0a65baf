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

import numpy as np
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


Pixels = Image.Image | np.ndarray
"""A decoded image: Pillow's, or libjpeg-turbo's array (:func:`decode_jpeg`)."""


@dataclass
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image(data: bytes, opts: FilterOptions, images: ImageOptions | None = None,
                  ) -> tuple[ImageInfo | None, str | None, Pixels | None]:
    """Header checks first, then at most one decode: with ``verify_decode``, or when
    ``images`` resizes or re-encodes. Returns (info, drop reason, decoded pixels) so hashing
    and resizing reuse them. ``info`` keeps the original size. A YCbCr or greyscale JPEG is
    read and decoded by libjpeg-turbo at a reduced scale that still covers the output
    (:func:`decode_jpeg`); anything it refuses (other formats, CMYK, a warning such as a
    truncated file) goes through Pillow, which decides as it always has."""
    if not data:
        return None, "image_empty", None
    if looks_like_html(data):
        return None, "image_is_html", None
    img: Image.Image | None = None
    head = _jpeg_header(data)
    if head is not None:  # libjpeg-turbo read the header (~2 us; Pillow's open takes ~15x that)
        width, height, fmt = head[0], head[1], "jpeg"
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            return None, "image_too_many_pixels", None  # where Pillow's open would warn
    else:
        opened = _open(data)
        if isinstance(opened, str):
            return None, opened, None
        img = opened
        (width, height), fmt = img.size, (img.format or "").lower()
    if width * height > opts.max_pixels:
        return None, "image_too_many_pixels", None
    if min(width, height) < opts.min_side:
        return None, "image_too_small", None
    if max(width, height) / max(1, min(width, height)) > opts.max_aspect:
        return None, "image_bad_aspect", None
    info = ImageInfo(format="jpg" if fmt in ("jpeg", "mpo") else fmt, width=width, height=height)
    pixels = images is not None and (images.resize_mode != "no" or images.reencode or info.format not in STORED_FORMATS)
    if not (opts.verify_decode or pixels):
        return info, None, None
    if head is not None:
        fast = decode_jpeg(data, *head, images)
        if fast is not None:
            return info, None, fast
    if img is None:
        opened = _open(data)
        if isinstance(opened, str):
            return None, opened, None
        img = opened
    try:
        if images is not None:
            draft_for(img, info, images)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception:
        return None, "image_truncated", None
    return info, None, img


def _open(data: bytes) -> Image.Image | str:
    """Pillow's lazy open (header only), or the drop reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image_too_many_pixels"
    except Exception:
        return "image_undecodable"


def _jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, pixels to ask for) of a JPEG that :func:`decode_jpeg` can decode,
    from libjpeg-turbo's header parse; None for anything else (Pillow then opens it)."""
    if data[:2] != b"\xff\xd8":
        return None
    import simplejpeg

    try:
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    target = _JPEG_SPACES.get(space)
    return None if target is None else (width, height, target)


# Formats the trainer decodes (trainer/data.py IMAGE_EXTS); anything else is re-encoded.
STORED_FORMATS = ("jpg", "png", "webp")

#: img2dataset's resize modes, with its meaning (see docs/DATA.md, "Resizing"):
#: keep_ratio: shorter side to image_size; keep_ratio_largest: longer side to image_size;
#: center_crop: keep_ratio, then the centred image_size square; border: keep_ratio_largest,
#: then white padding to the image_size square; no: the original bytes stay.
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")

#: How a downscale ends (:func:`resize_image`): ``fast``, a bilinear step after the reduced
#: JPEG decode; ``area``, an exact area average (OpenCV INTER_AREA, img2dataset's filter).
RESIZE_FILTERS = ("fast", "area")


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
    resize_filter: str = "fast"
    """``fast``: the reduced JPEG decode finished by a bilinear step under 2x; ``area``: every
    downscale ends in an exact area average, as img2dataset's does (closer to the ideal box
    downscale, ~2 CPU-ms more per 640-px photo: docs/BENCHMARKS.md, data-stages)."""

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"--resize-mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"--resize-filter {self.resize_filter!r}: choose one of {', '.join(RESIZE_FILTERS)}")
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
    """RGB (or L, or RGBX: RGB with a padding byte, which JPEG stores as RGB) pixels for
    JPEG; alpha is composited on white, as a browser shows it."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.split()[-1])
        return rgb
    return img if img.mode in ("RGB", "L", "RGBX") else img.convert("RGB")


def decode_jpeg(data: bytes, width: int, height: int, target: str, opts: ImageOptions | None,
                ) -> np.ndarray | None:
    """The pixels of a JPEG whose header :func:`_jpeg_header` read (H x W x 4 RGBX, or H x W
    grey for ``target`` GRAY) from libjpeg-turbo, decoded at the smallest of the scales 1,
    1/2, 1/4, 1/8 that is still at least the output size; or None to let Pillow decode it
    (any libjpeg warning: strict decoding turns a truncated or damaged file into a refusal,
    and Pillow then reports it as it always has).

    Why these scales: libjpeg-turbo's inverse DCT is SIMD code at full, 1/2 and 1/4 size (1/8
    keeps only the DC term); its other n/8 scales are plain C and cost more than a full
    decode. What is left to :func:`resize_image` is then under 2x except past 1/8. Decoding
    reads every coefficient at any scale, so a file cut short is still caught."""
    import simplejpeg

    g = geometry(width, height, opts) if opts is not None else Geometry()
    k = 1
    if g.scaled is not None:
        while k < 8 and -(-width // (2 * k)) >= g.scaled[0] and -(-height // (2 * k)) >= g.scaled[1]:
            k *= 2
    try:
        # simplejpeg picks the largest reduction whose output is at least these sizes: 1/k's own.
        px = simplejpeg.decode_jpeg(data, colorspace=target, min_width=-(-width // k) if k > 1 else 0,
                                    min_height=-(-height // k) if k > 1 else 0, strict=True)
    except ValueError:
        return None
    return px[:, :, 0] if target == "GRAY" else px


_JPEG_SPACES = {"YCbCr": "RGBX", "Gray": "GRAY"}
"""JPEG colour spaces decoded by :func:`decode_jpeg`, and the pixels asked for: RGBX is
Pillow's own memory layout for RGB, so the resized pixels become a Pillow image without a
copy (:func:`resize_image`). Pillow handles the rest (Adobe CMYK/YCCK need its inversion
rules)."""


def draft_for(img: Image.Image, info: ImageInfo, opts: ImageOptions) -> None:
    """Pillow's reduced decode (1/2, 1/4 or 1/8 only) for the JPEGs :func:`decode_jpeg` leaves
    to it, when the output is at most that large. Never smaller than the scaled size."""
    if info.format != "jpg" or not hasattr(img, "draft"):
        return
    g = geometry(info.width, info.height, opts)
    if g.scaled is not None and 2 * g.scaled[0] <= info.width and 2 * g.scaled[1] <= info.height:
        img.draft(img.mode if img.mode in ("RGB", "L") else None, g.scaled)


def resize_image(img: Pixels, info: ImageInfo, opts: ImageOptions) -> tuple[Image.Image, Geometry]:
    """The decoded image scaled per ``opts`` (before any crop or pad: what the phash is
    taken from), and the geometry still to apply.

    Pixels from :func:`decode_jpeg` are within 2x of the output (unless over 8x it): OpenCV's
    bilinear filter finishes such a reduction, and area averaging a larger one. On the
    benchmark's photos the result is closer to an exact area average than Pillow's BOX from
    full size, at a tenth of the cost (docs/BENCHMARKS.md, data-stages). ``resize_filter``
    ``area`` ends every downscale in an exact area average instead (OpenCV INTER_AREA). Other
    Pillow images use BOX, which averages the source pixels whose centres each output pixel
    covers. Enlarging (``upscale``) uses LANCZOS, as img2dataset does."""
    g = geometry(info.width, info.height, opts)
    if (opts.resize_filter == "area" and isinstance(img, Image.Image) and g.scaled is not None
            and g.scaled[0] < img.width):  # Pillow's BOX weighs whole pixels, not their coverage
        img = np.asarray(_rgb(img))
    if isinstance(img, np.ndarray):
        h, w = img.shape[:2]
        if g.scaled is not None and (w, h) != g.scaled and g.scaled[0] < w:
            import cv2

            if cv2.getNumThreads() != 1:
                cv2.setNumThreads(1)  # one image per call; the parallelism is the worker processes
            area = opts.resize_filter == "area" or w > 2 * g.scaled[0] or h > 2 * g.scaled[1]
            img = cv2.resize(img, g.scaled, interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)
        img = np.ascontiguousarray(img)
        if img.ndim == 2 or img.shape[2] == 4:
            mode = "L" if img.ndim == 2 else "RGBX"
            img = Image.frombuffer(mode, (img.shape[1], img.shape[0]), img, "raw", mode, 0, 1)  # shares the array
        else:
            img = Image.fromarray(img)
    if g.scaled is not None and img.size != g.scaled:
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
        canvas = Image.new(rgb.mode, (g.canvas, g.canvas), 255 if rgb.mode == "L" else (255,) * len(rgb.mode))
        canvas.paste(rgb, g.offset)
        rgb = canvas
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=opts.jpeg_quality)
    return buf.getvalue(), ImageInfo("jpg", rgb.width, rgb.height)
