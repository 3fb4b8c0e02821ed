"""DeepLabV3 with a MobileViTv2 backbone, as ml-cvnets builds it.

Reference: ml-cvnets `cvnets/models/segmentation/heads/deeplabv3.py`,
`cvnets/modules/aspp_block.py` and `base_seg_head.py` (the auxiliary head);
configs `config/segmentation/{pascal_voc,ade20k}/deeplabv3_mobilevitv2.yaml`.
"""

import os

import keras

from keras_mobilevitv2.arguments import is_positive_integer
from keras_mobilevitv2.arguments import is_width
from keras_mobilevitv2.arguments import validate_rates
from keras_mobilevitv2.layers.inverted_residual import batch_norm
from keras_mobilevitv2.layers.resize import ResizeLike
from keras_mobilevitv2.mobilevitv2 import OUTPUT_STRIDES
from keras_mobilevitv2.mobilevitv2 import PYTORCH_SUFFIXES
from keras_mobilevitv2.mobilevitv2 import MobileViTv2

__all__ = ["DeepLabV3"]

SEGMENTATION_WEIGHT_SUFFIXES = (".weights.h5",) + PYTORCH_SUFFIXES


def _conv_bn_relu(x, filters, kernel_size, name, dilation_rate=1):
    # ml-cvnets' ConvLayer2d with norm and act: no bias, BatchNorm, ReLU (the
    # segmentation head's activation); "same" pads `dilation` on each side
    # for a 3x3, as PyTorch's padding=dilation does.
    x = keras.layers.Conv2D(
        filters, kernel_size, padding="same", dilation_rate=dilation_rate, use_bias=False, name=f"{name}_conv"
    )(x)
    x = batch_norm(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def aspp(x, channels, atrous_rates, dropout):
    """ml-cvnets ASPP: 1x1, one 3x3 per rate, image pooling; concat, 1x1."""
    branches = [_conv_bn_relu(x, channels, 1, "aspp_in")]
    for index, rate in enumerate(atrous_rates, start=1):
        branches.append(_conv_bn_relu(x, channels, 3, f"aspp_atrous{index}", dilation_rate=rate))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)  # [B, 1, 1, C]
    pooled = _conv_bn_relu(pooled, channels, 1, "aspp_pool")
    # Bilinear from 1x1 is a broadcast (F.interpolate, align_corners=False).
    branches.append(ResizeLike(name="aspp_pool_resize")([pooled, x]))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)  # [B, H, W, (n + 2) * channels]
    x = _conv_bn_relu(x, channels, 1, "aspp_project")
    return keras.layers.SpatialDropout2D(dropout, name="aspp_dropout")(x)


