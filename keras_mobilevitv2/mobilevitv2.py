"""MobileViTv2 image classification models with the keras.applications API.

Reference:
- [Separable Self-attention for Mobile Vision Transformers](
    https://arxiv.org/abs/2206.02680) (Mehta & Rastegari, 2022)
- Reference implementation: apple/ml-cvnets (weights: Apple sample-code
  license); timm and Hugging Face publish the same weights under their names.
"""

import os

import keras

from keras_mobilevitv2.arguments import is_positive_integer
from keras_mobilevitv2.arguments import is_width
from keras_mobilevitv2.arguments import validate_input_shape
from keras_mobilevitv2.arguments import validate_rates
from keras_mobilevitv2.config import WIDTHS
from keras_mobilevitv2.config import config_for_width
from keras_mobilevitv2.layers import InvertedResidual
from keras_mobilevitv2.layers import MobileViTv2Block
from keras_mobilevitv2.layers.inverted_residual import batch_norm
from keras_mobilevitv2.layers.normalization import validate_attention_norm

DEFAULT_SIZE = 256
POOLING_MODES = (None, "avg", "max")
OUTPUT_STRIDES = (8, 16, 32)
PYTORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
KERAS_WEIGHTS_SUFFIXES = (".weights.h5", ".h5")


def _validate_width(width_multiplier):
    if not is_width(width_multiplier):
        raise ValueError(
            "`width_multiplier` must be a positive number (not a bool). "
            f"Received: width_multiplier={width_multiplier!r}"
        )
    return float(width_multiplier)


def _validate_classes(classes):
    if not is_positive_integer(classes):
        raise ValueError(
            f"`classes` must be a positive integer (Python or numpy, not a bool). Received: classes={classes!r}"
        )
    return int(classes)


def _validate_weights(weights, include_top, classes):
    if not (
        weights is None
        or weights == "imagenet"
        or (isinstance(weights, (str, os.PathLike)) and os.path.exists(weights))
    ):
        raise ValueError(
            "The `weights` argument should be either `None` (random "
            "initialization), `imagenet` (pre-training on ImageNet), or the "
            "path to the weights file to be loaded (a Keras `.weights.h5`, or "
            "a PyTorch checkpoint `.pt`/`.pth`/`.bin`/`.safetensors` from "
            f"ml-cvnets, timm or Hugging Face). Received weights={weights}"
        )
    if weights is not None and weights != "imagenet":
        path = os.fspath(weights).lower()
        if not path.endswith(PYTORCH_SUFFIXES + KERAS_WEIGHTS_SUFFIXES):
            raise ValueError(
                f"Unrecognised weights file {weights!r}: expected a name ending "
                f"in one of {PYTORCH_SUFFIXES + KERAS_WEIGHTS_SUFFIXES}."
            )
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(
            'If using `weights="imagenet"` with `include_top` as true, '
            f"`classes` should be 1000.  Received classes={classes}"
        )


def _validate_classifier_activation(classifier_activation, weights):
    if weights is None:
        return
    activation = keras.activations.get(classifier_activation)
    if activation not in (keras.activations.softmax, keras.activations.linear):
        raise ValueError(
            "Only `None` and `softmax` activations are allowed for the "
            "`classifier_activation` argument when using pretrained weights, "
            "with `include_top=True`; Received: "
            f"classifier_activation={classifier_activation}"
        )


