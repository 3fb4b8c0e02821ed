"""MobileNetV2 inverted residual block as used by MobileViTv2."""

import numbers

import keras

from keras_mobilevitv2.layers.folding import conv_batch_norm
from keras_mobilevitv2.layers.folding import fusable_silu


def make_divisible(value, divisor=8, min_value=None):
    """ml-cvnets' channel rounding: nearest multiple of `divisor`, >= 90%."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def batch_norm(name, dtype=None):
    """BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1)."""
    return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class InvertedResidual(keras.layers.Layer):
    """1x1 expand + SiLU -> 3x3 depthwise + SiLU -> 1x1 project (linear).

    Each convolution has no bias and is followed by BatchNorm. The residual
    connection is used when `strides == 1` and the input already has
    `filters` channels. A stride-2 depthwise convolution pads one pixel on
    every side (PyTorch's symmetric padding) rather than Keras' "same",
    which pads only bottom/right on even inputs and would shift the
    features of ported weights.

    Args:
        filters: Output channels.
        strides: 1 or 2.
        expansion: Hidden channels = `make_divisible(round(in * expansion))`.
        dilation_rate: Dilation of the depthwise convolution (stride 1 only):
            the stage of a dilated backbone that replaces its stride 2.
        **kwargs: Standard layer arguments.
    """

    def __init__(self, filters, strides=1, expansion=2.0, dilation_rate=1, **kwargs):
        super().__init__(**kwargs)
        if strides not in (1, 2):
            raise ValueError(f"`strides` must be 1 or 2. Received: strides={strides}")
        if not (
            isinstance(dilation_rate, numbers.Integral) and not isinstance(dilation_rate, bool) and dilation_rate >= 1
        ):
            raise ValueError(f"`dilation_rate` must be a positive integer. Received: dilation_rate={dilation_rate!r}")
        if strides == 2 and dilation_rate != 1:
            raise ValueError(
                "`dilation_rate` > 1 needs `strides=1` (a dilated stage replaces its stride). "
                f"Received: strides={strides}, dilation_rate={dilation_rate}"
            )
        self.filters = filters
        self.strides = strides
        self.expansion = expansion
        self.dilation_rate = int(dilation_rate)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        in_channels = input_shape[-1]
        if len(input_shape) != 4 or in_channels is None:
            raise ValueError(
                f"InvertedResidual expects [B, H, W, C] inputs with known C. Received: input_shape={input_shape}"
            )
        policy = self.dtype_policy
        self.hidden_channels = make_divisible(int(round(in_channels * self.expansion)), 8)
        self.use_residual = self.strides == 1 and in_channels == self.filters

        self.expand_conv = None
        if self.expansion != 1:
            self.expand_conv = keras.layers.Conv2D(
                self.hidden_channels, 1, use_bias=False, name="expand_conv", dtype=policy
            )
            self.expand_bn = batch_norm("expand_bn", policy)
        self.depthwise_pad = (
            keras.layers.ZeroPadding2D(1, name="depthwise_pad", dtype=policy) if self.strides == 2 else None
        )
        self.depthwise_conv = keras.layers.DepthwiseConv2D(
            3,
            strides=self.strides,
            padding="valid" if self.strides == 2 else "same",
            dilation_rate=self.dilation_rate,
            use_bias=False,
            name="depthwise_conv",
            dtype=policy,
        )
        self.depthwise_bn = batch_norm("depthwise_bn", policy)
        self.project_conv = keras.layers.Conv2D(self.filters, 1, use_bias=False, name="project_conv", dtype=policy)
        self.project_bn = batch_norm("project_bn", policy)

        shape = input_shape
        if self.expand_conv is not None:
            self.expand_conv.build(shape)
            shape = self.expand_conv.compute_output_shape(shape)
            self.expand_bn.build(shape)
        if self.depthwise_pad is not None:
            shape = self.depthwise_pad.compute_output_shape(shape)
        self.depthwise_conv.build(shape)
        shape = self.depthwise_conv.compute_output_shape(shape)
        self.depthwise_bn.build(shape)
        self.project_conv.build(shape)
        self.project_bn.build(self.project_conv.compute_output_shape(shape))

    def call(self, inputs, training=None):
        x = inputs
        if self.expand_conv is not None:
            x = fusable_silu(conv_batch_norm(self.expand_conv, self.expand_bn, x, training))
        if self.depthwise_pad is not None:
            x = self.depthwise_pad(x)
        x = fusable_silu(conv_batch_norm(self.depthwise_conv, self.depthwise_bn, x, training))
        x = conv_batch_norm(self.project_conv, self.project_bn, x, training)
        return inputs + x if self.use_residual else x

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = tuple(input_shape)
        if self.strides == 2:
            height = None if height is None else (height + 1) // 2
            width = None if width is None else (width + 1) // 2
        return (batch, height, width, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "strides": self.strides,
                "expansion": self.expansion,
                "dilation_rate": self.dilation_rate,
            }
        )
        return config
