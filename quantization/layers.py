"""Quantization-aware counterparts of the MobileViTv2 layers.

Each layer computes what the int8 TFLite model computes: BatchNorm is folded
into the preceding convolution (as the converter folds it), the affine part of
every GroupNorm(1) is folded into the 1x1 convolution that follows it, and an
`ActivationQuantizer` sits on every tensor that is int8 in the converted
graph - including the internals of the norm (mean, centred values, squares,
variance, rsqrt) and of the attention (scores, products, sums). Reshape,
transpose, pad and slice keep their input's quantization, so they need none.
"""

import keras
import tensorflow as tf

from keras_mobilevitv2.layers import fold_patches
from keras_mobilevitv2.layers import resize_bilinear_align_corners
from keras_mobilevitv2.layers import unfold_patches
from keras_mobilevitv2.layers.folding import folding_norm_affines
from quantization.fake_quant import UNIT_INTERVAL_RANGE
from quantization.fake_quant import ActivationQuantizer
from quantization.fake_quant import quantize_weights_per_channel
from quantization.fake_quant import quantize_weights_per_tensor

PACKAGE = "keras_mobilevitv2_quantization"

# "reference": the ops of the float model (unfold/fold by reshape+transpose,
# one softmax over the patch axis). "edgetpu": the same function in ops the
# Edge TPU maps (see `quantization/edgetpu.py`): SPACE_TO_DEPTH unfold, one
# 1-D softmax per pixel position, fold by slices + concatenation. Both give
# the same int8 values.
GRAPHS = ("reference", "edgetpu")


