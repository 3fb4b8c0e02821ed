"""Inference-time folding of per-channel affines into convolutions.

At inference a BatchNorm after a convolution, and the per-channel affine of a
norm before a 1x1 convolution, are linear maps that fold into that
convolution's kernel and bias. The folding is computed per call from the
layers' own variables: layers, weights and checkpoints stay exactly as they
are, and training (batch statistics, gradients to gamma and beta) takes the
ordinary path.

* BatchNorm after a convolution folds at every inference call. TensorFlow's
  graph optimizer leaves Keras' BatchNormalization as a separate Mul and
  AddV2 over the activations (7.5 ms of a 37 ms graph-mode call, width 1.0,
  batch 1, profiled); the folded kernel costs a few small ops instead.
* A norm's affine before a 1x1 convolution folds only inside
  `fold_norm_affines()`, which the TFLite exporter enters while it traces the
  model. There the folded kernel becomes a constant and the int8 model loses
  an int8 MUL and ADD on every norm output (the converter does not fold a
  norm's affine into the next convolution itself): 42 elementwise ops on the
  largest token tensors. In graph mode, recomputing the folded kernel per
  call cost about what it saved at batch 1, so serving keeps the affine.
* Inside `fold_norm_affines()` a 1x1 convolution whose output is split by
  channel (the attention's fused query | key | value projection) also
  becomes one convolution per part, with the kernel and bias sliced at
  trace time. TFLite otherwise copies every part out with STRIDED_SLICE
  and cannot fuse the ReLU on the values into their convolution: the split
  made the float TFLite model 4.5% faster (width 1.0, batch 16; 398 against
  417 ms, interleaved). In graph mode it did not help at batch 1.
"""

import contextlib
import contextvars

import keras
from keras import ops

from keras_mobilevitv2.layers.normalization import LayerNorm2D


def _batch_norm_scale_shift(bn):
    """Per-channel (scale, shift) with bn(x) == x * scale + shift at inference.

    Computed in float32 whatever the dtype policy: BatchNorm's own variables
    are float32 and Keras computes BatchNorm in float32 under mixed precision.
    """
    variance = ops.cast(bn.moving_variance, "float32")
    scale = ops.rsqrt(variance + bn.epsilon)
    if bn.gamma is not None:
        scale = scale * ops.cast(bn.gamma, "float32")
    shift = -ops.cast(bn.moving_mean, "float32") * scale
    if bn.beta is not None:
        shift = shift + ops.cast(bn.beta, "float32")
    return scale, shift


def _add_channel_bias(x, bias):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # BiasAdd, not AddV2: TensorFlow's graph optimizer fuses
        # Conv2D/DepthwiseConv2dNative + BiasAdd (+ activation) into one
        # oneDNN kernel, which it does not do for a broadcast AddV2.
        return tf.nn.bias_add(x, bias)
    return x + bias


def _pointwise_with_input_affine(conv, scale, shift):
    """Float32 kernel [1, 1, in, out] and bias [out] of the 1x1 `conv`
    applied to `x * scale + shift`: W' = scale[:, None] W, b' = b + shift W."""
    matrix = ops.cast(conv.kernel, "float32")[0, 0]  # [in, out]
    kernel = ops.expand_dims(ops.expand_dims(matrix * scale[:, None], 0), 0)
    bias = ops.matmul(shift[None, :], matrix)[0]
    if conv.use_bias:
        bias = bias + ops.cast(conv.bias, "float32")
    return kernel, bias


def _convolve_with_bias(conv, inputs, kernel, bias):
    """`conv`'s convolution (its strides, padding, dilation) with another
    float32 kernel and bias, in `conv`'s compute dtype."""
    compute_dtype = conv.compute_dtype
    convolve = ops.depthwise_conv if isinstance(conv, keras.layers.DepthwiseConv2D) else ops.conv
    outputs = convolve(
        ops.cast(inputs, compute_dtype),
        ops.cast(kernel, compute_dtype),
        strides=conv.strides,
        padding=conv.padding,
        data_format="channels_last",
        dilation_rate=conv.dilation_rate,
    )
    return _add_channel_bias(outputs, ops.cast(bias, compute_dtype))