def stage_dilations(stage, output_stride):
    """(IR strides, IR dilation, block dilation) of stage 3, 4 or 5.

    ml-cvnets' dilated backbone: a stage past `output_stride` keeps stride 1;
    its inverted residual takes the dilation reached before the stage and its
    MobileViTv2 block twice that.
    """
    # Stage s ends at stride 2**s; 2**s / output_stride stages are dilated.
    before = max(1, 2 ** (stage - 1) // output_stride)
    if 2**stage <= output_stride:
        return 2, 1, 1
    return 1, before, 2 * before


def MobileViTv2(
    width_multiplier=1.0,
    include_top=True,
    weights="imagenet",
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    include_preprocessing=True,
    name=None,
    dropout=0.0,
    attn_dropout=0.0,
    ffn_dropout=0.0,
    attention_norm="layer_norm_2d",
    output_stride=32,
):
    """Builds a MobileViTv2 of any width; see the named variants' docstring."""
    if keras.config.image_data_format() == "channels_first":
        raise ValueError(
            "MobileViTv2 does not support the `channels_first` image data "
            "format: it is built channels-last (NHWC), the layout TFLite and "
            "the Edge TPU use. Call "
            "`keras.config.set_image_data_format('channels_last')` and "
            "transpose inputs to (batch, height, width, channels)."
        )
    width_multiplier = _validate_width(width_multiplier)
    rates = validate_rates(dropout=dropout, attn_dropout=attn_dropout, ffn_dropout=ffn_dropout)
    if weights == "imagenet" and width_multiplier not in WIDTHS.values():
        raise ValueError(
            "If imagenet weights are being loaded, `width_multiplier` must be "
            f"one of {sorted(WIDTHS.values())}. Received: "
            f"width_multiplier={width_multiplier}"
        )
    _validate_weights(weights, include_top, classes)
    validate_attention_norm(attention_norm)
    if (
        attention_norm != "layer_norm_2d"
        and weights is not None
        and not (os.fspath(weights).lower().endswith(KERAS_WEIGHTS_SUFFIXES))
    ):
        raise ValueError(
            "The published MobileViTv2 checkpoints use "
            "attention_norm='layer_norm_2d'; a model built with "
            f"attention_norm={attention_norm!r} can only load a Keras "
            "`.weights.h5` file of the same architecture. Received: "
            f"weights={weights!r}"
        )
    if output_stride not in OUTPUT_STRIDES or isinstance(output_stride, bool):
        raise ValueError(f"`output_stride` must be one of {OUTPUT_STRIDES}. Received: output_stride={output_stride!r}")
    if pooling not in POOLING_MODES:
        raise ValueError(f"`pooling` must be one of None, 'avg' or 'max'. Received: pooling={pooling}")
    if include_top:
        classes = _validate_classes(classes)
        _validate_classifier_activation(classifier_activation, weights)
    input_shape = validate_input_shape(input_shape, input_tensor, weights)

    config = config_for_width(width_multiplier)
    if name is None:
        name = f"mobilevitv2_{int(round(width_multiplier * 100)):03d}"

    if input_tensor is None:
        inputs = keras.Input(shape=input_shape, name="image")
    else:
        inputs = input_tensor

    x = inputs
    if include_preprocessing:
        # RGB in [0, 255] -> [0, 1]; the reference network uses no mean/std.
        x = keras.layers.Rescaling(1.0 / 255.0, name="rescaling")(x)

    # Stem. Explicit symmetric padding reproduces PyTorch's stride-2 conv.
    x = keras.layers.ZeroPadding2D(1, name="stem_pad")(x)
    x = keras.layers.Conv2D(config.stem_channels, 3, strides=2, use_bias=False, name="stem_conv")(x)
    x = batch_norm("stem_bn")(x)
    x = keras.layers.Activation("silu", name="stem_activation")(x)

    x = InvertedResidual(config.stage1_channels, strides=1, name="stage1_ir1")(x)
    x = InvertedResidual(config.stage2_channels, strides=2, name="stage2_ir1")(x)
    x = InvertedResidual(config.stage2_channels, strides=1, name="stage2_ir2")(x)
    for index, stage in enumerate(config.vit_stages, start=3):
        strides, ir_dilation, block_dilation = stage_dilations(index, output_stride)
        x = InvertedResidual(stage.channels, strides=strides, dilation_rate=ir_dilation, name=f"stage{index}_ir")(x)
        x = MobileViTv2Block(
            stage.attn_dim,
            stage.num_blocks,
            **rates,
            dilation=block_dilation,
            attention_norm=attention_norm,
            name=f"stage{index}_mvit",
        )(x)

    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, name="logits")(x)
        # float32 output keeps softmax exact under mixed precision.
        x = keras.layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)

    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(inputs, x, name=name)

    if weights is not None:
        from keras_mobilevitv2 import weights as weights_lib

        weights_lib.load_weights_into(model, weights, width_multiplier)
    return model


