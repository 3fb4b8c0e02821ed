"""`quantize_model`: a float MobileViTv2 -> its quantization-aware twin.

The QAT model has the same architecture and computes the same function
before quantization: BatchNorm folded into convolutions, the input rescaling
folded into the stem, GroupNorm affine parameters folded into the following
1x1 convolutions. `calibrate` then sets every activation range from data.
"""

import keras
import numpy as np

from keras_mobilevitv2.layers import InvertedResidual
from keras_mobilevitv2.layers import MobileViTv2Block
from keras_mobilevitv2.layers.channel_slice import ChannelSlice
from keras_mobilevitv2.layers.nesting import nested_layers
from keras_mobilevitv2.layers.resize import ResizeLike
from quantization.fake_quant import ActivationQuantizer
from quantization.layers import GRAPHS
from quantization.layers import QuantizedConcatenate
from quantization.layers import QuantizedConv
from quantization.layers import QuantizedDense
from quantization.layers import QuantizedGlobalPool
from quantization.layers import QuantizedInvertedResidual
from quantization.layers import QuantizedMobileViTv2Block
from quantization.layers import QuantizedSoftmax
from quantization.layers import check_batch_statistics_steps

SUPPORTED = (
    "InputLayer, Rescaling (on the input, read by convolutions only), ZeroPadding2D, Conv2D and "
    "DepthwiseConv2D (each optionally followed by BatchNormalization and a "
    "relu/silu/linear activation), InvertedResidual, MobileViTv2Block, "
    "GlobalAveragePooling2D, GlobalMaxPooling2D, Dense (linear), "
    "Activation('softmax' or 'linear'), Concatenate, Reshape, ChannelSlice, ResizeLike, Dropout, SpatialDropout2D"
)
_CONV_ACTIVATIONS = {"relu": "relu", "silu": "silu", "swish": "silu", "linear": None}


def _activation_name(layer):
    """'relu'/'silu'/'linear' for an activation layer, else None."""
    if isinstance(layer, keras.layers.ReLU):
        plain = layer.max_value is None and not layer.negative_slope and not layer.threshold
        return "relu" if plain else None
    if isinstance(layer, keras.layers.Activation):
        name = getattr(layer.activation, "__name__", "")
        return name if name in _CONV_ACTIVATIONS else None
    return None


def _bn_scale_shift(bn):
    gamma, beta, mean, variance = (np.asarray(w) for w in bn.get_weights())
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return scale, beta - mean * scale


def _fold_conv_bn(conv, bn, depthwise=False, input_scale=1.0):
    """Kernel and bias of conv followed by BN (as TFLite folds them)."""
    kernel = np.asarray(conv.kernel) * input_scale
    bias = np.asarray(conv.bias) if getattr(conv, "bias", None) is not None else 0.0
    if bn is None:
        channels = kernel.shape[2] if depthwise else kernel.shape[3]
        return kernel, np.zeros(channels, np.float32) + bias
    scale, shift = _bn_scale_shift(bn)
    if depthwise:  # [kh, kw, C, 1]
        return kernel * scale[None, None, :, None], bias * scale + shift
    return kernel * scale, bias * scale + shift


def _fold_norm_affine(norm, kernel, bias):
    """1x1 conv W after y = n * gamma + beta: (gamma W) n + (beta W + b).

    The GroupNorm(1) normalization itself stays (QuantizedNormalize); only
    its affine part folds.
    """
    gamma, beta = np.asarray(norm.gamma), np.asarray(norm.beta)
    matrix = kernel[0, 0]
    return (gamma[:, None] * matrix)[None, None], bias + beta @ matrix


def _set_batch_norm_affine(depthwise, bn):
    """Inference BatchNorm as the 1x1 depthwise kernel [1, 1, C, 1] + bias."""
    scale, shift = _bn_scale_shift(bn)
    _set(depthwise, scale[None, None, :, None], shift)


def _set(layer, kernel, bias):
    layer.kernel.assign(np.asarray(kernel, np.float32))
    layer.bias.assign(np.asarray(bias, np.float32))


