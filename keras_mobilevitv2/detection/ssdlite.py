"""SSDLite with a MobileViTv2 backbone, as ml-cvnets builds it.

Reference: ml-cvnets `cvnets/models/detection/ssd.py` (the extra layers),
`cvnets/modules/ssd_heads.py` (the heads), `config/detection/ssd_coco/
mobilevit_v2.yaml` (320x320, strides 16-256 and global, projections
[512, 256, 256, 128, 128, 64]). The backbone keeps its SiLU; the extra
layers and heads use ReLU, as ml-cvnets' general activation.
"""

import keras

from keras_mobilevitv2.arguments import is_positive_integer
from keras_mobilevitv2.arguments import is_width
from keras_mobilevitv2.detection.anchors import ML_CVNETS_COCO
from keras_mobilevitv2.detection.anchors import AnchorConfig
from keras_mobilevitv2.detection.anchors import ssd_anchors
from keras_mobilevitv2.layers.channel_slice import ChannelSlice
from keras_mobilevitv2.layers.inverted_residual import batch_norm
from keras_mobilevitv2.mobilevitv2 import MobileViTv2

__all__ = ["SSDLite", "model_anchors"]

# Output stride -> the backbone layer whose output is that level.
BACKBONE_LEVELS = {8: "stage3_mvit", 16: "stage4_mvit", 32: "stage5_mvit"}
EXTRA_STRIDES = (64, 128, 256)
PROJ_CHANNELS = (512, 256, 256, 128, 128, 64)
# The global level's 1x1 convolution: ml-cvnets' fixed width for output stride -1.
GLOBAL_CHANNELS = 64


