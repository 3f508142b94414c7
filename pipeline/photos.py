"""Real photographs as backgrounds for the generated dataset (``cropclean synth --backgrounds real``).

The photos are the colour photographs of scenes that ship inside the scikit-learn and scikit-image
packages and load without a network: scikit-learn's ``load_sample_images()`` (china, flower) and
scikit-image's ``skimage.data`` astronaut, chelsea, coffee, rocket and the left view of
stereo_motorcycle. Left out: what is not a photograph of a scene (colorwheel, grayscale textures), the
microscopy and astronomy images (immunohistochemistry, retina, hubble_deep_field: mostly one flat
colour) and whatever scikit-image would download first (pooch).

A background is a random crop of one photo (any position, 45-100% of the largest crop of the image's
aspect ratio), scaled to the image's size and mirrored half the time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import ConfigError

PACKAGE = "scikit-image"
# (source, name): scikit-learn's sample images by file name, scikit-image's by loader function.
PHOTOS = (
    ("sklearn", "china"),
    ("sklearn", "flower"),
    ("skimage", "astronaut"),
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "rocket"),
    ("skimage", "stereo_motorcycle"),
)
CROP_SCALE = (0.45, 1.0)  # crop side as a share of the largest crop of the wanted aspect ratio


@dataclass(frozen=True)
class Placement:
    """Where a background came from: the photo, the crop box in its pixels (floats), and the mirror."""

    photo: str
    box: tuple[float, float, float, float]
    mirrored: bool


def _require_skimage() -> None:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"backgrounds 'real' need the package {PACKAGE}, which is not installed (pip install {PACKAGE})"
        ) from None


def photo_array(source: str, name: str) -> np.ndarray:
    """One bundled photo as an RGB uint8 array, read straight from the installed package."""
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    arr = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":  # (left, right, disparity): the left view
        arr = arr[0]
    return np.asarray(arr)


@functools.cache
def _load() -> tuple[tuple[str, Image.Image], ...]:
    return tuple((name, Image.fromarray(photo_array(src, name), "RGB")) for src, name in PHOTOS)


def load() -> tuple[tuple[str, Image.Image], ...]:
    """The bundled photos as (name, RGB image), decoded once per process; ConfigError naming the
    package when scikit-image is not installed."""
    _require_skimage()
    return _load()


def background(
    rng: np.random.Generator, w: int, h: int, photos: tuple[tuple[str, Image.Image], ...]
) -> tuple[Image.Image, Placement]:
    """A w x h background cut from one of `photos`, and where it came from."""
    name, photo = photos[int(rng.integers(len(photos)))]
    pw, ph = photo.size
    cw = min(pw, ph * w / h)  # the largest crop of the aspect ratio w:h
    f = rng.uniform(*CROP_SCALE)
    cw, ch = cw * f, cw * f * h / w
    x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    mirrored = bool(rng.random() < 0.5)
    box = (x0, y0, x0 + cw, y0 + ch)
    img = photo.resize((w, h), Image.Resampling.BILINEAR, box=box)
    if mirrored:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img, Placement(name, box, mirrored)
