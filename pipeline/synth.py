"""Deterministic generator of a Food-101-layout sample dataset with ground truth.

Each image shows one class-specific object (a shape filled with a texture in a colour pair) on a
cluttered background, so a classifier that sees the whole image does clearly worse than one that sees
the object. With ``backgrounds="real"`` the background is a crop of a photograph bundled with
scikit-learn or scikit-image instead (:mod:`pipeline.photos`), with decoys on it. On top of the clean
images the generator injects label flips, exact and near duplicates, hard negatives (another object on
the same background: distinct images that a perceptual hash confuses) and hostile files (wrong
formats, truncated, tiny, bombs, odd colour modes, EXIF rotation), and writes a
``ground_truth.parquet`` saying what each file is and what a correct validator should make of it.

Layout under the root::

    images/<class>/<id>.jpg      every file is named .jpg whatever its real format
    meta/classes.txt             one class per line, sorted
    meta/train.txt, test.txt     lines <class>/<id>, sorted
    ground_truth.parquet         one row per file under images/
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter

GROUND_TRUTH_VERSION = "2"  # 2: kind hard_negative and column background_of
GROUND_TRUTH_VERSION_KEY = "cropclean.ground_truth_version"

FOODS = (
    "apple_pie", "bibimbap", "caesar_salad", "cheesecake", "churros", "donuts", "dumplings", "edamame",
    "falafel", "french_fries", "gyoza", "hamburger", "hummus", "ice_cream", "lasagna", "macarons",
    "nachos", "omelette", "pad_thai", "paella", "pancakes", "pho", "pizza", "ramen", "risotto",
    "sashimi", "spring_rolls", "sushi", "tacos", "tiramisu", "waffles",
)  # fmt: skip

SHAPES = ("circle", "square", "triangle", "hexagon", "star", "cross", "ring", "diamond")
TEXTURES = ("hstripes", "dstripes", "checker", "dots", "rings", "grid", "waves")
PALETTE = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "teal": (20, 170, 170),
    "blue": (40, 70, 210),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 240),
    "black": (25, 25, 25),
}
ASPECTS = ((4, 3), (3, 4), (1, 1), (16, 9))

HOSTILE_KINDS = (
    "too_small", "truncated", "zero_byte", "html", "svg", "decompression_bomb", "animated_gif", "cmyk",
    "palette", "grayscale", "rgba", "png16", "exif_rotated",
)  # fmt: skip
# Share of the base images for each hostile kind; every kind appears at least once.
HOSTILE_RATES = {
    "too_small": 0.01, "truncated": 0.01, "zero_byte": 0.005, "html": 0.005, "svg": 0.0025,
    "decompression_bomb": 0.0025, "animated_gif": 0.005, "cmyk": 0.01, "palette": 0.01,
    "grayscale": 0.01, "rgba": 0.01, "png16": 0.005, "exif_rotated": 0.01,
}  # fmt: skip
EXPECTED = {
    "zero_byte": ("rejected", "empty_file"),
    "html": ("rejected", "not_an_image"),
    "svg": ("rejected", "unsupported_format"),
    "truncated": ("rejected", "truncated"),
    "too_small": ("rejected", "too_small"),
    "decompression_bomb": ("rejected", "decompression_bomb"),
}
DUPLICATE_RATE = 0.03
NEAR_VARIANTS = ("resized", "recompressed", "cropped", "brightness")
# Hard negatives: distinct images that share a scene with a clean image (another object on the same
# background, or on a heavily overlapping crop of it), as web photos of different dishes on one table
# do. They are not duplicates; a perceptual hash that mostly sees the background pairs them anyway.
HARD_NEGATIVE_RATE = 0.03
HARD_NEGATIVE_VARIANTS = ("same_background", "overlapping_crop")
OVERLAP_CROP = (0.80, 0.92)  # side of the shifted background crop, as a share of the original's
BOMB_SIDE = 14000  # 196 Mpx: over the pipeline's default limit (50 Mpx) and over twice Pillow's own
JPEG_QUALITY = 90
# Objects: side as a share of the image's short side; texture cycles per half side. Decoys (objects that
# differ from every class): how many per image, and their size. Together these set how much harder a
# whole image is than an object crop.
OBJECT_SCALE = (0.18, 0.40)
# On real photographs (``backgrounds="real"``) the object is larger: a third to a half of the short side.
OBJECT_SCALE_REAL = (1 / 3, 1 / 2)
BACKGROUNDS = ("synthetic", "real")
OBJECT_FREQ = 2.0
DECOYS = (3, 5)
DECOY_SCALE = (0.15, 0.35)


# Real photographs for backgrounds, as `pipeline.photos.load` returns them: (name, RGB image).
Photos = tuple[tuple[str, Image.Image], ...]


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognizable: the combination of shape, texture and colour pair."""

    shape: str
    texture: str
    colors: tuple[str, str]


@dataclass
class SynthSummary:
    """What `synthesize` wrote: the root, the sorted class names, the file count and counts by kind."""

    root: str
    classes: list[str]
    n_files: int
    counts: dict[str, int]


