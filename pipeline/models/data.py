"""Training data: images-manifest rows -> decoded tensors, on Ray Data.

Decoding runs in Ray Data tasks (``map_batches``). Training images are decoded as uint8, a little
larger than the input, and augmented by the training worker itself, a batch at a time on its device
(``pipeline.models.augment``). When the decoded images are small enough (``cache_bytes``), they are
decoded once and kept in the object store, so an epoch reads them as they are. Evaluation squashes the
whole image to the input size (no centre crop: the object may sit anywhere). Rows may carry a box
(``x0, y0, x1, y1``, pixels of the normalized image, x1 and y1 exclusive): that part of the image is cut
out first and then gets the same squash-resize as a whole image, so crops and originals are compared
under one protocol.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import storage
from pipeline.models.augment import Augment, normalize

__all__ = ["Augment", "normalize"]  # the augmentation's settings and normalization live in augment.py


def load_rgb(uri: str) -> Image.Image:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return im.convert("RGB")


BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def crop_box(image: Image.Image, box: np.ndarray | None) -> Image.Image:
    """The box's part of the image (clipped to it); the whole image for a missing (NaN) or empty box."""
    if box is None or np.isnan(box).any():
        return image
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(image.width, int(box[2])), min(image.height, int(box[3]))
    return image.crop((x0, y0, x1, y1)) if x1 > x0 and y1 > y0 else image


def decode_batch(
    batch: dict[str, np.ndarray], *, out: str, size: int, as_float: bool
) -> dict[str, np.ndarray]:
    """Ray Data map_batches: blob paths -> images squashed to size x size, uint8 (N, 3, H, W), or float32
    normalized when ``as_float``. With box columns (float, NaN where a row has none), each row's box is
    cut out before the same resize."""
    boxes = np.stack([batch[c] for c in BOX_COLUMNS], axis=1) if BOX_COLUMNS[0] in batch else None
    arrays = [
        np.asarray(crop_box(load_rgb(storage.join(out, p)), None if boxes is None else boxes[i])
                   .resize((size, size), Image.Resampling.BILINEAR))
        for i, p in enumerate(batch["path"])
    ]  # fmt: skip
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    pixels = (normalize(images) if as_float else images).numpy()
    return {"image": pixels, "label": batch["label"].astype(np.int64), "row": batch["row"].astype(np.int64)}


def training_rows(images: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """ok images with a split, their class index and a stable row number."""
    index = {c: i for i, c in enumerate(classes)}
    ok = images[(images["status"] == "ok") & images["split"].notna() & images["label"].isin(index)]
    return ok.assign(label_idx=ok["label"].map(index).astype(np.int64)).reset_index(drop=True)


def decoded_size(size: int, augment: Augment | None) -> int:
    """The side images are decoded at: the input size, or a little more for training's random crops."""
    return size if augment is None else round(size * 8 / 7)


def decoded_bytes(rows: int, size: int, augment: Augment | None) -> int:
    """What ``ray_dataset`` keeps in the object store for ``rows`` images: uint8 for training (augmented
    afresh each epoch), normalized float32 for evaluation."""
    side = decoded_size(size, augment)
    return rows * side * side * 3 * (4 if augment is None else 1)


def decode_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """What ``decode_batch`` reads of image rows: path, class index and row number, and the box columns
    (as float, NaN for "no box") when the rows have them."""
    frame = pd.DataFrame({"path": rows["path"].to_numpy(), "label": rows["label_idx"].to_numpy(),
                          "row": np.arange(len(rows))})  # fmt: skip
    if all(c in rows.columns for c in BOX_COLUMNS):  # crops: nullable ints -> float, NaN for "no box"
        for c in BOX_COLUMNS:
            frame[c] = pd.to_numeric(rows[c], errors="coerce").astype("float64").to_numpy()
    return frame


def decode_rows(rows: pd.DataFrame, out: str, size: int, as_float: bool) -> dict[str, np.ndarray]:
    """Every row's image (or box) decoded in this process, as the Ray Data tasks decode it."""
    frame = decode_frame(rows)
    return decode_batch(
        {c: frame[c].to_numpy() for c in frame.columns}, out=out, size=size, as_float=as_float
    )


def ray_dataset(rows: pd.DataFrame, out: str, size: int, augment: Augment | None, batch_size: int = 32,
                cache_bytes: int = 2**30, seed: int = 0, num_cpus: float = 1.0):  # fmt: skip
    """A Ray Dataset of these rows' images (or of their boxes, when the rows have box columns): decoded
    and normalized (evaluation), or decoded as uint8 at ``decoded_size`` for the training worker to
    augment afresh each epoch (training: ``augment`` given, rows shuffled once). Each of its
    tasks asks for ``num_cpus``: less than a whole CPU where the training workers it feeds leave only
    part of one on a node (``pipeline.stages.train.data_cpus``)."""
    import ray

    frame = decode_frame(rows)
    if augment is not None:  # training: mix the classes across blocks (the manifest groups them)
        frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    base_size = decoded_size(size, augment)
    decoded = ray.data.from_pandas(frame).map_batches(
        decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"out": out, "size": base_size, "as_float": augment is None},
    )  # fmt: skip
    if decoded_bytes(len(rows), size, augment) <= cache_bytes:
        decoded = decoded.materialize()
    return decoded
