"""One test per file-level bad input in DESIGN.md: each gets a reason, or is normalized correctly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.imaging import Normalized, NormalizeParams, Rejected, normalize_bytes
from pipeline.reasons import Reason

P = NormalizeParams(min_side=64, max_pixels=50_000_000, target_side=128, jpeg_quality=90)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, w)[None, :]
    base[..., 1] = np.linspace(0, 255, h)[:, None]
    base[h // 4 : h // 2, w // 4 : w // 2, 2] = 255
    noise = rng.integers(0, 20, size=base.shape, dtype=np.uint8)
    return Image.fromarray(base + noise)


def normalized(data: bytes) -> Normalized:
    out = normalize_bytes(data, P)
    assert isinstance(out, Normalized), out
    return out


def rejected(data: bytes, reason: Reason, params: NormalizeParams = P) -> Rejected:
    out = normalize_bytes(data, params)
    assert isinstance(out, Rejected), out
    assert out.reason == reason, out
    return out


def decoded(n: Normalized) -> Image.Image:
    im = Image.open(io.BytesIO(n.jpeg))
    assert im.format == "JPEG" and im.mode == "RGB"
    return im


def test_good_jpeg_resized_keeping_ratio_and_hashed():
    n = normalized(encode(photo(320, 240), "JPEG", quality=95))
    assert (n.orig_width, n.orig_height) == (320, 240)
    assert (n.width, n.height) == (171, 128)  # short side to 128, ratio kept
    assert decoded(n).size == (171, 128)
    assert len(n.phash) == 16 and len(n.jpeg_sha256) == 64 and len(n.pixel_sha256) == 64


def test_long_side_mode_and_no_upscale():
    p = NormalizeParams(min_side=16, target_side=100, resize_side="long")
    n = normalize_bytes(encode(photo(320, 240), "PNG"), p)
    assert (n.width, n.height) == (100, 75)
    small = normalize_bytes(encode(photo(90, 80), "PNG"), p)
    assert (small.width, small.height) == (90, 80)  # never enlarged unless upscale is set
    up = normalize_bytes(
        encode(photo(90, 80), "PNG"), NormalizeParams(min_side=16, target_side=160, upscale=True)
    )
    assert (up.width, up.height) == (180, 160)


def test_zero_byte_file():
    rejected(b"", Reason.EMPTY_FILE)


def test_html_named_jpg():
    r = rejected(b"<!DOCTYPE html><html><body>404 Not Found</body></html>", Reason.NOT_AN_IMAGE)
    assert "markup" in r.detail


def test_random_bytes():
    rejected(np.random.default_rng(1).bytes(4096), Reason.NOT_AN_IMAGE)


def test_svg_is_unsupported():
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="400" height="400"></svg>'
    rejected(svg, Reason.UNSUPPORTED_FORMAT)
    rejected(b"  <svg width='10'/>", Reason.UNSUPPORTED_FORMAT)


def test_truncated_jpeg():
    data = encode(photo(640, 480), "JPEG", quality=95)
    rejected(data[: len(data) * 2 // 5], Reason.TRUNCATED)


def test_truncated_png():
    data = encode(photo(320, 240), "PNG")
    out = normalize_bytes(data[: len(data) // 2], P)
    assert isinstance(out, Rejected) and out.reason in (Reason.TRUNCATED, Reason.DECODE_ERROR)


def _png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side zeros: tiny file, huge pixel count."""
    raw = zlib.compress(b"".join(b"\x00" + bytes((side + 7) // 8) for _ in range(side)), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_decompression_bomb_is_rejected_before_decoding():
    data = _png_bomb(20_000)  # 400 megapixels in a few hundred KB
    assert len(data) < 2_000_000
    r = rejected(data, Reason.DECOMPRESSION_BOMB)
    assert "400000000 pixels" in r.detail
    # Our limit, not Pillow's, decides: a smaller limit catches a smaller image.
    rejected(encode(photo(320, 240), "PNG"), Reason.DECOMPRESSION_BOMB, NormalizeParams(max_pixels=50_000))


def test_tiny_image():
    r = rejected(encode(photo(40, 300), "JPEG"), Reason.TOO_SMALL)
    assert (r.orig_width, r.orig_height) == (40, 300)


def test_animated_gif_takes_first_frame():
    frames = [photo(200, 150, seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    n = normalized(buf.getvalue())
    assert n.format == "GIF" and (n.orig_width, n.orig_height) == (200, 150)


def test_cmyk_jpeg():
    n = normalized(encode(photo().convert("CMYK"), "JPEG", quality=95))
    assert n.mode == "CMYK"
    ref = np.asarray(photo().resize((n.width, n.height)), dtype=float)
    assert np.abs(np.asarray(decoded(n), dtype=float) - ref).mean() < 20  # colours survive


def test_palette_with_transparency_goes_over_white():
    im = Image.new("P", (100, 100), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (25, 25, 75, 75))
    n = normalized(encode(im, "PNG", transparency=0))
    arr = np.asarray(decoded(n))
    assert n.mode == "P"
    assert arr[2, 2].min() > 240  # transparent corner is white, not black
    assert arr[50, 50, 0] > 200 and arr[50, 50, 1] < 60  # red square kept


def test_rgba_alpha_over_white():
    rgba = photo(128, 128).convert("RGBA")
    alpha = np.zeros((128, 128), np.uint8)
    alpha[32:96, 32:96] = 255
    rgba.putalpha(Image.fromarray(alpha))
    arr = np.asarray(decoded(normalized(encode(rgba, "PNG"))))
    assert arr[5, 5].min() > 240


def test_grayscale_and_la():
    assert normalized(encode(photo().convert("L"), "JPEG")).mode == "L"
    assert normalized(encode(photo().convert("LA"), "PNG")).mode == "LA"


def test_sixteen_bit_png_keeps_its_range():
    ramp = (np.linspace(0, 65535, 200)[None, :].repeat(100, axis=0)).astype(np.uint16)
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I;16")
    n = normalized(encode(im, "PNG"))
    arr = np.asarray(decoded(n))[..., 0].astype(int)
    assert arr[:, :8].mean() < 20 and arr[:, -8:].mean() > 235  # full range, not clipped to white


def test_exif_rotated_photo_is_turned_upright():
    upright = photo(240, 320)  # portrait
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored landscape, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6
    n = normalized(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert (n.orig_width, n.orig_height) == (240, 320)
    assert (n.width, n.height) == (128, 171)
    ref = np.asarray(upright.resize((n.width, n.height)), dtype=float)
    assert np.abs(np.asarray(decoded(n), dtype=float) - ref).mean() < 20


def test_corrupt_exif_does_not_break_decoding():
    data = encode(photo(), "JPEG", exif=b"Exif\x00\x00garbage-garbage")
    assert normalized(data).width > 0


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP", "TIFF"])
def test_other_formats(fmt):
    assert normalized(encode(photo(), fmt)).format == fmt


def test_same_pixels_same_hashes():
    a = normalized(encode(photo(), "PNG"))
    b = normalized(encode(photo(), "PNG", compress_level=1))
    assert a.pixel_sha256 == b.pixel_sha256 and a.phash == b.phash


def test_every_resize_filter_keeps_the_size_and_stays_close_to_a_full_size_lanczos():
    # A real photograph (scikit-image's coffee, 600 x 400) as a JPEG: reduced-scale decode, then each filter.
    from typing import get_args

    from pipeline.config import NormalizeConfig
    from pipeline.imaging import FILTERS

    skimage_data = pytest.importorskip(
        "skimage.data", reason="scikit-image (the dev extra) bundles the photo"
    )
    assert set(get_args(NormalizeConfig.model_fields["resample"].annotation)) == set(FILTERS)
    original = Image.fromarray(skimage_data.coffee())
    data = encode(original, "JPEG", quality=95)
    reference = np.asarray(original.resize((192, 128), Image.Resampling.LANCZOS), dtype=np.float64)
    psnr = {}
    for name in FILTERS:
        out = normalize_bytes(data, NormalizeParams(target_side=128, resample=name))
        assert isinstance(out, Normalized) and (out.width, out.height) == (192, 128), name
        stored = np.asarray(decoded(out), dtype=np.float64)
        psnr[name] = 10 * np.log10(255.0**2 / np.mean((stored - reference) ** 2))
    assert min(psnr.values()) > 30, psnr  # 31.0 (box) to 33.2 dB (lanczos) when written
    assert psnr["lanczos"] >= psnr["bicubic"] >= psnr["bilinear"] >= psnr["box"], psnr  # sharpest first