@dataclass
class _Item:
    """One file to write, with its ground truth."""

    kind: str
    folder: str
    split: str
    drawn: str | None  # class of the drawn object, None when nothing is drawn
    key: str = ""
    box: tuple[int, int, int, int] | None = None
    size: tuple[int, int] | None = None
    duplicate_of: _Item | None = None
    variant: str | None = None
    background_of: _Item | None = None  # hard negatives: the image whose background this one shares
    data: bytes = b""


# ---------------------------------------------------------------------------------------------------
# Classes


def class_names(n: int) -> list[str]:
    """The first n food names, then ``class_NN`` for the rest."""
    return [FOODS[i] if i < len(FOODS) else f"class_{i:02d}" for i in range(n)]


def class_styles(n: int) -> list[ClassStyle]:
    """Styles for n classes, independent of any seed so a class always looks the same.

    Classes share shapes and textures, so only the combination identifies one; two classes differ in
    at least two of the three attributes while that is still possible.
    """
    rng = np.random.default_rng(101)
    names = list(PALETTE)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    combos = [(s, t, p) for s in SHAPES for t in TEXTURES for p in pairs]
    order = rng.permutation(len(combos))
    chosen: list[tuple[str, str, tuple[str, str]]] = []
    for need in (2, 1):
        for idx in order:
            if len(chosen) == n:
                break
            c = combos[idx]
            if c not in chosen and all(
                sum(x != y for x, y in zip(c, o, strict=True)) >= need for o in chosen
            ):
                chosen.append(c)
    if len(chosen) < n:
        raise ValueError(f"at most {len(combos)} classes are supported")
    return [ClassStyle(s, t, p) for s, t, p in chosen]


# ---------------------------------------------------------------------------------------------------
# Drawing


