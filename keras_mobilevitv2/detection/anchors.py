"""SSD anchor boxes, as ml-cvnets generates them for SSDLite.

Reference: ml-cvnets `cvnets/anchor_generator/ssd_anchor_generator.py` and
`config/detection/ssd_coco/mobilevit_v2.yaml` (the defaults below).
"""

import dataclasses
import math

import numpy as np

__all__ = ["ML_CVNETS_COCO", "AnchorConfig", "input_anchors", "ssd_anchors"]


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """One output stride per detection level (-1: the global 1x1 level), its
    aspect ratios, and the box-size range spread over the levels."""

    output_strides: tuple = (16, 32, 64, 128, 256, -1)
    aspect_ratios: tuple = ((2, 3), (2, 3), (2, 3), (2, 3), (2, 3), (2,))
    min_scale: float = 0.1
    max_scale: float = 1.05

    def __post_init__(self):
        if len(self.aspect_ratios) != len(self.output_strides):
            raise ValueError(
                f"AnchorConfig needs one tuple of aspect ratios per output stride: {len(self.output_strides)} "
                f"strides, {len(self.aspect_ratios)} tuples of ratios."
            )
        if not 0 < self.min_scale < self.max_scale:
            raise ValueError(f"AnchorConfig needs 0 < min_scale < max_scale; got {self.min_scale}, {self.max_scale}.")

    def anchors_per_location(self, level):
        """2 square boxes, then a wide and a tall box per distinct ratio."""
        return 2 + 2 * len(_distinct(self.aspect_ratios[level]))


# ml-cvnets' COCO SSDLite configuration (config/detection/ssd_coco/mobilevit_v2.yaml).
ML_CVNETS_COCO = AnchorConfig()


def _distinct(ratios):
    # ml-cvnets takes list(set(ratios)); for the small integer ratios of its
    # configs that is ascending order.
    return sorted(set(ratios))


def ssd_anchors(feature_sizes, config=ML_CVNETS_COCO):
    """Anchors [N, 4] as (cx, cy, w, h) in [0, 1], float32, for levels of
    `feature_sizes` [(height, width), ...] (`detection.model_anchors` reads
    them from a model: a backbone's odd sizes are rounded up inside it).

    Order: level by level (highest resolution first), then rows, columns, and
    at each location: (min, min), (m, m) with m = sqrt(min * next min), then
    (min * sqrt(r), min / sqrt(r)) and (min / sqrt(r), min * sqrt(r)) for
    each ratio r. Level k's min is linspace(min_scale, max_scale, levels + 1)[k].
    Every value is clipped to [0, 1], as ml-cvnets does.
    """
    if len(feature_sizes) != len(config.output_strides):
        raise ValueError(f"One feature-map size per level: {len(config.output_strides)} levels, got {feature_sizes}.")
    scales = np.linspace(config.min_scale, config.max_scale, len(feature_sizes) + 1)
    levels = []
    for level, (height, width) in enumerate(feature_sizes):
        low, high = scales[level], math.sqrt(scales[level] * scales[level + 1])
        shapes = [(low, low), (high, high)]
        for ratio in _distinct(config.aspect_ratios[level]):
            root = math.sqrt(ratio)
            shapes += [(low * root, low / root), (low / root, low * root)]
        cy, cx = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
        centres = np.stack([cx, cy], -1).reshape(-1, 1, 2)  # [H*W, 1, 2], rows then columns
        sizes = np.broadcast_to(np.asarray(shapes)[None], (height * width, len(shapes), 2))
        centres = np.broadcast_to(centres, sizes.shape)
        levels.append(np.concatenate([centres, sizes], -1).reshape(-1, 4))  # [H*W*A, 4]
    return np.clip(np.concatenate(levels), 0.0, 1.0).astype(np.float32)


def input_anchors(image_size, config=ML_CVNETS_COCO):
    """The anchors of an SSDLite on MobileViTv2 taking `image_size` (an int,
    or (height, width)) inputs, without building it (`model_anchors` reads
    them from a model): every stride-2 layer (3x3, 1-pixel padding) maps n to
    ceil(n / 2); the MobileViT blocks at strides 8, 16 and 32 round an odd
    size up to even (their 2x2 patches); the global level is 1x1."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    sizes = []
    for stride in config.output_strides:
        h, w = height, width
        for level in range(1, int(math.log2(stride)) + 1 if stride > 0 else 0):
            h, w = -(-h // 2), -(-w // 2)
            if level in (3, 4, 5):  # strides 8, 16, 32
                h, w = h + h % 2, w + w % 2
        sizes.append((h, w) if stride > 0 else (1, 1))
    return ssd_anchors(sizes, config)
