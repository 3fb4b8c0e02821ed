"""SSDLite with a MobileViTv2 backbone, as ml-cvnets builds it.

Reference: ml-cvnets `cvnets/models/detection/ssd.py` (the extra layers),
`cvnets/modules/ssd_heads.py` (the heads), `config/detection/ssd_coco/
mobilevit_v2.yaml` (320x320, strides 16-256 and global, projections
[512, 256, 256, 128, 128, 64]). The backbone keeps its SiLU; the extra
layers and heads use ReLU, as ml-cvnets' general activation.

Another backbone (e.g. `keras.applications.MobileNetV2`, with
`backbone_levels=MOBILENET_V2_LEVELS`) gets the same extra layers and heads,
so the backbones can be compared in one detector.
"""

import math

import keras

from keras_mobilevitv2.arguments import is_positive_integer
from keras_mobilevitv2.arguments import is_width
from keras_mobilevitv2.detection.anchors import ML_CVNETS_COCO
from keras_mobilevitv2.detection.anchors import AnchorConfig
from keras_mobilevitv2.detection.anchors import ssd_anchors
from keras_mobilevitv2.layers.channel_slice import ChannelSlice
from keras_mobilevitv2.layers.inverted_residual import batch_norm
from keras_mobilevitv2.mobilevitv2 import MobileViTv2

__all__ = ["MOBILENET_V2_LEVELS", "MOBILEVITV2_LEVELS", "SSDLite", "model_anchors"]

# The output strides a backbone provides; the detector adds the coarser ones.
BACKBONE_STRIDES = (8, 16, 32)
# Output stride -> the layer of this package's MobileViTv2 whose output is that level.
MOBILEVITV2_LEVELS = {8: "stage3_mvit", 16: "stage4_mvit", 32: "stage5_mvit"}
# The same for keras.applications.MobileNetV2, as the SSDLite paper (and the
# TF Object Detection API's ssd_mobilenet_v2) takes them: stride 16 is block
# 13's expansion (576 channels at width 1.0), the input of the depthwise
# convolution that goes to stride 32; stride 32 the last 1x1 convolution (1280).
MOBILENET_V2_LEVELS = {16: "block_13_expand_relu", 32: "out_relu"}
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


def _levels(backbone, config, proj_channels, backbone_levels):
    """Each level's feature map, highest resolution first."""
    levels = MOBILEVITV2_LEVELS if backbone_levels is None else backbone_levels
    features = []
    for index, stride in enumerate(config.output_strides):
        name = f"os{stride}" if stride != -1 else "global"
        if stride in BACKBONE_STRIDES:
            features.append(_backbone_level(backbone, stride, levels, backbone_levels is not None))
        elif stride == -1:
            x = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(features[-1])  # [B,1,1,C]
            x = keras.layers.Conv2D(GLOBAL_CHANNELS, 1, use_bias=False, name=f"{name}_conv")(x)
            features.append(keras.layers.ReLU(name=f"{name}_relu")(x))
        else:
            features.append(_separable_down(features[-1], proj_channels[index], f"extra_{name}"))
    return features


def _backbone_level(backbone, stride, levels, named_by_user):
    """The backbone layer output that is the level at `stride`; a layer
    named by the user is checked to have that stride."""
    if stride not in levels:
        raise ValueError(
            f"`anchors.output_strides` takes output stride {stride} from the backbone, but `backbone_levels` "
            f"names no layer for it. Received: backbone_levels={levels!r}"
        )
    try:
        layer = backbone.get_layer(levels[stride])
    except ValueError:
        if named_by_user:
            reason = f"which `backbone_levels` names for output stride {stride}"
        else:
            reason = (
                f"this package's MobileViTv2 level at output stride {stride}. Another backbone needs "
                "`backbone_levels`, its layers at output strides 16 and 32 (for ml-cvnets' anchors), e.g. "
                "backbone_levels=MOBILENET_V2_LEVELS for keras.applications.MobileNetV2"
            )
        raise ValueError(f"The backbone {backbone.name!r} has no layer {levels[stride]!r}, {reason}.") from None
    if named_by_user:
        _check_level_shape(backbone, stride, layer)
    return layer.output


