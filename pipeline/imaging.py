"""Decode, validate and normalize one image's bytes. Pure: bytes in, a result or a rejection out."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.reasons import Reason

# Never paper over a truncated file: it must be reported, not half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel limit (NormalizeParams.max_pixels) decides; Pillow's warning would only add noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

# The final resize's filters, sharpest (and slowest) first; bench/resample.py measures them.
FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class NormalizeParams:
    min_side: int = 64
    max_pixels: int = 50_000_000
    target_side: int = 256
    resize_side: str = "short"
    upscale: bool = False
    jpeg_quality: int = 90
    resample: str = "lanczos"  # a key of FILTERS: the final resize's filter


@dataclass
class Normalized:
    jpeg: bytes
    jpeg_sha256: str
    pixel_sha256: str
    phash: str
    format: str
    mode: str
    width: int
    height: int
    orig_width: int
    orig_height: int


@dataclass
class Rejected:
    reason: Reason
    detail: str
    format: str | None = None
    mode: str | None = None
    orig_width: int | None = None
    orig_height: int | None = None


def _looks_like_svg(head: bytes) -> bool:
    text = head[:2048].lstrip().lower()
    return text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text)


def _looks_like_markup(head: bytes) -> bool:
    text = head[:512].lstrip().lower()
    return text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{", b"<"))


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF: treat as upright
        orientation = 1
    return (h, w) if orientation in _ROTATING_ORIENTATIONS else (w, h)


def _target_size(w: int, h: int, p: NormalizeParams) -> tuple[int, int]:
    side = min(w, h) if p.resize_side == "short" else max(w, h)
    scale = p.target_side / side
    if scale >= 1 and not p.upscale:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if im.mode == "F":
            hi = float(arr.max()) or 1.0
            arr8 = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        else:  # 16-bit data: keep the top 8 bits
            arr8 = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def normalize_bytes(data: bytes, p: NormalizeParams) -> Normalized | Rejected:
    """Validate and normalize one image; every failure mode becomes a ``Rejected`` with a reason."""
    if not data:
        return Rejected(Reason.EMPTY_FILE, "zero bytes")
    if _looks_like_svg(data):
        return Rejected(Reason.UNSUPPORTED_FORMAT, "SVG (vector image)", format="SVG")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        what = "markup (HTML/XML/JSON)" if _looks_like_markup(data) else "unknown format"
        return Rejected(Reason.NOT_AN_IMAGE, f"not an image: {what}")
    except Image.DecompressionBombError as exc:
        return Rejected(Reason.DECOMPRESSION_BOMB, str(exc))
    except Exception as exc:  # a malformed header can raise anything
        return Rejected(Reason.DECODE_ERROR, f"{type(exc).__name__}: {exc}")

    fmt, mode = im.format or "unknown", im.mode
    w, h = im.size
    if w * h > p.max_pixels:
        return Rejected(Reason.DECOMPRESSION_BOMB, f"{w}x{h} pixels > {p.max_pixels}", fmt, mode, w, h)
    ow, oh = _oriented_size(im)
    if min(ow, oh) < p.min_side:
        return Rejected(Reason.TOO_SMALL, f"{ow}x{oh}, min side {p.min_side}", fmt, mode, ow, oh)

    tw, th = _target_size(ow, oh, p)
    try:
        if fmt == "JPEG" and (tw, th) != (ow, oh):
            # Decode at a reduced scale (a power of two, never below the target): much faster.
            im.draft(im.mode, (tw, th) if (ow, oh) == (w, h) else (th, tw))
        im.load()
        im = ImageOps.exif_transpose(im) or im
        rgb = to_rgb(im)
    except (OSError, EOFError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        reason = (
            Reason.TRUNCATED
            if ("truncated" in msg.lower() or isinstance(exc, EOFError))
            else Reason.DECODE_ERROR
        )
        return Rejected(reason, f"{type(exc).__name__}: {msg}", fmt, mode, ow, oh)

    if rgb.size != (tw, th):
        rgb = rgb.resize((tw, th), FILTERS[p.resample], reducing_gap=3.0)
    pixels = np.asarray(rgb)
    pixel_sha = hashlib.sha256(pixels.tobytes() + repr(pixels.shape).encode()).hexdigest()
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=p.jpeg_quality)
    jpeg = buf.getvalue()
    return Normalized(
        jpeg=jpeg,
        jpeg_sha256=hashlib.sha256(jpeg).hexdigest(),
        pixel_sha256=pixel_sha,
        phash=str(imagehash.phash(rgb)),
        format=fmt,
        mode=mode,
        width=tw,
        height=th,
        orig_width=ow,
        orig_height=oh,
    )