def _unsupported(layer):
    return ValueError(
        f"quantize_model does not support layer {layer.name!r} of type "
        f"{type(layer).__name__}: its int8 form is unknown, and leaving it in "
        f"float would put a float island in the int8 model. Supported: {SUPPORTED}."
    )


def _chain_pointwise(first, second):
    """Kernel and bias of 1x1 convolution `second` applied to the output of
    linear 1x1 convolution `first` (each a (kernel [1, 1, Cin, Cout], bias)
    pair): x K1 K2 + (b1 K2 + b2), computed in float64."""
    (k1, b1), (k2, b2) = ((np.asarray(k, np.float64)[0, 0], np.asarray(b, np.float64)) for k, b in (first, second))
    return (k1 @ k2)[None, None], b1 @ k2 + b2


def _inverted_residual_projection(source):
    """The folded linear projection ending a float InvertedResidual."""
    return _fold_conv_bn(source.project_conv, source.project_bn)


def _mobilevit_projection(source):
    """The folded projection ending a float MobileViTv2Block: final norm's
    affine, 1x1 convolution, BatchNorm."""
    kernel, bias = _fold_norm_affine(source.final_norm, np.asarray(source.project_conv.kernel), 0.0)
    scale, shift = _bn_scale_shift(source.project_bn)
    return kernel * scale, bias * scale + shift


def _set_conv(target, conv, bn, depthwise=False, input_scale=1.0, input_projection=None):
    """Copies `conv` [+ `bn`] into the QuantizedConv `target`: folded, or as
    the raw kernel and the BatchNorm's variables where `target` keeps its
    BatchNorm (`batch_statistics_steps`). `input_projection`: a linear 1x1
    (kernel, bias) merged in front of the (1x1) convolution."""
    keeps_bn = bn is not None and target.batch_statistics_steps is not None
    kernel_bias = _fold_conv_bn(conv, None if keeps_bn else bn, depthwise=depthwise, input_scale=input_scale)
    if input_projection is not None:
        kernel_bias = _chain_pointwise(input_projection, kernel_bias)
    _set(target, *kernel_bias)
    if keeps_bn:
        if abs(bn.epsilon - target.bn_epsilon) > 1e-12:
            raise ValueError(f"{bn.name!r} has epsilon {bn.epsilon}; the QAT layer was built with {target.bn_epsilon}.")
        channels = target.bias.shape
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            value = getattr(bn, name, None)
            default = 1.0 if name in ("gamma", "moving_variance") else 0.0
            getattr(target, name).assign(np.broadcast_to(default if value is None else np.asarray(value), channels))


def _copy_inverted_residual(source, target, input_projection=None):
    """`input_projection`: the previous layer's projection, merged into this
    layer's expansion (`target` then reads the previous layer's unprojected output)."""
    if source.expand_conv is not None:
        _set_conv(target.expand_conv, source.expand_conv, source.expand_bn, input_projection=input_projection)
    _set_conv(target.depthwise_conv, source.depthwise_conv, source.depthwise_bn, depthwise=True)
    if target.project_conv is not None:
        _set_conv(target.project_conv, source.project_conv, source.project_bn)


def _copy_mobilevit_block(source, target):
    _set_conv(target.local_depthwise_conv, source.local_depthwise_conv, source.local_bn, depthwise=True)
    _set(target.local_pointwise_conv, *_fold_conv_bn(source.local_pointwise_conv, None))
    for float_block, quant_block in zip(source.transformer_blocks, target.transformer_blocks):
        attention = float_block.attention
        qkv = np.asarray(attention.qkv_proj.kernel), np.asarray(attention.qkv_proj.bias)
        expand = np.asarray(float_block.ffn_expand.kernel), np.asarray(float_block.ffn_expand.bias)
        if isinstance(float_block.attn_norm, keras.layers.BatchNormalization):
            _set_batch_norm_affine(quant_block.attn_norm, float_block.attn_norm)
            _set_batch_norm_affine(quant_block.ffn_norm, float_block.ffn_norm)
        else:
            qkv = _fold_norm_affine(float_block.attn_norm, *qkv)
            expand = _fold_norm_affine(float_block.ffn_norm, *expand)
        d = quant_block.embed_dim
        for conv, part in zip(
            (quant_block.query_proj, quant_block.key_proj, quant_block.value_proj),
            (slice(0, 1), slice(1, 1 + d), slice(1 + d, 1 + 2 * d)),
        ):
            _set(conv, qkv[0][..., part], qkv[1][part])
        _set(quant_block.out_proj, np.asarray(attention.out_proj.kernel), np.asarray(attention.out_proj.bias))
        _set(quant_block.ffn_expand, *expand)
        _set(
            quant_block.ffn_project,
            np.asarray(float_block.ffn_project.kernel),
            np.asarray(float_block.ffn_project.bias),
        )
    if target.project_conv is not None:
        _set(target.project_conv, *_mobilevit_projection(source))