def _separable_down(x, filters, name):
    """ml-cvnets SeparableConv2d, stride 2: depthwise 3x3 + BN (no
    activation), pointwise 1x1 + BN + ReLU; PyTorch's 1-pixel padding."""
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False, name=f"{name}_dw")(x)
    x = batch_norm(f"{name}_dw_bn")(x)
    x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw")(x)
    x = batch_norm(f"{name}_pw_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _levels(backbone, config, proj_channels):
    """Each level's feature map, highest resolution first."""
    features = []
    for index, stride in enumerate(config.output_strides):
        name = f"os{stride}" if stride != -1 else "global"
        if stride in BACKBONE_LEVELS:
            features.append(backbone.get_layer(BACKBONE_LEVELS[stride]).output)
        elif stride == -1:
            x = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(features[-1])  # [B,1,1,C]
            x = keras.layers.Conv2D(GLOBAL_CHANNELS, 1, use_bias=False, name=f"{name}_conv")(x)
            features.append(keras.layers.ReLU(name=f"{name}_relu")(x))
        else:
            features.append(_separable_down(features[-1], proj_channels[index], f"extra_{name}"))
    return features


def _head(x, level, config, proj_channels, num_classes):
    """ml-cvnets SSDHead: [1x1 projection] then a separable 3x3 (1x1 at the
    global level) to anchors x (4 + classes); -> [B, H*W*A, 4 + classes],
    rows, then columns, then anchors (ml-cvnets' order)."""
    name = f"head{level}"
    outputs = config.anchors_per_location(level) * (4 + num_classes)
    if config.output_strides[level] == -1:
        x = keras.layers.Conv2D(outputs, 1, name=f"{name}_conv")(x)
    else:
        if proj_channels[level] != x.shape[-1]:
            x = keras.layers.Conv2D(proj_channels[level], 1, use_bias=False, name=f"{name}_proj")(x)
            x = batch_norm(f"{name}_proj_bn")(x)
            x = keras.layers.ReLU(name=f"{name}_proj_relu")(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_dw")(x)
        x = batch_norm(f"{name}_dw_bn")(x)
        x = keras.layers.Conv2D(outputs, 1, name=f"{name}_conv")(x)
    return keras.layers.Reshape((-1, 4 + num_classes), name=f"{name}_reshape")(x)  # [B, H*W*A, 4 + C]


def _check_strides(strides):
    expected = [s for s in strides if s in BACKBONE_LEVELS]
    extra = [s for s in strides if s not in BACKBONE_LEVELS and s != -1]
    valid = (
        expected
        and list(strides[: len(expected)]) == sorted(expected)
        and extra == list(EXTRA_STRIDES[: len(extra)])
        and (not extra or expected[-1] == 32)
        and list(strides).count(-1) <= 1
        and (-1 not in strides or strides[-1] == -1)
        and list(strides) == expected + extra + [-1] * (-1 in strides)
    )
    if not valid:
        raise ValueError(
            "AnchorConfig.output_strides must be backbone strides from (8, 16, 32) in order, then extra "
            "strides 64, 128, 256 in order (after 32), then optionally -1 (the global level), e.g. ml-cvnets' "
            f"(16, 32, 64, 128, 256, -1). Received: {tuple(strides)}"
        )


def _check_arguments(backbone, num_classes, anchors, proj_channels):
    if not (isinstance(backbone, keras.Model) or is_width(backbone)):
        raise ValueError(
            "`backbone` must be a width multiplier (a positive number, e.g. 0.5 ... 2.0) or a keras_mobilevitv2 "
            f"model built with `include_top=False`. Received: backbone={backbone!r}"
        )
    if not is_positive_integer(num_classes) or num_classes < 2:
        raise ValueError(
            "`num_classes` must be an integer >= 2 that counts the background (class 0): 81 for COCO's 80 "
            f"classes. Received: num_classes={num_classes!r}"
        )
    if not isinstance(anchors, AnchorConfig):
        raise ValueError(f"`anchors` must be a keras_mobilevitv2.detection.AnchorConfig. Received: {anchors!r}")
    _check_strides(anchors.output_strides)
    if len(proj_channels) != len(anchors.output_strides) or not all(is_positive_integer(c) for c in proj_channels):
        raise ValueError(
            f"`proj_channels` must hold one positive integer per level ({len(anchors.output_strides)} levels). "
            f"Received: proj_channels={proj_channels!r}"
        )


def SSDLite(
    backbone=1.0,
    num_classes=81,
    input_shape=(320, 320, 3),
    backbone_weights=None,
    include_preprocessing=True,
    anchors=ML_CVNETS_COCO,
    proj_channels=PROJ_CHANNELS,
    name=None,
):
    """SSDLite object detection on a MobileViTv2 backbone (ml-cvnets' model).

    | ml-cvnets zoo (COCO, 320x320), width | 0.5 | 0.75 | 1.0 | 1.25 | 1.5 | 1.75 | 2.0 |
    |---|---|---|---|---|---|---|---|
    | params (M) | 2.0 | 3.6 | 5.6 | 8.2 | 11.3 | 14.9 | 19.1 |
    | mAP | 21.24 | 24.57 | 26.47 | 27.85 | 28.83 | 29.52 | 30.21 |

    Args:
        backbone: A width multiplier (a new MobileViTv2 is built) or a
            keras_mobilevitv2 `MobileViTv2(..., include_top=False)` model.
        num_classes: Classes including the background, which is class 0
            (81 for COCO).
        input_shape: `(height, width, 3)`, static: the anchors depend on it.
        backbone_weights: With a width: `None`, `"imagenet"` or a
            classification checkpoint for the backbone.
        include_preprocessing: The model takes RGB in [0, 255] (True) or in
            [0, 1], the reference network's input (False).
        anchors: The levels and anchor shapes (`AnchorConfig`; ml-cvnets'
            COCO configuration by default).
        proj_channels: Each level's channels (ml-cvnets' defaults).
        name: The model name; defaults to `"ssdlite_mobilevitv2_<width>"`.

    Returns:
        A Keras `Model` from [B, H, W, 3] images to `{"box_deltas": [B, N, 4],
        "class_logits": [B, N, num_classes]}`, one row per anchor of
        `model_anchors(model)` (N = 3232 at 320x320): box offsets encoded
        against the anchor with variances 0.1 / 0.2, and class logits
        (softmax over the classes, background included).
    """
    _check_arguments(backbone, num_classes, anchors, proj_channels)
    if input_shape is None or len(input_shape) != 3 or None in input_shape[:2]:
        raise ValueError(
            f"`input_shape` must be a static (height, width, 3): the anchors depend on it. Received: {input_shape!r}"
        )
    if not isinstance(backbone, keras.Model):
        backbone = MobileViTv2(
            backbone,
            include_top=False,
            weights=backbone_weights,
            input_shape=tuple(input_shape),
            include_preprocessing=include_preprocessing,
            name=f"mobilevitv2_{int(round(backbone * 100)):03d}",
        )
    features = _levels(backbone, anchors, proj_channels)
    deltas, logits = [], []
    for level, feature in enumerate(features):
        rows = _head(feature, level, anchors, proj_channels, num_classes)
        deltas.append(ChannelSlice(0, 4, name=f"head{level}_box_deltas")(rows))
        logits.append(ChannelSlice(4, 4 + num_classes, name=f"head{level}_class_logits")(rows))
    outputs = {
        "box_deltas": keras.layers.Concatenate(axis=1, name="box_deltas")(deltas),  # [B, N, 4]
        "class_logits": keras.layers.Concatenate(axis=1, name="class_logits")(logits),  # [B, N, C]
    }
    return keras.Model(backbone.inputs, outputs, name=name or f"ssdlite_{backbone.name}")


def model_anchors(model, anchors=ML_CVNETS_COCO):
    """The anchors [N, 4] (cx, cy, w, h) of an SSDLite model, from its
    levels' feature-map sizes (so any input size gets matching anchors)."""
    sizes = []
    for level in range(len(anchors.output_strides)):
        shape = model.get_layer(f"head{level}_reshape").input.shape  # [B, H, W, A * (4 + C)]
        sizes.append((shape[1], shape[2]))
    return ssd_anchors(sizes, anchors)