def _texture(name: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Boolean pattern over coordinates u, v (the object spans [-1, 1]); freq is cycles per unit."""
    if name == "hstripes":
        return np.sin(np.pi * 2 * freq * v) > 0
    if name == "dstripes":
        return np.sin(np.pi * 2 * freq * (u + v) / math.sqrt(2)) > 0
    if name == "checker":
        return (np.floor(u * freq * 1.5) + np.floor(v * freq * 1.5)) % 2 == 0
    if name == "dots":
        fu, fv = (u * freq * 1.5) % 1 - 0.5, (v * freq * 1.5) % 1 - 0.5
        return fu * fu + fv * fv > 0.09
    if name == "rings":
        return np.sin(np.pi * 2 * freq * np.hypot(u, v)) > 0
    if name == "grid":
        fu, fv = np.abs((u * freq * 1.5) % 1 - 0.5), np.abs((v * freq * 1.5) % 1 - 0.5)
        return (fu < 0.3) & (fv < 0.3)
    if name == "waves":
        return np.sin(np.pi * 2 * freq * (v + 0.2 * np.sin(np.pi * 2.5 * u))) > 0
    raise ValueError(name)


def _polygon(shape: str) -> list[np.ndarray]:
    """Unit-scale outlines of a shape (x, y in [-1, 1], y down); a second outline is a hole."""

    def regular(n: int, r: float, phase: float) -> np.ndarray:
        a = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)

    if shape == "circle":
        return [regular(48, 0.95, 0)]
    if shape == "ring":
        return [regular(48, 1.0, 0), regular(48, 0.5, 0)]
    if shape == "square":
        return [np.array([[-0.82, -0.82], [0.82, -0.82], [0.82, 0.82], [-0.82, 0.82]])]
    if shape == "diamond":
        return [np.array([[0, -1.0], [1.0, 0], [0, 1.0], [-1.0, 0]])]
    if shape == "triangle":
        return [np.array([[0, -1.0], [1.0, 0.8], [-1.0, 0.8]])]
    if shape == "hexagon":
        return [regular(6, 1.0, 0)]
    if shape == "star":
        outer, inner = regular(5, 1.0, -np.pi / 2), regular(5, 0.45, -np.pi / 2 + np.pi / 5)
        return [np.stack([outer, inner], axis=1).reshape(-1, 2)]
    if shape == "cross":
        a, b = 0.34, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a)]
        return [np.array([*pts, (-b, -a), (-a, -a)])]
    raise ValueError(shape)


def _shape_alpha(shape: str, side: int, angle: float, pad: int) -> Image.Image:
    """Anti-aliased mask of a rotated shape of nominal side `side`, in a square of side + 2 * pad."""
    ss = 4  # supersampling factor for smooth edges
    full = side + 2 * pad
    img = Image.new("L", (full * ss, full * ss), 0)
    draw = ImageDraw.Draw(img)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for i, pts in enumerate(_polygon(shape)):
        xy = (pts @ rot.T) * (side / 2) * ss + full * ss / 2
        draw.polygon([tuple(p) for p in xy], fill=255 if i == 0 else 0)
    return img.reduce(ss)


def _coords(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotated coordinates over a square patch; [-1, 1] spans `size` pixels."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    c, s = math.cos(angle), math.sin(angle)
    return c * t[None, :] + s * t[:, None], -s * t[None, :] + c * t[:, None]


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.array(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _paste_textured(
    rng: np.random.Generator,
    canvas: Image.Image,
    style: ClassStyle,
    side: int,
    xy: tuple[int, int],
    freq: float,
    jitter: float,
    opacity: float = 1.0,
) -> Image.Image:
    """Paste a rotated textured shape whose nominal square has its corner at xy; returns its mask."""
    angle = rng.uniform(-0.2, 0.2)
    pad = max(2, side // 8)
    alpha = _shape_alpha(style.shape, side, angle, pad)
    u, v = _coords(alpha.width, angle)
    scale = alpha.width / side  # texture frequency is relative to the object side, not the padded square
    mask = _texture(style.texture, u * scale, v * scale, freq)
    # Two-colour fill through a two-entry palette, darkened by a soft light gradient across the shape.
    fill = Image.fromarray(mask.astype(np.uint8), "P")
    fill.putpalette([int(c) for name in reversed(style.colors) for c in _jitter(rng, PALETTE[name], jitter)])
    light = (255 - rng.uniform(0, 30) * (1 + u)).astype(np.uint8)
    rgb = ImageChops.multiply(fill.convert("RGB"), Image.fromarray(light, "L").convert("RGB"))
    if opacity < 1:
        alpha = alpha.point([int(a * opacity) for a in range(256)])
    canvas.paste(rgb, (xy[0] - pad, xy[1] - pad), alpha)
    return alpha


def _decoy_style(rng: np.random.Generator, styles: list[ClassStyle]) -> ClassStyle:
    """A class style with one attribute changed: it looks like an object without being a class."""
    taken = set(styles)
    colors = list(PALETTE)
    for _ in range(20):
        base = styles[int(rng.integers(len(styles)))]
        which = int(rng.integers(3))
        if which == 0:
            cand = ClassStyle(SHAPES[int(rng.integers(len(SHAPES)))], base.texture, base.colors)
        elif which == 1:
            cand = ClassStyle(base.shape, TEXTURES[int(rng.integers(len(TEXTURES)))], base.colors)
        else:
            keep = base.colors[int(rng.integers(2))]
            cand = ClassStyle(base.shape, base.texture, (keep, colors[int(rng.integers(len(colors)))]))
        if cand not in taken and cand.colors[0] != cand.colors[1]:
            return cand
    return ClassStyle("circle", "checker", ("black", "white"))


def _background(
    rng: np.random.Generator, w: int, h: int, styles: list[ClassStyle], clutter: float = 1.0
) -> Image.Image:
    """Cluttered background: gradient, blurred blobs, lines, textured patches and decoy objects, their
    counts scaled by ``clutter`` (the random draws stay the same, so 1.0 always gives the same image)."""
    short = min(w, h)
    # A colour gradient, computed small and upscaled (it is smooth anyway).
    gw, gh = max(2, w // 8), max(2, h // 8)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.arange(gw)[None, :] * math.cos(angle) + np.arange(gh)[:, None] * math.sin(angle)
    t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
    c0, c1 = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    small = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    canvas = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BILINEAR).convert("RGBA")

    # Soft shapes and lines, drawn at half size on one layer; blurring and upscaling soften them.
    hw, hh, hs = max(1, w // 2), max(1, h // 2), short / 2
    layer = Image.new("RGBA", (hw, hh), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(round(int(rng.integers(14, 24)) * clutter)):
        cx, cy = rng.uniform(0, hw), rng.uniform(0, hh)
        rx, ry = rng.uniform(0.04, 0.25) * hs, rng.uniform(0.04, 0.25) * hs
        fill = (*(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(90, 230)))
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=fill)
    for _ in range(round(int(rng.integers(6, 14)) * clutter)):
        pts = [(rng.uniform(0, hw), rng.uniform(0, hh)) for _ in range(2)]
        fill = (*(int(c) for c in rng.integers(0, 256, 3)), 220)
        draw.line(pts, fill=fill, width=max(1, int(rng.uniform(0.006, 0.025) * hs)))
    layer = layer.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2) * short / 256))
    canvas = Image.alpha_composite(canvas, layer.resize((w, h), Image.Resampling.BILINEAR)).convert("RGB")

    # Translucent textured patches, then decoys that differ from a class in one attribute only.
    colors = list(PALETTE)
    for _ in range(round(int(rng.integers(3, 6)) * clutter)):
        side = max(3, int(rng.uniform(0.1, 0.3) * short))
        pair = tuple(colors[int(j)] for j in rng.choice(len(colors), 2, replace=False))
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        patch = ClassStyle("circle" if rng.random() < 0.5 else "square", texture, pair)  # type: ignore[arg-type]
        xy = int(rng.integers(-side // 3, w - side // 2)), int(rng.integers(-side // 3, h - side // 2))
        _paste_textured(rng, canvas, patch, side, xy, rng.uniform(1.5, 3.5), 30, rng.uniform(0.5, 0.9))
    _decoys(rng, canvas, styles, clutter)
    return canvas


def _decoys(rng: np.random.Generator, canvas: Image.Image, styles: list[ClassStyle], clutter: float) -> None:
    """Paste decoys (objects that differ from a class in one attribute only), their count scaled by
    ``clutter``."""
    w, h = canvas.size
    short = min(w, h)
    for _ in range(round(int(rng.integers(DECOYS[0], DECOYS[1] + 1)) * clutter)):
        side = max(3, int(rng.uniform(*DECOY_SCALE) * short))
        xy = (
            int(rng.integers(-side // 4, w - 3 * side // 4)),
            int(rng.integers(-side // 4, h - 3 * side // 4)),
        )
        _paste_textured(rng, canvas, _decoy_style(rng, styles), side, xy, OBJECT_FREQ, 18)


_QUARTER_COVERED = [255 if a >= 64 else 0 for a in range(256)]


def _canvas(
    rng: np.random.Generator,
    w: int,
    h: int,
    styles: list[ClassStyle],
    clutter: float = 1.0,
    photos: Photos | None = None,
) -> Image.Image:
    """The background of an image: generated clutter, or a crop of one of `photos` with decoys."""
    if photos is None:
        return _background(rng, w, h, styles, clutter)
    from pipeline.photos import background

    canvas, _ = background(rng, w, h, photos)
    _decoys(rng, canvas, styles, clutter)
    return canvas


def _draw_object(
    rng: np.random.Generator,
    canvas: Image.Image,
    style: ClassStyle | None,
    object_scale: tuple[float, float] = OBJECT_SCALE,
    avoid: tuple[int, int, int, int] | None = None,
) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """Paste one object of `style` (or none) on `canvas`, add sensor noise; the image and the box.

    With `avoid`, the object's square is placed so that it overlaps that box by at most a third of
    the smaller of the two (a few draws, then the best one): two objects on one background then differ
    where a viewer looks, not only in their texture's phase."""
    w, h = canvas.size
    box = None
    if style is not None:
        side = max(4, int(rng.uniform(*object_scale) * min(w, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        if avoid is not None:
            best = (_overlap((x, y, x + side, y + side), avoid), x, y)
            for _ in range(12):
                if best[0] <= 1 / 3:
                    break
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                best = min(best, (_overlap((x, y, x + side, y + side), avoid), x, y))
            _, x, y = best
        alpha = _paste_textured(rng, canvas, style, side, (x, y), OBJECT_FREQ, 18)
        # The box covers the pixels at least a quarter covered by the object.
        bx0, by0, bx1, by1 = alpha.point(_QUARTER_COVERED).getbbox()  # type: ignore[misc]
        pad = (alpha.width - side) // 2
        box = (max(0, x - pad + bx0), max(0, y - pad + by0), min(w, x - pad + bx1), min(h, y - pad + by1))
    # Sensor-like luminance noise in [-6, 6], added with clipping.
    noise = Image.fromarray(rng.integers(0, 13, size=(h, w), dtype=np.uint8), "L").convert("RGB")
    return ImageChops.add(canvas, noise, 1.0, -6), box


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area over the smaller box's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(1, smaller)


def _render(
    rng: np.random.Generator,
    style: ClassStyle | None,
    w: int,
    h: int,
    styles: list[ClassStyle],
    clutter: float = 1.0,
    photos: Photos | None = None,
    object_scale: tuple[float, float] = OBJECT_SCALE,
) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """An RGB image with one object of `style` (or none), and the object's box (x1, y1 exclusive).

    The background is generated, or with `photos` a crop of one of them with decoys (their count scaled
    by ``clutter``) on top; the object's side is drawn from `object_scale` times the short side."""
    canvas = _canvas(rng, w, h, styles, clutter, photos)
    return _draw_object(rng, canvas, style, object_scale)


def _size(rng: np.random.Generator, short: int) -> tuple[int, int]:
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    short = max(8, round(short * rng.uniform(0.95, 1.1)))
    return (short * aw // ah, short) if aw >= ah else (short, short * ah // aw)


# ---------------------------------------------------------------------------------------------------
# Encoding


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    return _encode(img, "JPEG", quality=quality)


HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    "<body><h1>Not Found</h1><p>The requested image {name} was not found on this server.</p></body></html>\n"
)
SVG_IMAGE = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">\n'
    '  <rect width="{w}" height="{h}" fill="#e0c090"/>\n'
    '  <circle cx="{cx}" cy="{cy}" r="{r}" fill="#c04020"/>\n</svg>\n'
)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _bomb() -> bytes:
    """A small PNG that decodes to BOMB_SIDE x BOMB_SIDE one-bit pixels.

    Written by hand: streaming identical rows through zlib is several times faster than having Pillow
    allocate and encode the whole image.
    """
    row = bytes(1 + (BOMB_SIDE + 7) // 8)  # filter byte, then all-black pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(BOMB_SIDE)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)  # 1-bit grayscale
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
    return png + _png_chunk(b"IEND", b"")


def _exif_rotated(img: Image.Image, orientation: int) -> bytes:
    """Store the pixels rotated, with the Orientation tag (6 or 8) that turns them upright again."""
    # exif_transpose turns orientation 6 by 270 degrees and 8 by 90, so store the inverse rotation.
    stored = img.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())


def _palette_png(img: Image.Image) -> bytes:
    """P-mode PNG whose last palette index is transparent and used by a thin frame."""
    pal = img.quantize(255, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    arr = np.asarray(pal).copy()
    arr[:2, :], arr[-2:, :], arr[:, :2], arr[:, -2:] = 255, 255, 255, 255
    out = Image.fromarray(arr, "P")
    out.putpalette([*pal.getpalette()[: 255 * 3], 0, 0, 0])
    return _encode(out, "PNG", transparency=255)


def _rgba_png(rng: np.random.Generator, img: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    """RGBA PNG whose background fades to transparent while the object stays opaque."""
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    alpha = 255 * (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    x0, y0, x1, y1 = box
    alpha[y0:y1, x0:x1] = 255
    rgba = np.dstack([np.asarray(img), alpha.astype(np.uint8)])
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def _png16(img: Image.Image) -> bytes:
    gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    return _encode(Image.fromarray(gray.astype("<u2")), "PNG")


def _gif(img: Image.Image) -> bytes:
    """A three-frame animation; the object stays in place while the light changes."""
    frames = [ImageEnhance.Brightness(img).enhance(f) for f in (1.0, 0.85, 1.15)]
    # Quantizing here with the fast method keeps the encoder from using its much slower default.
    frames = [f.quantize(256, method=Image.Quantize.FASTOCTREE) for f in frames]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)


def _hostile_bytes(
    rng: np.random.Generator,
    item: _Item,
    style: ClassStyle,
    styles: list[ClassStyle],
    side: int,
    clutter: float = 1.0,
    photos: Photos | None = None,
    object_scale: tuple[float, float] = OBJECT_SCALE,
) -> None:
    """Render and encode an injected hostile file, recording its box and displayed size."""
    kind = item.kind
    if kind == "zero_byte":
        item.data = b""
        return
    if kind == "html":
        item.data = HTML_PAGE.format(name=item.key).encode()
        return
    if kind == "svg":
        w, h = _size(rng, side)
        item.data = SVG_IMAGE.format(w=w, h=h, cx=w // 2, cy=h // 2, r=min(w, h) // 4).encode()
        return
    if kind == "decompression_bomb":
        item.data, item.size = _bomb(), (BOMB_SIDE, BOMB_SIDE)
        return
    if kind == "too_small":
        w, h = (int(s) for s in rng.integers(24, 41, 2))  # both sides well under the 64 px minimum
    else:
        w, h = _size(rng, side)
    img, box = _render(rng, style, w, h, styles, clutter, photos, object_scale)
    item.box, item.size = box, (w, h)
    if kind == "too_small":
        item.data = _jpeg(img)
    elif kind == "truncated":
        full = _jpeg(img)
        item.data = full[: int(len(full) * 0.4)]
    elif kind == "animated_gif":
        item.data = _gif(img)
    elif kind == "cmyk":
        item.data = _jpeg(img.convert("CMYK"))
    elif kind == "grayscale":
        item.data = _jpeg(img.convert("L"))
    elif kind == "palette":
        item.data = _palette_png(img)
    elif kind == "rgba":
        item.data = _rgba_png(rng, img, box)
    elif kind == "png16":
        item.data = _png16(img)
    elif kind == "exif_rotated":
        item.data = _exif_rotated(img, 6 if rng.random() < 0.5 else 8)
    else:
        raise ValueError(kind)


def _near_duplicate(rng: np.random.Generator, item: _Item) -> None:
    """Derive a near duplicate of item.duplicate_of, adjusting the box to the variant."""
    orig = item.duplicate_of
    assert orig is not None and orig.box is not None and orig.size is not None
    img = Image.open(io.BytesIO(orig.data)).convert("RGB")
    w, h = orig.size
    x0, y0, x1, y1 = orig.box
    if item.variant == "resized":
        f = rng.uniform(0.5, 0.8)
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        sx, sy = nw / w, nh / h
        box = (int(x0 * sx), int(y0 * sy), min(nw, math.ceil(x1 * sx)), min(nh, math.ceil(y1 * sy)))
        item.data = _jpeg(img)
    elif item.variant == "recompressed":
        box = orig.box
        item.data = _jpeg(img, int(rng.integers(30, 61)))
    elif item.variant == "cropped":
        # "Slightly": 2-4% per edge, where pHash distance is mostly under 10.
        left, top, right, bottom = (int(rng.uniform(0.02, 0.04) * s) for s in (w, h, w, h))
        img = img.crop((left, top, w - right, h - bottom))
        nw, nh = img.size
        box = (max(0, x0 - left), max(0, y0 - top), min(nw, x1 - left), min(nh, y1 - top))
        item.data = _jpeg(img)
    elif item.variant == "brightness":
        f = 1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.10)
        box = orig.box
        item.data = _jpeg(ImageEnhance.Brightness(img).enhance(f))
    else:
        raise ValueError(item.variant)
    item.box, item.size = box, img.size


# ---------------------------------------------------------------------------------------------------
# Planning: which file is what, where


def _count(n: int, rate: float, minimum: int = 1) -> int:
    return max(minimum, round(n * rate))


def _plan(
    rng: np.random.Generator, names: list[str], per_class: int, noise: float, test_fraction: float
) -> list[_Item]:
    """Decide every file's kind, folder, split and drawn class (nothing is rendered yet)."""
    n_classes = len(names)

    def other(name: str) -> str:
        choices = [c for c in names if c != name]
        return choices[int(rng.integers(len(choices)))]

    # Base images: per_class per class folder, a fixed share of each class in test.
    items: list[_Item] = []
    n_test = round(per_class * test_fraction)
    for name in names:
        splits = ["test"] * n_test + ["train"] * (per_class - n_test)
        items += [_Item("clean", name, str(s), name) for s in rng.permutation(splits)]

    # Label flips: train files whose object belongs to another class.
    train = [it for it in items if it.split == "train"]
    if n_classes > 1:
        for i in rng.permutation(len(train))[: round(noise * len(train))]:
            train[int(i)].kind, train[int(i)].drawn = "label_flip", other(train[int(i)].folder)

    # Hostile files, in class folders and splits as they fall.
    n_base = len(items)
    for kind in HOSTILE_KINDS:
        minimum = 2 if kind == "exif_rotated" else 1  # both orientations
        for _ in range(_count(n_base, HOSTILE_RATES[kind], minimum)):
            name = names[int(rng.integers(n_classes))]
            items.append(_Item(kind, name, "test" if rng.random() < test_fraction else "train", name))

    items += _plan_duplicates(rng, items[:n_base], other if n_classes > 1 else None)
    return items


def _plan_duplicates(
    rng: np.random.Generator, base: list[_Item], other: Callable[[str], str] | None
) -> list[_Item]:
    """Exact and near copies of distinct clean images; some in another class folder or split."""
    clean = [it for it in base if it.kind == "clean"]
    n = len(base)
    plans: list[tuple[str, str | None, int]] = [
        ("exact_duplicate", None, i % 4) for i in range(_count(n, DUPLICATE_RATE, 2))
    ]
    # The cross pattern is offset for near duplicates so that it does not follow the variant.
    plans += [
        ("near_duplicate", NEAR_VARIANTS[i % 4], (i // 4 + i) % 4)
        for i in range(_count(n, DUPLICATE_RATE, 4))
    ]
    used: set[int] = set()
    dups: list[_Item] = []
    for kind, variant, pattern in plans:
        cross_label = pattern == 0 and other is not None
        cross_split = pattern == 1
        # A copy under another label stays in train, so the test split only has correct labels.
        fits = [i for i, it in enumerate(clean) if it.split == "train" or not cross_label]
        pool = [i for i in fits if i not in used] or fits
        if not pool:
            continue
        i = pool[int(rng.integers(len(pool)))]
        used.add(i)
        orig = clean[i]
        folder = other(orig.folder) if other is not None and cross_label else orig.folder
        split = {"train": "test", "test": "train"}[orig.split] if cross_split else orig.split
        dups.append(_Item(kind, folder, split, orig.drawn, duplicate_of=orig, variant=variant))
    return dups


def _plan_hard_negatives(
    rng: np.random.Generator, items: list[_Item], names: list[str], rate: float, test_fraction: float
) -> list[_Item]:
    """Siblings of distinct clean images: another object (the same class or another) on the same
    background or on a heavily overlapping crop of it, filed under the class drawn."""
    clean = [it for it in items if it.kind == "clean"]
    base = sum(it.kind in ("clean", "label_flip") for it in items)
    if rate <= 0 or not clean:
        return []
    # At least one of each variant with an object of the same class and of another class.
    n = min(len(clean), _count(base, rate, 2 * len(HARD_NEGATIVE_VARIANTS)))
    out = []
    for i, j in enumerate(rng.choice(len(clean), size=n, replace=False)):
        orig = clean[int(j)]
        assert orig.drawn is not None
        drawn = orig.drawn
        variant = HARD_NEGATIVE_VARIANTS[i % len(HARD_NEGATIVE_VARIANTS)]
        if len(names) > 1 and (i // len(HARD_NEGATIVE_VARIANTS)) % 2 == 1:
            drawn = [c for c in names if c != orig.drawn][int(rng.integers(len(names) - 1))]
        split = "test" if rng.random() < test_fraction else "train"
        out.append(_Item("hard_negative", drawn, split, drawn, variant=variant, background_of=orig))
    return out


def _hard_negative(
    rng: np.random.Generator,
    orig_rng: np.random.Generator,
    item: _Item,
    orig_style: ClassStyle,
    style: ClassStyle,
    styles: list[ClassStyle],
    side: int,
    clutter: float,
    photos: Photos | None,
    object_scale: tuple[float, float],
) -> None:
    """Render a hard negative: replay the original's draws (``orig_rng`` is the generator the original
    was drawn with) up to its background, then draw this item's own object with ``rng``."""
    w, h = _size(orig_rng, side)
    canvas = _canvas(orig_rng, w, h, styles, clutter, photos)
    _, orig_box = _draw_object(orig_rng, canvas.copy(), orig_style, object_scale)
    assert orig_box is not None
    if item.variant == "overlapping_crop":
        f = rng.uniform(*OVERLAP_CROP)
        cw, ch = w * f, h * f
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        canvas = canvas.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        bx0, by0, bx1, by1 = orig_box
        orig_box = (int((bx0 - x0) / f), int((by0 - y0) / f), int((bx1 - x0) / f), int((by1 - y0) / f))
    # Another object of the same class keeps off the original's place (else it would be a copy).
    avoid = orig_box if style == orig_style else None
    img, item.box = _draw_object(rng, canvas, style, object_scale, avoid=avoid)
    item.size, item.data = (w, h), _jpeg(img)


def _assign_more_ids(rng: np.random.Generator, items: list[_Item], extra: list[_Item]) -> None:
    """Ids for ``extra`` of the same width as those of ``items``, unused by them."""
    if not extra:
        return
    digits = len(items[0].key.rsplit("/", 1)[1]) - len(".jpg")
    taken = {int(it.key.rsplit("/", 1)[1][: -len(".jpg")]) for it in items}
    free: list[int] = []
    while len(free) < len(extra):
        for i in rng.integers(0, 10**digits, size=2 * len(extra)).tolist():
            if i not in taken and len(free) < len(extra):
                taken.add(i)
                free.append(i)
    for item, i in zip(extra, free, strict=True):
        item.key = f"images/{item.folder}/{i:0{digits}d}.jpg"


def _assign_ids(rng: np.random.Generator, items: list[_Item]) -> None:
    """Unique random ids across the dataset, as in Food-101 (which never groups ids by class)."""
    digits = max(6, len(str(len(items) * 10)))
    ids = rng.choice(10**digits, size=len(items), replace=False)
    for item, i in zip(items, ids, strict=True):
        item.key = f"images/{item.folder}/{int(i):0{digits}d}.jpg"


# ---------------------------------------------------------------------------------------------------
# Output


GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("source_key", pa.string()),
        ("split", pa.string()),
        ("given_label", pa.string()),
        ("true_label", pa.string()),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("x1", pa.int32()),
        ("y1", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("kind", pa.string()),
        ("duplicate_of", pa.string()),
        ("variant", pa.string()),
        ("background_of", pa.string()),
        ("cross_label", pa.bool_()),
        ("cross_split", pa.bool_()),
        ("expected_status", pa.string()),
        ("expected_reason", pa.string()),
    ],
    metadata={GROUND_TRUTH_VERSION_KEY: GROUND_TRUTH_VERSION},
)


def _ground_truth(items: list[_Item]) -> pa.Table:
    rows = []
    for it in sorted(items, key=lambda i: i.key):
        orig = it.duplicate_of
        status, reason = EXPECTED.get(it.kind, ("ok", None))
        box = it.box or (None, None, None, None)
        size = it.size or (None, None)
        rows.append(
            {
                "source_key": it.key,
                "split": it.split,
                "given_label": it.folder,
                "true_label": it.drawn if it.box is not None else None,
                **dict(zip(("x0", "y0", "x1", "y1"), box, strict=True)),
                "width": size[0],
                "height": size[1],
                "kind": it.kind,
                "duplicate_of": orig.key if orig else None,
                "variant": it.variant,
                "background_of": it.background_of.key if it.background_of else None,
                "cross_label": bool(orig and orig.folder != it.folder),
                "cross_split": bool(orig and orig.split != it.split),
                "expected_status": status,
                "expected_reason": reason,
            }
        )
    return pa.Table.from_pylist(rows, schema=GROUND_TRUTH_SCHEMA)


def _meta_lines(items: list[_Item], split: str) -> bytes:
    lines = sorted(it.key[len("images/") : -len(".jpg")] for it in items if it.split == split)
    return "".join(f"{line}\n" for line in lines).encode()


def synthesize(
    out: str,
    classes: int = 10,
    per_class: int = 40,
    noise: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.25,
    image_side: int = 256,
    clutter: float = 1.0,
    backgrounds: str = "synthetic",
    object_scale: tuple[float, float] | None = None,
    hard_negatives: float = HARD_NEGATIVE_RATE,
) -> SynthSummary:
    """Write a Food-101-layout dataset with injected problems and its ground truth under `out`.

    `per_class` base images go in each class folder (a `test_fraction` of them in test, a `noise`
    share of the train ones label-flipped); duplicates and hostile files come on top. The same
    arguments always give byte-identical files. ``clutter`` scales how busy backgrounds are (blobs,
    lines, textured patches, decoy objects): 1.0 is the default, 0 leaves a plain gradient.

    ``backgrounds="real"`` cuts each background from a photograph bundled with scikit-learn or
    scikit-image (see `pipeline.photos`; ConfigError when scikit-image is missing) and scales only the
    decoys on it by ``clutter``. ``object_scale`` is the range of the object's side as a share of the
    image's short side: by default OBJECT_SCALE on generated backgrounds, OBJECT_SCALE_REAL on photos.

    ``hard_negatives`` is the share of the base images that get a sibling of kind ``hard_negative``:
    another object (half of the time of the same class) on the same background, or on a heavily
    overlapping crop of it (at least four when the share is above 0, one of each kind; 0 writes none).
    Siblings are distinct images (``duplicate_of`` is null; ``background_of`` names the image whose
    background they share) with correct labels.
    """
    if classes < 1 or per_class < 1:
        raise ValueError("classes and per_class must be at least 1")
    if not 0 <= noise <= 1 or not 0 <= test_fraction <= 1:
        raise ValueError("noise and test_fraction must lie in [0, 1]")
    if clutter < 0:
        raise ValueError("clutter must be >= 0")
    if not 0 <= hard_negatives <= 1:
        raise ValueError("hard_negatives must lie in [0, 1]")
    if backgrounds not in BACKGROUNDS:
        raise ValueError(f"backgrounds must be one of {', '.join(BACKGROUNDS)}")
    photos: Photos | None = None
    if backgrounds == "real":
        from pipeline import photos as photo_source

        photos = photo_source.load()
    if object_scale is None:
        object_scale = OBJECT_SCALE if photos is None else OBJECT_SCALE_REAL
    if not 0 < object_scale[0] <= object_scale[1] <= 1:
        raise ValueError("object_scale must be (low, high) with 0 < low <= high <= 1")
    names = class_names(classes)
    styles = dict(zip(names, class_styles(classes), strict=True))
    style_list = list(styles.values())
    plan_rng = np.random.default_rng([seed, 0])
    items = _plan(plan_rng, names, per_class, noise, test_fraction)
    _assign_ids(plan_rng, items)
    # Hard negatives come from a generator of their own and go last, so that every other file keeps
    # its id and bytes whatever their rate.
    extra_rng = np.random.default_rng([seed, 2])
    extra = _plan_hard_negatives(extra_rng, items, names, hard_negatives, test_fraction)
    _assign_more_ids(extra_rng, items, extra)
    items += extra
    position = {id(it): n for n, it in enumerate(items)}

    # Each file draws from its own generator, keyed by its position, so files do not depend on the
    # rendering order and can be rendered in parallel; duplicates wait for their originals.
    def make(n: int) -> None:
        item = items[n]
        rng = np.random.default_rng([seed, 1, n])
        if item.kind == "exact_duplicate":
            orig = item.duplicate_of
            assert orig is not None
            item.data, item.box, item.size = orig.data, orig.box, orig.size
        elif item.kind == "near_duplicate":
            _near_duplicate(rng, item)
        elif item.kind == "hard_negative":
            orig = item.background_of
            assert orig is not None and orig.drawn is not None and item.drawn is not None
            _hard_negative(
                rng,
                np.random.default_rng([seed, 1, position[id(orig)]]),
                item,
                styles[orig.drawn],
                styles[item.drawn],
                style_list,
                image_side,
                clutter,
                photos,
                object_scale,
            )
        elif item.kind in ("clean", "label_flip"):
            assert item.drawn is not None
            item.size = _size(rng, image_side)
            img, item.box = _render(
                rng, styles[item.drawn], *item.size, style_list, clutter, photos, object_scale
            )
            item.data = _jpeg(img)
        else:
            assert item.drawn is not None
            _hostile_bytes(
                rng, item, styles[item.drawn], style_list, image_side, clutter, photos, object_scale
            )

    is_dup = [it.duplicate_of is not None for it in items]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(make, [n for n, d in enumerate(is_dup) if not d]))
        list(pool.map(make, [n for n, d in enumerate(is_dup) if d]))

    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    for name in names:
        fs.makedirs(f"{root}/images/{name}", exist_ok=True)
    fs.makedirs(f"{root}/meta", exist_ok=True)
    for item in items:
        fs.pipe_file(f"{root}/{item.key}", item.data)
    fs.pipe_file(f"{root}/meta/classes.txt", "".join(f"{c}\n" for c in sorted(names)).encode())
    for split in ("train", "test"):
        fs.pipe_file(f"{root}/meta/{split}.txt", _meta_lines(items, split))
    buf = io.BytesIO()
    pq.write_table(_ground_truth(items), buf)
    fs.pipe_file(f"{root}/ground_truth.parquet", buf.getvalue())

    counts: dict[str, int] = {}
    for item in items:
        counts[item.kind] = counts.get(item.kind, 0) + 1
    return SynthSummary(root=out, classes=sorted(names), n_files=len(items), counts=counts)