def _check_conv(conv):
    strides, dilation = conv.strides, conv.dilation_rate
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    if (
        strides[0] != strides[1]
        or dilation[0] != dilation[1]
        or conv.kernel_size[0] != conv.kernel_size[1]
        or (depthwise and conv.depth_multiplier != 1)
        or getattr(conv, "groups", 1) != 1
        or getattr(conv.activation, "__name__", "linear") not in _CONV_ACTIVATIONS
    ):
        raise _unsupported(conv)
    return depthwise


def _check_input(model):
    if len(model.inputs) != 1:
        raise ValueError("quantize_model expects a single-input MobileViTv2 model.")
    input_shape = tuple(model.inputs[0].shape[1:])
    if None in input_shape[:2]:
        raise ValueError(
            f"quantize_model needs a static input size (int8 TFLite models have one); "
            f"the model's input shape is {input_shape}. Build it with input_shape=(H, W, 3)."
        )
    return input_shape


class _GraphRebuild:
    """Rebuilds a functional model layer by layer, in the order Keras keeps
    (every layer after the layers it reads), mapping each float tensor to its
    QAT tensor. A convolution absorbs the BatchNormalization and activation
    that its output alone flows into, as the TFLite converter fuses them, so
    branches and merges (ASPP, auxiliary heads) rebuild as they are."""

    def __init__(self, model, graph, merge_pointwise=True, batch_statistics_steps=None):
        self.model = model
        self.graph = graph
        self.merge_pointwise = merge_pointwise
        self.batch_statistics_steps = batch_statistics_steps
        self.input_projections = {}  # id(InvertedResidual) -> the projection merged into its expansion
        self.consumers = {}  # id(float tensor) -> the layers reading it
        for layer in model.layers:
            if not isinstance(layer, keras.layers.InputLayer):
                for tensor in keras.tree.flatten(layer.input):
                    self.consumers.setdefault(id(tensor), []).append(layer)
        self.outputs = {id(tensor) for tensor in model.outputs}
        self.tensors = {}  # id(float tensor) -> QAT tensor
        self.input_scales = {}  # id(float tensor) -> a Rescaling's scale, to fold into its convolutions
        self.absorbed = set()  # ids of the layers a convolution absorbed
        self.copies = []  # weight copies, run once the QAT model exists

    def run(self, input_shape):
        image = keras.Input(input_shape, name="image")
        fixed_input_range = None
        for layer in self.consumers.get(id(self.model.inputs[0]), []):
            if isinstance(layer, keras.layers.Rescaling) and abs(float(layer.scale) - 1 / 255) < 1e-9:
                fixed_input_range = (0.0, 255.0)
        quantized_image = ActivationQuantizer(fixed_input_range, name="input_quantizer")(image)
        self.tensors[id(self.model.inputs[0])] = quantized_image
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.InputLayer) or id(layer) in self.absorbed:
                continue
            inputs = [self._qat_tensor(layer, tensor) for tensor in keras.tree.flatten(layer.input)]
            float_output, output = self._rebuild(layer, inputs)
            self.tensors[id(float_output)] = output
        outputs = keras.tree.map_structure(lambda tensor: self._qat_tensor(None, tensor), self.model.output)
        qat_model = keras.Model(image, outputs, name=f"{self.model.name}_qat")
        for copy in self.copies:
            copy()
        return qat_model

    def _qat_tensor(self, layer, tensor):
        if id(tensor) not in self.tensors:
            reader = f"layer {layer.name!r}" if layer is not None else "the model output"
            raise ValueError(
                f"quantize_model cannot rebuild {self.model.name!r}: {reader} reads a tensor that no layer of the "
                "model produces once (a layer called more than once, or a nested model). It takes a functional "
                "model whose layers are each called once."
            )
        return self.tensors[id(tensor)]

    def _sole_consumer(self, layer):
        """The one layer reading `layer`'s output, unless others (or the
        model's outputs) read it too."""
        readers = self.consumers.get(id(layer.output), [])
        return readers[0] if len(readers) == 1 and id(layer.output) not in self.outputs else None

    def _rebuild(self, layer, inputs):
        """(the float tensor the result stands for, the QAT tensor)."""
        if isinstance(layer, keras.layers.Rescaling):
            if layer.input is not self.model.inputs[0] or np.any(np.asarray(layer.offset) != 0):
                raise _unsupported(layer)
            self.input_scales[id(layer.output)] = float(layer.scale)
            return layer.output, inputs[0]
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            return self._conv(layer, inputs[0])
        if id(layer.input) in self.input_scales:
            # The scale folds into the first convolution's kernel; zero padding
            # commutes with it, anything else would see unscaled values.
            if not isinstance(layer, keras.layers.ZeroPadding2D):
                raise ValueError(
                    f"The Rescaling of {self.model.name!r} must be followed by a convolution to be "
                    f"folded; found {layer.name!r} ({type(layer).__name__})."
                )
            self.input_scales[id(layer.output)] = self.input_scales[id(layer.input)]
        if isinstance(layer, (InvertedResidual, MobileViTv2Block)):
            return layer.output, self._rebuild_block(layer, inputs[0])
        return layer.output, _rebuild_layer(layer, inputs, self.copies)

    def _rebuild_block(self, layer, x):
        """An InvertedResidual or MobileViTv2Block; its projection merges into
        the next block's expansion where `_merge_target` allows."""
        merged_into = self._merge_target(layer)
        if merged_into is not None:
            project = _inverted_residual_projection if isinstance(layer, InvertedResidual) else _mobilevit_projection
            self.input_projections[id(merged_into)] = project(layer)
        input_projection = self.input_projections.get(id(layer))
        steps = self.batch_statistics_steps
        if isinstance(layer, InvertedResidual):
            quantized = _quantized_inverted_residual(layer, project=merged_into is None, batch_statistics_steps=steps)
            self.copies.append(lambda: _copy_inverted_residual(layer, quantized, input_projection))
        else:
            quantized = _quantized_mobilevit_block(layer, self.graph, merged_into is None, batch_statistics_steps=steps)
            self.copies.append(lambda: _copy_mobilevit_block(layer, quantized))
        return quantized(x)

    def _merge_target(self, layer):
        """The InvertedResidual whose 1x1 expansion takes `layer`'s linear 1x1
        projection (C0 -> C1) as one convolution, or None.

        As the float export merges such pairs (quantization.merge_pointwise),
        QAT trains the merged convolution, so the int8 model has one
        convolution and one large int8 tensor fewer: the next block must be
        `layer`'s sole reader, expand (C1 -> C2) and add no residual (which
        would read the projected tensor), and the merged C0 -> C2 convolution
        must cost no more MACs than the pair.
        """
        if not self.merge_pointwise:
            return None
        if isinstance(layer, InvertedResidual) and not layer.use_residual:
            unprojected = layer.hidden_channels
        elif isinstance(layer, MobileViTv2Block):
            unprojected = layer.attn_dim
        else:
            return None
        following = self._sole_consumer(layer)
        if not isinstance(following, InvertedResidual) or following.expand_conv is None or following.use_residual:
            return None
        c0, c1, c2 = unprojected, layer.project_conv.filters, following.hidden_channels
        return following if c0 * c2 <= c1 * (c0 + c2) else None

    def _conv(self, conv, x):
        """Conv2D/DepthwiseConv2D [+ BatchNormalization] [+ activation] -> one QuantizedConv."""
        depthwise = _check_conv(conv)
        activation = _CONV_ACTIVATIONS[getattr(conv.activation, "__name__", "linear")]
        tail, bn = conv, None
        following = self._sole_consumer(conv)
        if isinstance(following, keras.layers.BatchNormalization):
            if activation is not None:
                raise _unsupported(following)  # BN after a fused activation cannot fold into the conv
            tail = bn = following
            following = self._sole_consumer(bn)
        if activation is None and following is not None and _activation_name(following):
            activation = _CONV_ACTIVATIONS[_activation_name(following)]
            tail = following
        self.absorbed.update(id(layer) for layer in (bn, tail) if layer is not None and layer is not conv)
        quantized = QuantizedConv(
            conv.kernel.shape[2] if depthwise else conv.filters,
            conv.kernel_size[0],
            strides=conv.strides[0],
            padding=conv.padding,
            depthwise=depthwise,
            activation=activation,
            dilation=conv.dilation_rate[0],
            batch_statistics_steps=None if bn is None else self.batch_statistics_steps,
            bn_epsilon=1e-5 if bn is None else bn.epsilon,
            name=conv.name,
        )
        input_scale = self.input_scales.get(id(conv.input), 1.0)
        self.copies.append(lambda: _set_conv(quantized, conv, bn, depthwise=depthwise, input_scale=input_scale))
        return tail.output, quantized(x)


