"""Writes patches of scikit-image's bundled photographs as an image folder.

    python -m training.prepare_photos --output /data/photos [--size 64] [--train_per_class 150] [--val_per_class 50]

A real dataset of photographs that needs no download: the class of a patch is
the photograph it was cut from, 12 photographs that ship inside
scikit-image (people, animals, objects, textures, astronomy, microscopy).
Patches are square, of a random side between 1/8 and 1/4 of the photograph's
shorter side, resized (area-averaged) to --size. The validation patches come
from the right quarter of every photograph and the training patches from the
rest, so no validation pixel is ever seen in training. Grayscale photographs
become RGB by repeating the gray channel. Written in the ImageNet layout the
trainer reads: <output>/train/<class>/*.png and <output>/val/<class>/*.png.
"""

import argparse
import os
import sys

import numpy as np

# skimage.data function names of the bundled photographs (no pooch download).
PHOTOGRAPHS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "moon",
    "retina",
    "rocket",
)
VAL_FRACTION = 0.25  # the right quarter of each photograph


def load_photograph(name):
    """The photograph as uint8 RGB [H, W, 3]."""
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("prepare_photos needs scikit-image: pip install scikit-image") from None
    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def patch_boxes(height, width, count, split, rng):
    """`count` (top, left, side) squares inside `split`'s columns."""
    boundary = int(round(width * (1 - VAL_FRACTION)))
    first, last = (0, boundary) if split == "train" else (boundary, width)
    shorter = min(height, width)
    boxes = []
    for _ in range(count):
        side = int(rng.randint(shorter // 8, shorter // 4 + 1))
        side = min(side, last - first, height)
        top = int(rng.randint(0, height - side + 1))
        left = int(rng.randint(first, last - side + 1))
        boxes.append((top, left, side))
    return boxes


def write_photos(output, size=64, train_per_class=150, val_per_class=50, seed=0):
    import tensorflow as tf

    if size < 8 or train_per_class < 1 or val_per_class < 1:
        raise SystemExit(f"--size must be >= 8 and the per-class counts >= 1; got {size}, {train_per_class}, "
                         f"{val_per_class}.")  # fmt: skip
    if os.path.exists(output) and os.listdir(output):
        raise SystemExit(f"{output} exists and is not empty; choose a new folder.")
    rng = np.random.RandomState(seed)
    counts = {"train": 0, "val": 0}
    for name in PHOTOGRAPHS:
        image = load_photograph(name)
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = os.path.join(output, split, name)
            os.makedirs(folder, exist_ok=True)
            for index, (top, left, side) in enumerate(patch_boxes(*image.shape[:2], count, split, rng)):
                patch = tf.constant(image[top : top + side, left : left + side], tf.float32)[None]
                resized = tf.image.resize(patch, (size, size), method="area")[0]
                pixels = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
                tf.io.write_file(os.path.join(folder, f"{index:04d}.png"), tf.io.encode_png(pixels))
                counts[split] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train_per_class", type=int, default=150)
    parser.add_argument("--val_per_class", type=int, default=50)
    args = parser.parse_args(argv)
    counts = write_photos(args.output, args.size, args.train_per_class, args.val_per_class)
    print(f"Wrote {counts['train']} train and {counts['val']} val patches of {len(PHOTOGRAPHS)} photographs "
          f"to {args.output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