def check_batch_statistics_steps(steps):
    """`steps` if it is None or an integer >= 0; ValueError otherwise."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise ValueError(f"batch_statistics_steps must be None or an integer >= 0; got {steps!r}.")
    return steps


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")
    return value


def unfold_space_to_depth(x, patch_size):
    """`unfold_patches` through SPACE_TO_DEPTH: [B, H, W, C] -> [B, N, P, C].

    space_to_depth puts pixel (i, j) of each patch at channels
    (i * p + j) * C ... + C, which is exactly P-major order; the reshape then
    only splits channels, so no TRANSPOSE is needed.
    """
    p = patch_size
    _, height, width, channels = x.shape
    x = tf.nn.space_to_depth(x, p)  # [B, H/p, W/p, P*C]
    return tf.reshape(x, (-1, (height // p) * (width // p), p * p, channels))


def fold_by_concatenation(patches, height, width, patch_size):
    """`fold_patches` in RESHAPE, STRIDED_SLICE and CONCATENATION only:
    [B, N, P, C] -> [B, H, W, C], with no TRANSPOSE and no DEPTH_TO_SPACE.

    Row i of every patch is a channel block [B, h, w, p*C] ordered (j, c);
    reshaping it to [B, h, w*p, C] already interleaves the columns. The p
    rows, concatenated along the width and reshaped, interleave the rows.
    Values are only moved, so int8 values are unchanged.
    """
    p = patch_size
    channels = patches.shape[-1]
    h, w = height // p, width // p
    x = tf.reshape(patches, (-1, h, w, p * p * channels))  # [B, h, w, P*C], P = (i, j)
    rows = [
        tf.reshape(x[..., i * p * channels : (i + 1) * p * channels], (-1, h, width, channels))  # [B, h, W, C]
        for i in range(p)
    ]
    return tf.reshape(tf.concat(rows, axis=2), (-1, height, width, channels))  # [B, h, p*W, C] -> [B, H, W, C]


def _build_by_calling(layer, input_shape):
    """Creates every sublayer's variables by running the layer once on zeros.

    The composite QAT layers have many internal shapes; tracing them once is
    simpler than spelling each out, and `.keras` loading needs them built.
    """
    if isinstance(input_shape, list) and input_shape and isinstance(input_shape[0], (list, tuple)):
        dummy = [tf.zeros([1 if d is None else d for d in shape]) for shape in input_shape]
    else:
        dummy = tf.zeros([1 if d is None else d for d in input_shape])
    layer.call(dummy, training=False)


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedConv(keras.layers.Layer):
    """Conv2D or DepthwiseConv2D with bias (BN folded), fake-quantized.

    `batch_statistics_steps=N` keeps the BatchNorm after the convolution as
    its own variables (tfmot's and Krishnamoorthi's folding scheme): the
    kernel is folded with the moving statistics and quantized, and for the
    first N training steps the output is corrected to the batch statistics,
    which also update the moving ones; after N steps the statistics are
    frozen. Inference and export always fold the moving statistics, so the
    int8 model is the same graph as with `None` (BN folded once, frozen from
    the first step).

    SiLU is x * sigmoid(x), as TFLite runs it: LOGISTIC (fixed output range)
    then MUL, each output quantized. ReLU is fused into the convolution (one
    quantized output), as the converter fuses it.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        depthwise=False,
        activation=None,
        dilation=1,
        batch_statistics_steps=None,
        bn_momentum=0.99,
        bn_epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if activation not in (None, "silu", "relu"):
            raise ValueError(f"activation must be None, 'relu' or 'silu'; got {activation!r}")
        self.batch_statistics_steps = check_batch_statistics_steps(batch_statistics_steps)
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.depthwise = depthwise
        self.activation = activation
        self.dilation = dilation
        self.output_quantizer = ActivationQuantizer(name="output_quantizer")
        if activation == "silu":
            self.sigmoid_quantizer = ActivationQuantizer(UNIT_INTERVAL_RANGE, name="sigmoid_quantizer")
            self.activation_quantizer = ActivationQuantizer(name="activation_quantizer")

    def build(self, input_shape):
        channels = input_shape[-1]
        k = self.kernel_size
        shape = (k, k, channels, 1) if self.depthwise else (k, k, channels, self.filters)
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        if self.batch_statistics_steps is not None:
            self._build_batch_norm()
        out_shape = tuple(input_shape[:-1]) + (self.filters,)
        self.output_quantizer.build(out_shape)
        if self.activation == "silu":
            self.sigmoid_quantizer.build(out_shape)
            self.activation_quantizer.build(out_shape)

    def _build_batch_norm(self):
        channels = (self.filters,)
        for name, initializer, trainable in (
            ("gamma", "ones", True),
            ("beta", "zeros", True),
            ("moving_mean", "zeros", False),
            ("moving_variance", "ones", False),
        ):
            variable = self.add_weight(
                name=name, shape=channels, initializer=initializer, trainable=trainable, aggregation="mean"
            )
            setattr(self, name, variable)
        # Training steps taken with batch statistics (MEAN of +1 per replica is +1).
        self.bn_steps = self.add_weight(
            name="bn_steps", shape=(), initializer="zeros", trainable=False, aggregation="mean"
        )

    def _convolve(self, inputs, kernel, quantized):
        strides = (1, self.strides, self.strides, 1)
        dilations = (self.dilation, self.dilation)
        padding = self.padding.upper()
        if self.depthwise:
            kernel = quantize_weights_per_channel(kernel, axis=2) if quantized else kernel
            return tf.nn.depthwise_conv2d(inputs, kernel, strides, padding, dilations=dilations)
        kernel = quantize_weights_per_channel(kernel, axis=-1) if quantized else kernel
        return tf.nn.conv2d(inputs, kernel, strides, padding, dilations=dilations)

    def _per_channel_kernel_scale(self, scale):
        # [kh, kw, C, 1] depthwise kernels scale along axis 2, others along the last axis.
        return scale[:, None] if self.depthwise else scale

    def _batch_norm_conv(self, inputs, training, float_mode):
        """conv -> BatchNorm with the BN folded into the quantized kernel."""
        moving_std = tf.sqrt(self.moving_variance + self.bn_epsilon)
        scale = self.gamma / moving_std
        kernel = self.kernel * self._per_channel_kernel_scale(scale)
        y = self._convolve(inputs, kernel, quantized=not float_mode)
        frozen_bias = self.beta + (self.bias - self.moving_mean) * scale
        if not training or float_mode:
            return y + frozen_bias
        use_batch = self.bn_steps < self.batch_statistics_steps
        # Batch statistics of the float convolution, as BatchNorm sees them;
        # once frozen, the moving ones, and the float convolution is skipped.
        mean, variance = tf.cond(
            use_batch,
            lambda: tf.nn.moments(self._convolve(inputs, self.kernel, quantized=False) + self.bias, axes=[0, 1, 2]),
            lambda: (tf.convert_to_tensor(self.moving_mean), tf.convert_to_tensor(self.moving_variance)),
        )
        batch_std = tf.sqrt(variance + self.bn_epsilon)
        corrected = y * (moving_std / batch_std) + self.beta + (self.bias - mean) * (self.gamma / batch_std)
        momentum = tf.where(use_batch, self.bn_momentum, 1.0)
        self.moving_mean.assign(momentum * self.moving_mean + (1 - momentum) * tf.stop_gradient(mean))
        self.moving_variance.assign(momentum * self.moving_variance + (1 - momentum) * tf.stop_gradient(variance))
        self.bn_steps.assign_add(tf.cast(use_batch, self.bn_steps.dtype))
        return tf.where(use_batch, corrected, y + frozen_bias)

    def call(self, inputs, training=None):
        # While calibrating, the layer computes the float function exactly.
        float_mode = self.output_quantizer.calibrating
        if self.batch_statistics_steps is not None:
            y = self._batch_norm_conv(inputs, training, float_mode)
        else:
            y = self._convolve(inputs, self.kernel, quantized=not float_mode) + self.bias
        if self.activation == "relu":
            y = tf.nn.relu(y)
        y = self.output_quantizer(y, training=training)
        if self.activation == "silu":
            gate = self.sigmoid_quantizer(tf.sigmoid(y), training=training)
            y = self.activation_quantizer(y * gate, training=training)
        return y

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "depthwise": self.depthwise,
                "activation": self.activation,
                "dilation": self.dilation,
                "batch_statistics_steps": self.batch_statistics_steps,
                "bn_momentum": self.bn_momentum,
                "bn_epsilon": self.bn_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedDense(keras.layers.Layer):
    """Dense with per-tensor symmetric weights (tfmot's default for Dense)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.output_quantizer = ActivationQuantizer(name="output_quantizer")

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units), initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self.output_quantizer.build((input_shape[0], self.units))

    def call(self, inputs, training=None):
        float_mode = self.output_quantizer.calibrating
        kernel = self.kernel if float_mode else quantize_weights_per_tensor(self.kernel)
        y = tf.matmul(inputs, kernel) + self.bias
        return self.output_quantizer(y, training=training)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units})
        return config


# The mean's int8 range is at least this fraction of the centred output's (XNNPACK's int8 SUB).
MEAN_RANGE_FLOOR = 2.0**-9


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedNormalize(keras.layers.Layer):
    """GroupNorm(1) without its affine part (folded into the next conv):
    (x - mean) * rsqrt(mean((x - mean)^2) + eps), every step quantized."""

    STEPS = ("mean", "centered", "squared", "variance", "variance_eps", "rsqrt", "output")

    def __init__(self, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.quantizers = {step: ActivationQuantizer(name=f"{step}_quantizer") for step in self.STEPS}

    def build(self, input_shape):
        for quantizer in self.quantizers.values():
            quantizer.build(input_shape)

    def call(self, inputs, training=None):
        q = {step: (lambda t, s=step: self.quantizers[s](t, training=training)) for step in self.STEPS}
        axes = [1, 2, 3]
        # XNNPACK runs an int8 SUB only while each input's scale is at least
        # 2^-10 of the output's; a narrower mean range sends the whole SUB to
        # TFLite's reference kernel (1.0 of 9.5 ms at width 1.0, profiled).
        # Its range is widened to 2^-9 of the centred output's: the mean's
        # step stays under a quarter of the output's, so no accuracy is lost.
        centered_range = self.quantizers["centered"]
        floor = (centered_range.range_max - centered_range.range_min) * MEAN_RANGE_FLOOR
        mean = self.quantizers["mean"](tf.reduce_mean(inputs, axis=axes, keepdims=True), training=training,
                                       min_width=floor)  # fmt: skip
        centered = q["centered"](inputs - mean)
        squared = q["squared"](centered * centered)
        variance = q["variance"](tf.reduce_mean(squared, axis=axes, keepdims=True))
        # A variance that rounds to int8 zero makes rsqrt infinite: TFLite then
        # saturates at the top of the rsqrt range, which the clamp below
        # reproduces without an infinite (NaN) gradient.
        variance_eps = q["variance_eps"](variance + self.epsilon)
        if not folding_norm_affines(training):
            # While training, the clamp keeps the rsqrt range finite and the
            # gradient defined. The exported graph (traced inside
            # fold_norm_affines) leaves it out: a MAXIMUM op on every norm.
            variance_eps = tf.maximum(variance_eps, self.epsilon)
        scale = q["rsqrt"](tf.math.rsqrt(variance_eps))
        return q["output"](centered * scale)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedAdd(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.output_quantizer = ActivationQuantizer(name="output_quantizer")

    def build(self, input_shape):
        self.output_quantizer.build(input_shape[0])

    def call(self, inputs, training=None):
        return self.output_quantizer(inputs[0] + inputs[1], training=training)


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedInvertedResidual(keras.layers.Layer):
    """`project=False` leaves out the linear 1x1 projection: the layer then
    outputs its depthwise result, and the projection is merged into the
    next layer's expansion (see `quantize_model`)."""

    def __init__(
        self,
        filters,
        hidden_channels,
        strides,
        expand,
        use_residual,
        dilation=1,
        project=True,
        batch_statistics_steps=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.batch_statistics_steps = batch_statistics_steps
        bn = {"batch_statistics_steps": batch_statistics_steps}
        if use_residual and not project:
            raise ValueError("A residual block needs its projection: project=False takes use_residual=False.")
        self.filters = filters
        self.hidden_channels = hidden_channels
        self.strides = strides
        self.expand = expand
        self.use_residual = use_residual
        self.dilation = dilation
        self.project = project
        self.expand_conv = (
            QuantizedConv(hidden_channels, 1, activation="silu", name="expand_conv", **bn) if expand else None
        )
        self.depthwise_conv = QuantizedConv(
            hidden_channels,
            3,
            strides=strides,
            padding="valid" if strides == 2 else "same",
            depthwise=True,
            activation="silu",
            dilation=dilation,
            name="depthwise_conv",
            **bn,
        )
        self.project_conv = QuantizedConv(filters, 1, name="project_conv", **bn) if project else None
        self.residual_add = QuantizedAdd(name="residual_add") if use_residual else None

    def build(self, input_shape):
        _build_by_calling(self, input_shape)

    def call(self, inputs, training=None):
        x = inputs
        if self.expand_conv is not None:
            x = self.expand_conv(x, training=training)
        if self.strides == 2:
            x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        x = self.depthwise_conv(x, training=training)
        if self.project_conv is not None:
            x = self.project_conv(x, training=training)
        if self.residual_add is not None:
            x = self.residual_add([inputs, x], training=training)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "hidden_channels": self.hidden_channels,
                "strides": self.strides,
                "expand": self.expand,
                "use_residual": self.use_residual,
                "dilation": self.dilation,
                "project": self.project,
                "batch_statistics_steps": self.batch_statistics_steps,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedTransformerBlock(keras.layers.Layer):
    """LinearAttentionFFN with the separable attention written out.

    With `attention_norm="batch_norm_2d"` each norm is one per-channel affine
    (a 1x1 depthwise convolution) instead of the GroupNorm(1) op chain.
    """

    def __init__(self, embed_dim, ffn_dim, attention_norm="layer_norm_2d", graph="reference", **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.ffn_dim = ffn_dim
        self.attention_norm = _check_choice("attention_norm", attention_norm, ("layer_norm_2d", "batch_norm_2d"))
        self.graph = _check_choice("graph", graph, GRAPHS)
        d = embed_dim
        self.attn_norm = self._norm("attn_norm")
        # The fused query | key | value projection runs as three convolutions,
        # as the float export runs it (layers.folding): slicing one output
        # would copy every part out with STRIDED_SLICE, give the three one
        # shared range, and keep the ReLU on the values a separate op.
        self.query_proj = QuantizedConv(1, 1, name="query_proj")
        self.key_proj = QuantizedConv(d, 1, name="key_proj")
        self.value_proj = QuantizedConv(d, 1, activation="relu", name="value_proj")
        self.scores_quantizer = ActivationQuantizer(UNIT_INTERVAL_RANGE, name="scores_quantizer")
        self.weighted_keys_quantizer = ActivationQuantizer(name="weighted_keys_quantizer")
        self.context_quantizer = ActivationQuantizer(name="context_quantizer")
        self.attended_quantizer = ActivationQuantizer(name="attended_quantizer")
        self.out_proj = QuantizedConv(d, 1, name="out_proj")
        self.attn_add = QuantizedAdd(name="attn_add")
        self.ffn_norm = self._norm("ffn_norm")
        self.ffn_expand = QuantizedConv(ffn_dim, 1, activation="silu", name="ffn_expand")
        self.ffn_project = QuantizedConv(d, 1, name="ffn_project")
        self.ffn_add = QuantizedAdd(name="ffn_add")

    def _norm(self, name):
        if self.attention_norm == "layer_norm_2d":
            return QuantizedNormalize(name=name)
        # BatchNorm is a per-channel affine of its own: a 1x1 depthwise
        # convolution (per-channel int8 weights, quantized output), one op
        # the Edge TPU and TFLite Micro run. Note: it rescales every channel of
        # the per-tensor-quantized residual stream to unit variance, so
        # channels too small for that int8 range come back as noise; on the
        # embedded dataset this option lost 27 points when calibrated (see
        # README), GroupNorm(1) 1 point.
        return QuantizedConv(self.embed_dim, 1, depthwise=True, name=name)

    def build(self, input_shape):
        _build_by_calling(self, input_shape)

    def _softmax_over_patches(self, query):
        """Softmax over the N axis of query [B, N, P, 1]."""
        if self.graph == "reference":
            return tf.nn.softmax(query, axis=1)
        # The Edge TPU maps SOFTMAX only on a 1-D vector (<= 16,000 values):
        # one softmax per pixel position p, over a [B, N] vector each.
        tokens = query.shape[1]
        per_position = [
            tf.reshape(tf.nn.softmax(tf.reshape(query[:, :, p : p + 1, :], (-1, tokens))), (-1, tokens, 1, 1))
            for p in range(query.shape[2])
        ]
        return tf.concat(per_position, axis=2)  # [B, N, P, 1]

    def call(self, inputs, training=None):
        normalized = self.attn_norm(inputs, training=training)
        query = self.query_proj(normalized, training=training)  # [B, N, P, 1]
        key = self.key_proj(normalized, training=training)  # [B, N, P, d]
        gated = self.value_proj(normalized, training=training)  # relu(value) [B, N, P, d]
        scores = self.scores_quantizer(self._softmax_over_patches(query), training=training)
        weighted = self.weighted_keys_quantizer(key * scores, training=training)
        context = self.context_quantizer(tf.reduce_sum(weighted, axis=1, keepdims=True), training=training)
        attended = self.attended_quantizer(gated * context, training=training)
        x = self.attn_add([inputs, self.out_proj(attended, training=training)], training=training)
        normalized = self.ffn_norm(x, training=training)
        hidden = self.ffn_expand(normalized, training=training)
        return self.ffn_add([x, self.ffn_project(hidden, training=training)], training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "ffn_dim": self.ffn_dim,
                "attention_norm": self.attention_norm,
                "graph": self.graph,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedMobileViTv2Block(keras.layers.Layer):
    """`project=False`: the block outputs its folded, normalized patches
    [B, H, W, attn_dim] and its 1x1 projection is merged into the next
    layer's expansion (see `quantize_model`)."""

    def __init__(
        self,
        channels,
        attn_dim,
        ffn_dim,
        num_blocks,
        patch_size=2,
        dilation=1,
        attention_norm="layer_norm_2d",
        graph="reference",
        project=True,
        batch_statistics_steps=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.project = project
        self.batch_statistics_steps = batch_statistics_steps
        self.attention_norm = _check_choice("attention_norm", attention_norm, ("layer_norm_2d", "batch_norm_2d"))
        self.graph = _check_choice("graph", graph, GRAPHS)
        self.channels = channels
        self.attn_dim = attn_dim
        self.ffn_dim = ffn_dim
        self.num_blocks = num_blocks
        self.patch_size = patch_size
        self.dilation = dilation
        self.local_depthwise_conv = QuantizedConv(
            channels,
            3,
            depthwise=True,
            activation="silu",
            dilation=dilation,
            batch_statistics_steps=batch_statistics_steps,
            name="local_depthwise_conv",
        )
        self.local_pointwise_conv = QuantizedConv(attn_dim, 1, name="local_pointwise_conv")
        self.transformer_blocks = [
            QuantizedTransformerBlock(attn_dim, ffn_dim, attention_norm, graph, name=f"transformer_{i}")
            for i in range(num_blocks)
        ]
        self.final_norm = QuantizedNormalize(name="final_norm")  # GroupNorm(1) with either attention_norm
        self.project_conv = QuantizedConv(channels, 1, name="project_conv") if project else None

    def build(self, input_shape):
        _build_by_calling(self, input_shape)

    def call(self, inputs, training=None):
        p = self.patch_size
        x = inputs
        height, width = x.shape[1], x.shape[2]
        if height % p or width % p:
            x = resize_bilinear_align_corners(x, -(-height // p) * p, -(-width // p) * p)
        x = self.local_pointwise_conv(self.local_depthwise_conv(x, training=training), training=training)
        height, width = x.shape[1], x.shape[2]
        patches = unfold_patches(x, p) if self.graph == "reference" else unfold_space_to_depth(x, p)
        for block in self.transformer_blocks:
            patches = block(patches, training=training)
        patches = self.final_norm(patches, training=training)
        fold = fold_patches if self.graph == "reference" else fold_by_concatenation
        x = fold(patches, height, width, p)  # [B, H, W, attn_dim]
        return x if self.project_conv is None else self.project_conv(x, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channels": self.channels,
                "attn_dim": self.attn_dim,
                "ffn_dim": self.ffn_dim,
                "num_blocks": self.num_blocks,
                "patch_size": self.patch_size,
                "dilation": self.dilation,
                "attention_norm": self.attention_norm,
                "graph": self.graph,
                "project": self.project,
                "batch_statistics_steps": self.batch_statistics_steps,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedGlobalPool(keras.layers.Layer):
    def __init__(self, mode="avg", keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.keepdims = bool(keepdims)
        self.output_quantizer = ActivationQuantizer(name="output_quantizer")

    def build(self, input_shape):
        self.output_quantizer.build(input_shape)

    def call(self, inputs, training=None):
        reduce = tf.reduce_mean if self.mode == "avg" else tf.reduce_max
        pooled = reduce(inputs, axis=[1, 2], keepdims=self.keepdims)  # [B, C] or [B, 1, 1, C]
        return self.output_quantizer(pooled, training=training)

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "keepdims": self.keepdims})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedConcatenate(keras.layers.Layer):
    """Concatenation with one output range. Inputs with other ranges are
    requantized (int8 -> int8 QUANTIZE), as TFLite's CONCATENATION requires
    one scale for all its operands."""

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis
        self.output_quantizer = ActivationQuantizer(name="output_quantizer")

    def build(self, input_shape):
        self.output_quantizer.build(input_shape[0])

    def call(self, inputs, training=None):
        return self.output_quantizer(tf.concat(inputs, axis=self.axis), training=training)

    def compute_output_shape(self, input_shape):
        shapes = [list(shape) for shape in input_shape]
        axis = self.axis % len(shapes[0])
        sizes = [shape[axis] for shape in shapes]
        shapes[0][axis] = None if None in sizes else sum(sizes)
        return tuple(shapes[0])

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantizedSoftmax(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.output_quantizer = ActivationQuantizer(UNIT_INTERVAL_RANGE, name="output_quantizer")

    def build(self, input_shape):
        self.output_quantizer.build(input_shape)

    def call(self, inputs, training=None):
        return self.output_quantizer(tf.nn.softmax(inputs, axis=-1), training=training)