def _check_level_shape(backbone, stride, layer):
    # Only a static size can be checked. A backbone rounds odd sizes down or
    # up, and padding to even sizes (MobileViTv2's 2x2 patches) adds up to one
    # more: a level of the wrong stride is still twice or half the size.
    shape = tuple(layer.output.shape) if not isinstance(layer.output, (list, tuple, dict)) else None
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"Layer {layer.name!r} of the backbone, named for output stride {stride} in `backbone_levels`, must "
            f"output one [batch, height, width, channels] feature map. Its output: {layer.output!r}"
        )
    height, width = backbone.inputs[0].shape[1:3]
    if None in (height, width, shape[1], shape[2]):
        return
    fits = all(
        size // stride <= level <= math.ceil(size / stride) + 1 for size, level in zip((height, width), shape[1:3])
    )
    if not fits:
        raise ValueError(
            f"Layer {layer.name!r} of the backbone outputs {shape[1]}x{shape[2]} at input {height}x{width}, not "
            f"output stride {stride} ({math.ceil(height / stride)}x{math.ceil(width / stride)}): name the "
            f"backbone's stride-{stride} layer in `backbone_levels`."
        )


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
    expected = [s for s in strides if s in BACKBONE_STRIDES]
    extra = [s for s in strides if s not in BACKBONE_STRIDES and s != -1]
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


def _check_backbone_levels(backbone, backbone_levels):
    if backbone_levels is None:
        return
    if not isinstance(backbone, keras.Model):
        raise ValueError(
            "`backbone_levels` names layers of a backbone model; a width builds this package's MobileViTv2, "
            f"whose levels are known. Received: backbone={backbone!r}, backbone_levels={backbone_levels!r}"
        )
    valid = (
        isinstance(backbone_levels, dict)
        and backbone_levels
        and all(stride in BACKBONE_STRIDES for stride in backbone_levels)
        and all(isinstance(name, str) for name in backbone_levels.values())
    )
    if not valid:
        raise ValueError(
            f"`backbone_levels` must map output strides from {BACKBONE_STRIDES} to layer names of the backbone, "
            f"e.g. MOBILENET_V2_LEVELS = {MOBILENET_V2_LEVELS!r} for keras.applications.MobileNetV2. "
            f"Received: backbone_levels={backbone_levels!r}"
        )


def _check_arguments(backbone, num_classes, anchors, proj_channels, backbone_levels):
    if not (isinstance(backbone, keras.Model) or is_width(backbone)):
        raise ValueError(
            "`backbone` must be a width multiplier (a positive number, e.g. 0.5 ... 2.0) or a keras_mobilevitv2 "
            "model built with `include_top=False` (another Keras backbone model with `backbone_levels`). "
            f"Received: backbone={backbone!r}"
        )
    _check_backbone_levels(backbone, backbone_levels)
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
    backbone_levels=None,
):
    """SSDLite object detection on a MobileViTv2 backbone (ml-cvnets' model).

    | ml-cvnets zoo (COCO, 320x320), width | 0.5 | 0.75 | 1.0 | 1.25 | 1.5 | 1.75 | 2.0 |
    |---|---|---|---|---|---|---|---|
    | params (M) | 2.0 | 3.6 | 5.6 | 8.2 | 11.3 | 14.9 | 19.1 |
    | mAP | 21.24 | 24.57 | 26.47 | 27.85 | 28.83 | 29.52 | 30.21 |

    Args:
        backbone: A width multiplier (a new MobileViTv2 is built), a
            keras_mobilevitv2 `MobileViTv2(..., include_top=False)` model,
            or another Keras backbone model with `backbone_levels`. A model
            brings its own input (range and size; build it with a static
            size, which the anchors depend on).
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
        name: The model name; defaults to `"ssdlite_<backbone name>"`.
        backbone_levels: For a backbone model other than this package's
            MobileViTv2: `{output stride: layer name}` for the strides of
            `anchors` taken from the backbone (16 and 32 by default), e.g.
            `MOBILENET_V2_LEVELS` for `keras.applications.MobileNetV2(
            include_top=False, input_shape=(320, 320, 3))`. Each layer's
            output is checked to be at its stride.

    Returns:
        A Keras `Model` from [B, H, W, 3] images to `{"box_deltas": [B, N, 4],
        "class_logits": [B, N, num_classes]}`, one row per anchor of
        `model_anchors(model)` (N = 3232 at 320x320): box offsets encoded
        against the anchor with variances 0.1 / 0.2, and class logits
        (softmax over the classes, background included).
    """
    _check_arguments(backbone, num_classes, anchors, proj_channels, backbone_levels)
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
    features = _levels(backbone, anchors, proj_channels, backbone_levels)
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