def _quantized_inverted_residual(layer, project, batch_statistics_steps=None):
    return QuantizedInvertedResidual(
        layer.filters,
        layer.hidden_channels,
        layer.strides,
        layer.expand_conv is not None,
        layer.use_residual,
        dilation=layer.dilation_rate,
        project=project,
        batch_statistics_steps=batch_statistics_steps,
        name=layer.name,
    )


def _quantized_mobilevit_block(layer, graph, project, batch_statistics_steps=None):
    return QuantizedMobileViTv2Block(
        layer.project_conv.filters,
        layer.attn_dim,
        layer.transformer_blocks[0].ffn_dim,
        layer.num_blocks,
        layer.patch_size,
        layer.dilation,
        attention_norm=layer.attention_norm,
        graph=graph,
        project=project,
        batch_statistics_steps=batch_statistics_steps,
        name=layer.name,
    )


def _rebuild_layer(layer, inputs, copies):
    """The QAT form of a layer other than a convolution or a block, called on `inputs`."""
    if isinstance(layer, keras.layers.Dense):
        if layer.activation not in (keras.activations.linear, None):
            raise _unsupported(layer)
        quantized = QuantizedDense(layer.units, name=layer.name)
        copies.append(lambda: _set(quantized, np.asarray(layer.kernel), np.asarray(layer.bias)))
        return quantized(inputs[0])
    return _rebuild_weightless(layer, inputs)


