"""Writes scikit-learn's bundled handwritten digits as an image folder.

    python -m training.prepare_digits --output /data/digits [--size 32]

1,797 real 8x8 scans of handwritten digits (UCI optical digits) ship inside
scikit-learn, so this real dataset needs no download. They are upscaled
(nearest) to RGB PNGs in the ImageNet layout the trainer reads:
<output>/train/<digit>/*.png and <output>/val/<digit>/*.png (a fixed 80/20
split per class).
"""

import argparse
import os
import sys

import numpy as np


def write_digits(output, size=32, eval_fraction=0.2, seed=0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("prepare_digits needs scikit-learn: pip install scikit-learn") from None
    import tensorflow as tf

    if os.path.exists(output) and os.listdir(output):
        raise SystemExit(f"{output} exists and is not empty; choose a new folder.")
    digits = load_digits()
    rng = np.random.RandomState(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        n_eval = int(round(len(indices) * eval_fraction))
        for split, chosen in (("val", indices[:n_eval]), ("train", indices[n_eval:])):
            folder = os.path.join(output, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for index in chosen:
                gray = (digits.images[index] / 16.0 * 255).astype(np.uint8)  # values 0..16
                repeat = -(-size // 8)
                big = np.kron(gray, np.ones((repeat, repeat), np.uint8))[:size, :size]
                rgb = np.repeat(big[..., None], 3, axis=-1)
                tf.io.write_file(os.path.join(folder, f"{index:04d}.png"), tf.io.encode_png(rgb))
                counts[split] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    counts = write_digits(args.output, args.size)
    print(f"Wrote {counts['train']} train and {counts['val']} val images to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