BASE_DOCSTRING = """Instantiates the {name} architecture.

Reference:
- [Separable Self-attention for Mobile Vision Transformers](
    https://arxiv.org/abs/2206.02680) (Mehta & Rastegari, 2022)

| model | params | ImageNet-1k top-1 @256 (ml-cvnets) |
|---|---|---|
| MobileViTv2_050 | 1,370,593 | 70.18 |
| MobileViTv2_075 | 2,866,009 | 75.56 |
| MobileViTv2_100 | 4,901,841 | 78.09 |
| MobileViTv2_125 | 7,478,089 | 79.65 |
| MobileViTv2_150 | 10,594,753 | 80.38 |
| MobileViTv2_175 | 14,251,833 | 80.84 |
| MobileViTv2_200 | 18,449,329 | 81.17 |

Note: with `include_preprocessing=True` (the default) the model takes RGB
images with values in [0, 255]; `preprocess_input` is then a pass-through.
With `include_preprocessing=False` it takes what the reference network
takes: RGB in [0, 1], no mean/std normalization. The reference evaluation
resizes the shorter side to 288 (bicubic) and center-crops 256x256. Any
input size from 32x32 up works; a MobileViTv2 block that receives an odd
feature map resizes it up to even size as ml-cvnets and timm do.

Args:
    include_top: Whether to include the classification head.
    weights: `None` (random initialization), `"imagenet"` (the official
        ml-cvnets ImageNet-1k weights, downloaded once, checked against their
        recorded SHA-256 and cached; a width whose hash is not recorded yet
        refuses it and names the file to download by hand), or the
        path to a weights file: a Keras `.weights.h5`, or a PyTorch checkpoint
        (`.pt`, `.pth`, `.bin`, `.safetensors`) with ml-cvnets, timm or
        Hugging Face tensor names, detected automatically.
    input_tensor: Optional Keras tensor to use as the image input.
    input_shape: Optional shape tuple `(height, width, channels)`; height and
        width may be None. Defaults to `(None, None, 3)`.
    pooling: With `include_top=False`: `None` (4-D feature map output),
        `"avg"` or `"max"` (global pooling, 2-D output).
    classes: Number of classes when `include_top=True` and no pretrained
        weights are loaded.
    classifier_activation: Activation of the top layer, a string or callable;
        `None` returns logits. Only `None` or `"softmax"` with pretrained
        weights.
    include_preprocessing: Whether the model rescales [0, 255] inputs itself.
    name: The model name; defaults to `"{default_name}"`.
    output_stride: 32 (the classifier), 16 or 8: the last one or two stages
        keep stride 1 and dilate their convolutions instead (ml-cvnets'
        dense-prediction backbone; segmentation uses 16). The weights are
        the same for every output stride.

Returns:
    A Keras `Model` instance.
"""


def _make_variant(suffix, width):
    def variant(
        include_top=True,
        weights="imagenet",
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=1000,
        classifier_activation="softmax",
        include_preprocessing=True,
        name=f"mobilevitv2_{suffix}",
        output_stride=32,
    ):
        return MobileViTv2(
            width_multiplier=width,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            include_preprocessing=include_preprocessing,
            name=name,
            output_stride=output_stride,
        )

    variant.__name__ = f"MobileViTv2_{suffix}"
    variant.__qualname__ = variant.__name__
    variant.__doc__ = BASE_DOCSTRING.format(name=variant.__name__, default_name=f"mobilevitv2_{suffix}")
    return variant


MobileViTv2_050 = _make_variant("050", 0.5)
MobileViTv2_075 = _make_variant("075", 0.75)
MobileViTv2_100 = _make_variant("100", 1.0)
MobileViTv2_125 = _make_variant("125", 1.25)
MobileViTv2_150 = _make_variant("150", 1.5)
MobileViTv2_175 = _make_variant("175", 1.75)
MobileViTv2_200 = _make_variant("200", 2.0)

MobileViTv2.__doc__ = BASE_DOCSTRING.format(name="MobileViTv2", default_name="mobilevitv2_XXX").replace(
    "Args:\n",
    "Args:\n    width_multiplier: Channel width alpha; 0.5 ... 2.0 have pretrained weights.\n",
    1,
) + (
    "\n    `dropout`, `attn_dropout`, `ffn_dropout` (keyword-only here) set the\n"
    "    transformer dropout rates; all are 0 in the released models.\n"
    "    `attention_norm`: `'layer_norm_2d'` (GroupNorm(1), the reference and\n"
    "    the published weights) or `'batch_norm_2d'` in the attention and FFN\n"
    "    norms (ml-cvnets' option: it folds into the 1x1 convolutions at\n"
    "    inference - the Edge TPU / microcontroller friendly choice).\n"
)