def conv_batch_norm(conv, bn, inputs, training=None, input_affine=None):
    """`bn(conv(inputs), training)`, with BatchNorm folded in at inference.

    `conv` is a built `keras.layers.Conv2D` (groups=1) or `DepthwiseConv2D`,
    `bn` a built `keras.layers.BatchNormalization` over the last axis.

    Why: at inference Keras' BatchNormalization on the TensorFlow backend is
    a Mul and an AddV2 over every activation, and TensorFlow's graph
    optimizer does not fold them into the convolution before it. Profiled
    at width 1.0, batch 1, 256x256, that was 7.5 ms of a 37 ms forward pass.
    Folding computes, per call, kernel * scale and a bias (tensors the size
    of the weights, not of the activations) and runs one convolution with a
    BiasAdd. The layers and their weights stay as they are, so checkpoints,
    weight conversion and quantization see the same model. TFLite and ONNX
    export folds BatchNorm into the convolution either way.

    `input_affine`: optional per-input-channel `(scale, shift)` applied to
    `inputs` first (a norm's gamma and beta); `conv` must then be 1x1, and
    the affine folds into it as in `norm_then_pointwise`.

    Training with batch statistics (`training=True` on a trainable
    BatchNorm) takes the ordinary two-layer path, which also updates the
    moving statistics; so do channels-first convolutions.
    """
    if input_affine is not None and not _is_pointwise(conv):
        raise ValueError(f"`input_affine` folds only into a 1x1 Conv2D; {conv.name!r} is not one.")
    if (training and bn.trainable) or conv.data_format != "channels_last":
        if input_affine is not None:
            inputs = inputs * input_affine[0] + input_affine[1]
        return bn(conv(inputs), training=training)

    if input_affine is not None:
        in_scale, in_shift = (ops.cast(v, "float32") for v in input_affine)
        kernel, bias = _pointwise_with_input_affine(conv, in_scale, in_shift)
    else:
        kernel = ops.cast(conv.kernel, "float32")
        bias = ops.cast(conv.bias, "float32") if conv.use_bias else None
    scale, shift = _batch_norm_scale_shift(bn)
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        # [kh, kw, C, multiplier]: output channel c * multiplier + m.
        channels, multiplier = kernel.shape[2], kernel.shape[3]
        kernel = kernel * ops.reshape(scale, (1, 1, channels, multiplier))
    else:
        if getattr(conv, "groups", 1) != 1:
            raise ValueError(
                "conv_batch_norm supports Conv2D with groups=1 and "
                f"DepthwiseConv2D. Received: {conv.name!r} with groups={conv.groups}"
            )
        kernel = kernel * scale  # [kh, kw, in, out]: scales the out axis.
    bias = shift if bias is None else bias * scale + shift
    outputs = _convolve_with_bias(conv, inputs, kernel, bias)
    # Same output dtype as the BatchNorm path under any dtype policy.
    return ops.cast(outputs, bn.compute_dtype)


def fusable_silu(x):
    """SiLU written out as x * sigmoid(x): the same values as
    `keras.activations.silu`.

    Why: on the TensorFlow backend `silu` is `tf.nn.silu`, whose custom
    gradient adds an IdentityN consumer to its input. That second consumer
    keeps the graph optimizer from fusing Conv2D + BiasAdd + SiLU into one
    oneDNN kernel; written out, the pattern fuses.
    """
    return x * ops.sigmoid(x)


_FOLD_NORM_AFFINES = contextvars.ContextVar("fold_norm_affines", default=False)


@contextlib.contextmanager
def fold_norm_affines():
    """While active, models traced for inference fold each norm's affine
    into the 1x1 convolution after it, and run a split 1x1 convolution as
    one convolution per part (`norm_then_pointwise`). For exporters: enter
    it around the tracing of the function that is converted."""
    token = _FOLD_NORM_AFFINES.set(True)
    try:
        yield
    finally:
        _FOLD_NORM_AFFINES.reset(token)


def folding_norm_affines(training=None):
    """Whether a norm's affine folds in this call (see `fold_norm_affines`)."""
    return not training and _FOLD_NORM_AFFINES.get()


def _is_pointwise(conv):
    return (
        isinstance(conv, keras.layers.Conv2D)
        and tuple(conv.kernel_size) == (1, 1)
        and tuple(conv.strides) == (1, 1)
        and getattr(conv, "groups", 1) == 1
        and conv.data_format == "channels_last"
    )


def _split_channels(x, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [x[..., start : start + size] for start, size in zip(starts, sizes)]


def norm_then_pointwise(norm, conv, inputs, training=None, output_splits=None):
    """`conv(norm(inputs, training))` with the norm's affine folded into `conv`.

    `norm` is a `LayerNorm2D` (its gamma and beta fold; the normalization
    itself stays) or a `keras.layers.BatchNormalization` (at inference all of
    it folds); `conv` is a 1x1 `keras.layers.Conv2D`, applied with its own
    activation. A 1x1 convolution of `n * gamma + beta` is the convolution of
    `n` with kernel `gamma[:, None] * W` and bias `b + beta @ W`.

    `output_splits`: optional channel counts, e.g. `(1, C, C)`; then the
    result is the list of `conv`'s output channels split into those parts
    (the activation applies to each). When folding, each part is its own
    convolution with a slice of the folded kernel and bias.

    Folds only inside `fold_norm_affines()` (export); otherwise, and for
    training or any other layer pair, this is `conv(norm(inputs, training))`.
    QAT's int8 graph folds these affines the same way (`quantize_model`).
    """

    def unfolded():
        outputs = conv(norm(inputs, training=training))
        return outputs if output_splits is None else _split_channels(outputs, output_splits)

    if not folding_norm_affines(training) or not _is_pointwise(conv):
        return unfolded()
    if isinstance(norm, LayerNorm2D):
        normalized = norm.normalize(inputs)
        scale = ops.cast(norm.gamma, "float32")
        shift = ops.cast(norm.beta, "float32")
    elif isinstance(norm, keras.layers.BatchNormalization) and norm.axis in (-1, len(inputs.shape) - 1):
        if training and norm.trainable:
            return unfolded()
        normalized = inputs
        scale, shift = _batch_norm_scale_shift(norm)
    else:
        return unfolded()

    kernel, bias = _pointwise_with_input_affine(conv, scale, shift)
    activation = fusable_silu if conv.activation is keras.activations.silu else conv.activation
    if output_splits is None:
        return activation(_convolve_with_bias(conv, normalized, kernel, bias))
    return [
        activation(_convolve_with_bias(conv, normalized, k, b))
        for k, b in zip(_split_channels(kernel, output_splits), _split_channels(bias, output_splits))
    ]
