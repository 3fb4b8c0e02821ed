"""Norms of the attention blocks: GroupNorm(1) in plain ops, or BatchNorm."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class LayerNorm2D(keras.layers.Layer):
    """Normalizes each sample over all of its non-batch axes, per-channel affine.

    This is PyTorch's `nn.GroupNorm(num_groups=1, num_channels=C)`, which
    ml-cvnets calls `layer_norm_2d` and uses in every MobileViTv2 attention
    unit. Mean and variance are taken jointly over every axis but the batch
    axis; `gamma` and `beta` have one value per channel (last axis).

    Written from mean / subtract / multiply / rsqrt rather than with
    `keras.layers.GroupNormalization`: the latter lowers to 5-D tensors and
    leaves float NEG/SQUARE ops inside an otherwise int8 TFLite model, while
    this form converts to MEAN, SUB, MUL, ADD and RSQRT, all int8 and rank 4.

    Under a mixed-precision policy the statistics are computed in float32.

    Args:
        epsilon: Added to the variance, 1e-5 as in PyTorch.
        **kwargs: Standard layer arguments (`name`, `dtype`, ...).

    Example:
    >>> x = keras.random.normal((2, 16, 4, 8))
    >>> keras_mobilevitv2.layers.LayerNorm2D()(x).shape
    (2, 16, 4, 8)
    """

    def __init__(self, epsilon=1e-5, **kwargs):
        # Inputs keep their dtype so the float32 statistics below are not
        # computed from a float16 copy that already lost precision.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                "LayerNorm2D needs inputs of rank >= 2 with a known channel "
                f"(last) dimension. Received: input_shape={input_shape}"
            )
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")
        self.reduction_axes = tuple(range(1, len(input_shape)))

    def _normalize_float32(self, inputs):
        x = ops.cast(inputs, "float32")
        mean = ops.mean(x, axis=self.reduction_axes, keepdims=True)
        centered = x - mean
        variance = ops.mean(centered * centered, axis=self.reduction_axes, keepdims=True)
        return centered * ops.rsqrt(variance + self.epsilon)

    def normalize(self, inputs):
        """The normalization without the affine: `(x - mean) / std`.

        For callers that fold `gamma` and `beta` into the next linear layer
        (`keras_mobilevitv2.layers.folding.norm_then_pointwise`).
        """
        return ops.cast(self._normalize_float32(inputs), self.compute_dtype)

    def call(self, inputs):
        normalized = self._normalize_float32(inputs)
        outputs = normalized * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


# ml-cvnets' names for `--model.classification.mitv2.attn-norm-layer`.
ATTENTION_NORMS = ("layer_norm_2d", "batch_norm_2d")


def validate_attention_norm(attention_norm):
    if attention_norm not in ATTENTION_NORMS:
        raise ValueError(
            f"`attention_norm` must be one of {ATTENTION_NORMS}. Received: attention_norm={attention_norm!r}"
        )
    return attention_norm


def attention_norm_layer(attention_norm, epsilon=1e-5, name=None, dtype=None):
    """The norm of a MobileViTv2 attention block.

    `"layer_norm_2d"` is the reference (GroupNorm(1), `LayerNorm2D`);
    `"batch_norm_2d"` is ml-cvnets' alternative. BatchNorm has no
    per-sample statistics: at inference it is a per-channel affine that folds
    into the 1x1 convolution after it, so the int8 model has no
    MEAN/SUB/MUL/RSQRT chain there (cheaper on every target).
    """
    validate_attention_norm(attention_norm)
    if attention_norm == "batch_norm_2d":
        # PyTorch momentum 0.1 == Keras momentum 0.9.
        return keras.layers.BatchNormalization(epsilon=epsilon, momentum=0.9, name=name, dtype=dtype)
    return LayerNorm2D(epsilon, name=name, dtype=dtype)