def auxiliary_head(x, num_classes, dropout):
    """ml-cvnets' auxiliary head on stage 4: 3x3 + BN + ReLU, dropout, 1x1."""
    inner = max(x.shape[-1] // 4, 128)
    x = _conv_bn_relu(x, inner, 3, "aux")
    x = keras.layers.SpatialDropout2D(dropout, name="aux_dropout")(x)
    return keras.layers.Conv2D(num_classes, 1, name="aux_classifier")(x)


def _backbone_output_stride(backbone):
    strides = 32
    for stage in (4, 5):
        if backbone.get_layer(f"stage{stage}_ir").strides == 1:
            strides //= 2
    return strides


def _check_backbone(backbone, output_stride, include_preprocessing, backbone_weights, input_shape):
    """A MobileViTv2 Keras model to put the head on (built from a width)."""
    if isinstance(backbone, keras.Model):
        names = {layer.name for layer in backbone.layers}
        if not {"stem_conv", "stage4_mvit", "stage5_mvit"} <= names:
            raise ValueError(
                "`backbone` must be a model built by keras_mobilevitv2 (`MobileViTv2(..., "
                f"include_top=False, output_stride=...)`) or a width. Received model {backbone.name!r}."
            )
        found = _backbone_output_stride(backbone)
        if output_stride is not None and output_stride != found:
            raise ValueError(
                f"`output_stride={output_stride}` does not match the backbone, built with output_stride={found}; "
                "build the backbone with `MobileViTv2(..., output_stride=...)` or leave `output_stride=None`."
            )
        if backbone_weights is not None:
            raise ValueError("`backbone_weights` applies only when `backbone` is a width; load them into the model.")
        return backbone
    if not is_width(backbone):
        raise ValueError(
            "`backbone` must be a width multiplier (a positive number, e.g. 0.5 ... 2.0) or a "
            f"keras_mobilevitv2 model. Received: backbone={backbone!r}"
        )
    return MobileViTv2(
        backbone,
        include_top=False,
        weights=backbone_weights,
        input_shape=input_shape,
        include_preprocessing=include_preprocessing,
        output_stride=output_stride or 16,
        name=f"mobilevitv2_{int(round(backbone * 100)):03d}",
    )


def _check_head_arguments(num_classes, atrous_rates, aspp_channels, aspp_dropout, aux_dropout):
    if not is_positive_integer(num_classes):
        raise ValueError(
            f"`num_classes` must be a positive integer (not a bool). Received: num_classes={num_classes!r}"
        )
    if not (
        isinstance(atrous_rates, (tuple, list)) and atrous_rates and all(is_positive_integer(r) for r in atrous_rates)
    ):
        raise ValueError(
            "`atrous_rates` must be a non-empty tuple of positive integers, e.g. (6, 12, 18) (ml-cvnets' "
            f"PASCAL VOC) or (12, 24, 36) (ADE20K, output stride 8). Received: atrous_rates={atrous_rates!r}"
        )
    if not is_positive_integer(aspp_channels):
        raise ValueError(f"`aspp_channels` must be a positive integer. Received: aspp_channels={aspp_channels!r}")
    validate_rates(aspp_dropout=aspp_dropout, aux_dropout=aux_dropout)


def _check_weights(weights):
    if weights is None:
        return
    if not (isinstance(weights, (str, os.PathLike)) and os.path.exists(weights)):
        raise ValueError(
            "`weights` must be `None` or the path to a segmentation weights file: a Keras "
            "`.weights.h5` of this model, or an ml-cvnets / Hugging Face DeepLabV3-MobileViTv2 "
            f"checkpoint (.pt, .pth, .bin, .safetensors). Received: weights={weights!r}"
        )
    if not os.fspath(weights).lower().endswith(SEGMENTATION_WEIGHT_SUFFIXES):
        raise ValueError(
            f"Unrecognised weights file {weights!r}: expected a name ending in one of {SEGMENTATION_WEIGHT_SUFFIXES}."
        )


def DeepLabV3(
    backbone=1.0,
    num_classes=21,
    output_stride=None,
    aux_head=False,
    weights=None,
    backbone_weights=None,
    input_shape=None,
    include_preprocessing=True,
    atrous_rates=(6, 12, 18),
    aspp_channels=512,
    aspp_dropout=0.1,
    aux_dropout=0.1,
    name=None,
):
    """DeepLabV3 semantic segmentation on a MobileViTv2 backbone.

    The head is ml-cvnets' (the models of its zoo): ASPP on the stage-5 map
    (a 1x1 branch, one 3x3 branch per atrous rate, image pooling; each
    conv + BatchNorm + ReLU, `aspp_channels` wide), a 1x1 projection,
    channel dropout, and a 1x1 classifier with bias. Logits are upsampled to
    the input size with bilinear interpolation, `align_corners=True`, as
    ml-cvnets does; the stride-16 (or 8) logits are the output of the layer
    named `"classifier"`.

    | ml-cvnets zoo, width | 0.5 | 0.75 | 1.0 | 1.25 | 1.5 | 1.75 | 2.0 |
    |---|---|---|---|---|---|---|---|
    | PASCAL VOC params (M) | 6.2 | - | 13.3 | 17.7 | 22.6 | - | - |
    | PASCAL VOC mIoU | 75.07 | - | 78.94 | 79.68 | 80.30 | - | - |
    | ADE20K params (M) | 6.3 | 9.6 | 13.4 | 17.7 | 22.6 | 28.1 | 34.0 |
    | ADE20K mIoU | 31.93 | 34.70 | 37.06 | 38.42 | 38.91 | 39.53 | 40.94 |

    (VOC: 21 classes, output stride 16, rates 6/12/18; ADE20K: 150 classes,
    output stride 8, rates 12/24/36. Counts exclude the auxiliary head.)

    Args:
        backbone: A width multiplier (a new MobileViTv2 backbone is built) or
            a keras_mobilevitv2 `MobileViTv2(..., include_top=False)` model,
            whose layers and weights the segmenter then shares.
        num_classes: Output channels (21 for PASCAL VOC, 150 for ADE20K).
        output_stride: 16 (the default for a width) or 8: the backbone
            dilates its last stages instead of striding (32: no dilation,
            coarse masks). With a backbone model, `None` takes its output
            stride.
        aux_head: Adds ml-cvnets' training-time auxiliary head on stage 4;
            the model then outputs `{"logits": ..., "aux_logits": ...}`, both
            at the input size. Weights load either way (the auxiliary ones
            are skipped without it).
        weights: `None` or a weights file: a Keras `.weights.h5` of the same
            architecture, or an ml-cvnets / Hugging Face DeepLabV3
            checkpoint (tensor names detected).
        backbone_weights: With a width: `None`, `"imagenet"` or a
            classification checkpoint for the backbone (the usual start).
        input_shape: `(height, width, 3)`; height and width may be None.
        include_preprocessing: The model takes RGB in [0, 255] (True) or in
            [0, 1], the reference network's input (False).
        atrous_rates, aspp_channels, aspp_dropout, aux_dropout: The head's
            hyper-parameters (ml-cvnets defaults for PASCAL VOC).
        name: The model name; defaults to `"deeplabv3_mobilevitv2_<width>"`.

    Returns:
        A Keras `Model` from [B, H, W, 3] images to [B, H, W, num_classes]
        logits.
    """
    if output_stride is not None and (isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES):
        raise ValueError(
            f"`output_stride` must be one of {OUTPUT_STRIDES} or None. Received: output_stride={output_stride!r}"
        )
    _check_head_arguments(num_classes, atrous_rates, aspp_channels, aspp_dropout, aux_dropout)
    _check_weights(weights)
    backbone = _check_backbone(backbone, output_stride, include_preprocessing, backbone_weights, input_shape)

    image = backbone.inputs[0]
    x = aspp(backbone.get_layer("stage5_mvit").output, aspp_channels, tuple(atrous_rates), aspp_dropout)
    x = keras.layers.Conv2D(num_classes, 1, name="classifier")(x)
    # float32 logits keep the loss exact under mixed precision. Not named
    # "logits": that name marks the classifier's Dense layer to the loaders.
    logits = ResizeLike(align_corners=True, dtype="float32", name="upsampled_logits")([x, image])
    outputs = logits
    if aux_head:
        aux = auxiliary_head(backbone.get_layer("stage4_mvit").output, num_classes, aux_dropout)
        aux = ResizeLike(align_corners=True, dtype="float32", name="aux_logits")([aux, image])
        outputs = {"logits": logits, "aux_logits": aux}
    model = keras.Model(backbone.inputs, outputs, name=name or f"deeplabv3_{backbone.name}")
    if weights is not None:
        _load_weights(model, weights)
    return model


def _load_weights(model, weights):
    if os.fspath(weights).lower().endswith(".weights.h5"):
        model.load_weights(weights)
        return
    from keras_mobilevitv2.pytorch_weights import load_pytorch_weights

    load_pytorch_weights(model, weights)