_VALUE_MOVING = (
    keras.layers.ZeroPadding2D,
    keras.layers.Reshape,
    ChannelSlice,
    ResizeLike,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
)


def _rebuild_weightless(layer, inputs):
    if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)):
        mode = "avg" if isinstance(layer, keras.layers.GlobalAveragePooling2D) else "max"
        return QuantizedGlobalPool(mode, keepdims=layer.keepdims, name=layer.name)(inputs[0])
    if isinstance(layer, keras.layers.Activation):
        if layer.activation is keras.activations.softmax:
            return QuantizedSoftmax(name=layer.name)(inputs[0])
        if layer.activation is keras.activations.linear:
            return inputs[0]
        raise _unsupported(layer)
    if isinstance(layer, keras.layers.Concatenate):
        return QuantizedConcatenate(layer.axis, name=layer.name)(inputs)
    # Value-moving layers keep their input's int8 range: padding, reshaping,
    # slicing, bilinear resizing (its outputs lie within its inputs' range)
    # and dropout (the identity at inference) need no quantizer of their own.
    if isinstance(layer, _VALUE_MOVING):
        clone = type(layer).from_config(layer.get_config())
        return clone(inputs if isinstance(layer, ResizeLike) else inputs[0])
    raise _unsupported(layer)


def quantize_model(model, graph="reference", merge_pointwise=True, batch_statistics_steps=None):
    """Returns the quantization-aware (QAT) version of a keras_mobilevitv2 model.

    Takes the classifiers, the backbones (`include_top=False`), the
    DeepLabV3 segmenters (auxiliary head included) and the SSDLite
    detectors - the QAT model has the same outputs - or any functional model
    built from the layers in `SUPPORTED`, each called once.

    `graph="edgetpu"` writes the MobileViTv2 blocks in ops the Edge TPU maps
    (same function and same int8 values; see `quantization.layers.GRAPHS`).
    A trained QAT model can be switched later with `rewrite_graph`.

    `merge_pointwise=True` trains each linear 1x1 projection that feeds only
    the next block's 1x1 expansion as one merged convolution (three per
    classifier; see `_GraphRebuild._merge_target`), as the float export runs
    them: the int8 model is then the fast one. Before QAT the merged model
    computes the same function up to float rounding.

    `batch_statistics_steps`: None folds every BatchNorm into its
    convolution with the float model's statistics, frozen from the first
    step. An integer N keeps each BatchNorm's variables: the first N training
    steps normalize with batch statistics (which update the moving ones),
    then the statistics freeze (`QuantizedConv`). The exported int8 graph is
    the same either way.

    Weights: per-channel symmetric int8 (per-tensor for the classifier);
    activations: per-tensor asymmetric int8 with moving-average ranges. The
    ranges start unset: call `calibrate(qat_model, images)` before training
    or exporting.

    Raises:
        ValueError: for a layer the QAT path does not know (named in the
            message), or a model it cannot rebuild (several inputs, a
            dynamic input size, a layer called twice).
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}; got {graph!r}.")
    check_batch_statistics_steps(batch_statistics_steps)
    return _GraphRebuild(model, graph, merge_pointwise, batch_statistics_steps).run(_check_input(model))


def rewrite_graph(qat_model, graph):
    """The same QAT model (same weights and ranges) with its MobileViTv2 blocks
    written as `graph` ("reference" or "edgetpu"); predictions are unchanged."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}; got {graph!r}.")
    config = qat_model.get_config()
    blocks = 0
    for layer in config["layers"]:
        if layer["class_name"].endswith("QuantizedMobileViTv2Block"):
            layer["config"]["graph"] = graph
            blocks += 1
    if not blocks and not quantizers(qat_model):
        raise ValueError("rewrite_graph takes a QAT model from quantize_model.")
    rewritten = keras.Model.from_config(config)
    source = {variable.path: variable for variable in qat_model.weights}
    targets = {variable.path: variable for variable in rewritten.weights}
    if source.keys() != targets.keys():
        raise ValueError(
            f"rewrite_graph: the {graph} model has different variables: {sorted(source.keys() ^ targets.keys())[:5]}"
        )
    for path, variable in targets.items():
        variable.assign(source[path])
    return rewritten


def quantizers(model):
    return [layer for layer in nested_layers(model) if isinstance(layer, ActivationQuantizer)]


def uncalibrated_quantizers(model):
    return [
        q.path if hasattr(q, "path") else q.name
        for q in quantizers(model)
        if q.fixed_range is None and float(q.initialized.numpy()) < 0.5
    ]


def calibrate(model, images, batch_size=16):
    """Sets every activation range from `images` (float32 [N, H, W, 3], in the
    model's input range), running the model in inference mode with
    quantization off. Returns the model."""
    images = np.asarray(images, np.float32)
    expected = tuple(model.inputs[0].shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"Calibration images must have shape (N, {', '.join(map(str, expected))}); got {images.shape}."
        )
    if len(images) == 0:
        raise ValueError("calibrate needs at least one image.")
    active = quantizers(model)
    for quantizer in active:
        quantizer.calibrating = True
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size], training=False)
    finally:
        for quantizer in active:
            quantizer.calibrating = False
    return model
