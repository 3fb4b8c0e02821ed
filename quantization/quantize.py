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
from keras_mobilevitv2.layers.nesting import nested_layers
from quantization.fake_quant import ActivationQuantizer
from quantization.layers import GRAPHS
from quantization.layers import QuantizedConv
from quantization.layers import QuantizedDense
from quantization.layers import QuantizedGlobalPool
from quantization.layers import QuantizedInvertedResidual
from quantization.layers import QuantizedMobileViTv2Block
from quantization.layers import QuantizedSoftmax

SUPPORTED = (
    "InputLayer, Rescaling (first layer), ZeroPadding2D, Conv2D and "
    "DepthwiseConv2D (each optionally followed by BatchNormalization and a "
    "relu/silu/linear activation), InvertedResidual, MobileViTv2Block, "
    "GlobalAveragePooling2D, GlobalMaxPooling2D, Dense (linear), "
    "Activation('softmax' or 'linear')"
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


def _copy_inverted_residual(source, target):
    if source.expand_conv is not None:
        _set(target.expand_conv, *_fold_conv_bn(source.expand_conv, source.expand_bn))
    _set(target.depthwise_conv, *_fold_conv_bn(source.depthwise_conv, source.depthwise_bn, depthwise=True))
    _set(target.project_conv, *_fold_conv_bn(source.project_conv, source.project_bn))


def _copy_mobilevit_block(source, target):
    _set(target.local_depthwise_conv, *_fold_conv_bn(source.local_depthwise_conv, source.local_bn, depthwise=True))
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
        _set(quant_block.qkv_proj, *qkv)
        _set(quant_block.out_proj, np.asarray(attention.out_proj.kernel), np.asarray(attention.out_proj.bias))
        _set(quant_block.ffn_expand, *expand)
        _set(
            quant_block.ffn_project,
            np.asarray(float_block.ffn_project.kernel),
            np.asarray(float_block.ffn_project.bias),
        )
    kernel, bias = _fold_norm_affine(source.final_norm, np.asarray(source.project_conv.kernel), 0.0)
    scale, shift = _bn_scale_shift(source.project_bn)
    _set(target.project_conv, kernel * scale, bias * scale + shift)


def _quantize_conv(layers, index, x, copies, input_scale):
    """Conv2D/DepthwiseConv2D [+ BatchNormalization] [+ activation] -> one QuantizedConv."""
    conv = layers[index]
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    strides, dilation = conv.strides, conv.dilation_rate
    if (
        strides[0] != strides[1]
        or dilation[0] != dilation[1]
        or conv.kernel_size[0] != conv.kernel_size[1]
        or (depthwise and conv.depth_multiplier != 1)
        or getattr(conv, "groups", 1) != 1
    ):
        raise _unsupported(conv)
    consumed = 1
    bn = None
    if index + 1 < len(layers) and isinstance(layers[index + 1], keras.layers.BatchNormalization):
        bn = layers[index + 1]
        consumed += 1
    activation = getattr(conv.activation, "__name__", "linear")
    if activation not in _CONV_ACTIVATIONS:
        raise _unsupported(conv)
    activation = _CONV_ACTIVATIONS[activation]
    following = layers[index + consumed] if index + consumed < len(layers) else None
    if activation is None and following is not None and _activation_name(following):
        activation = _CONV_ACTIVATIONS[_activation_name(following)]
        consumed += 1
    if bn is not None and getattr(conv.activation, "__name__", "linear") != "linear":
        raise _unsupported(bn)  # BN after a fused activation cannot fold into the conv
    quantized = QuantizedConv(
        conv.kernel.shape[2] if depthwise else conv.filters,
        conv.kernel_size[0],
        strides=strides[0],
        padding=conv.padding,
        depthwise=depthwise,
        activation=activation,
        dilation=dilation[0],
        name=conv.name,
    )
    x = quantized(x)
    copies.append(lambda: _set(quantized, *_fold_conv_bn(conv, bn, depthwise=depthwise, input_scale=input_scale)))
    return x, consumed


def _check_chain(model, layers):
    """The walk below reads the layers in order, each from the one before:
    a graph that branches or merges would be rebuilt wrong, so it is refused."""
    previous = None
    for layer in layers:
        try:
            source = layer.input
        except (AttributeError, ValueError):  # an input layer, or a layer called twice
            source = None
        if previous is None and isinstance(layer, keras.layers.InputLayer):
            previous = layer
            continue
        if previous is None or source is not previous.output:
            raise ValueError(
                f"quantize_model takes a chain of layers (a MobileViTv2 classifier or backbone); "
                f"{model.name!r} branches or merges at layer {layer.name!r} ({type(layer).__name__}). "
                "Quantization-aware training of such graphs (e.g. the DeepLabV3 segmenter) is not "
                "supported yet: export the float model with post-training quantization "
                "(quantization.export --mode ptq_int8, or the Android target)."
            )
        previous = layer


def quantize_model(model, graph="reference"):
    """Returns the quantization-aware (QAT) version of a keras_mobilevitv2 model.

    `graph="edgetpu"` writes the MobileViTv2 blocks in ops the Edge TPU maps
    (same function and same int8 values; see `quantization.layers.GRAPHS`).
    A trained QAT model can be switched later with `rewrite_graph`.

    Weights: per-channel symmetric int8 (per-tensor for the classifier);
    activations: per-tensor asymmetric int8 with moving-average ranges. The
    ranges start unset: call `calibrate(qat_model, images)` before training
    or exporting.

    Raises:
        ValueError: for a layer the QAT path does not know (named in the
            message), or a model whose graph is not a MobileViTv2 chain.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}; got {graph!r}.")
    layers = list(model.layers)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("quantize_model expects a single-input, single-output MobileViTv2 model.")
    _check_chain(model, layers)
    input_shape = tuple(model.inputs[0].shape[1:])
    if None in input_shape[:2]:
        raise ValueError(
            f"quantize_model needs a static input size (int8 TFLite models have one); "
            f"the model's input shape is {input_shape}. Build it with input_shape=(H, W, 3)."
        )
    inputs = keras.Input(input_shape, name="image")
    input_scale = 1.0
    fixed_input_range = None
    x = inputs
    copies = []
    index = 0
    if isinstance(layers[index], keras.layers.InputLayer):
        index += 1
    if isinstance(layers[index], keras.layers.Rescaling):
        rescaling = layers[index]
        if np.any(np.asarray(rescaling.offset) != 0):
            raise _unsupported(rescaling)
        input_scale = float(rescaling.scale)
        fixed_input_range = (0.0, 255.0) if abs(input_scale - 1 / 255) < 1e-9 else None
        index += 1
    x = ActivationQuantizer(fixed_input_range, name="input_quantizer")(x)

    while index < len(layers):
        layer = layers[index]
        if isinstance(layer, keras.layers.ZeroPadding2D):
            x = keras.layers.ZeroPadding2D(layer.padding, name=layer.name)(x)
            index += 1
            continue
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            x, consumed = _quantize_conv(layers, index, x, copies, input_scale)
            input_scale = 1.0  # folded into the first convolution only
            index += consumed
            continue
        if input_scale != 1.0:
            raise ValueError(
                f"The Rescaling of {model.name!r} must be followed by a convolution to be "
                f"folded; found {layer.name!r} ({type(layer).__name__})."
            )
        if isinstance(layer, InvertedResidual):
            quantized = QuantizedInvertedResidual(
                layer.filters,
                layer.hidden_channels,
                layer.strides,
                layer.expand_conv is not None,
                layer.use_residual,
                dilation=layer.dilation_rate,
                name=layer.name,
            )
            x = quantized(x)
            copies.append(lambda s=layer, t=quantized: _copy_inverted_residual(s, t))
        elif isinstance(layer, MobileViTv2Block):
            quantized = QuantizedMobileViTv2Block(
                layer.project_conv.filters,
                layer.attn_dim,
                layer.transformer_blocks[0].ffn_dim,
                layer.num_blocks,
                layer.patch_size,
                layer.dilation,
                attention_norm=layer.attention_norm,
                graph=graph,
                name=layer.name,
            )
            x = quantized(x)
            copies.append(lambda s=layer, t=quantized: _copy_mobilevit_block(s, t))
        elif isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)):
            mode = "avg" if isinstance(layer, keras.layers.GlobalAveragePooling2D) else "max"
            x = QuantizedGlobalPool(mode, name=layer.name)(x)
        elif isinstance(layer, keras.layers.Dense):
            if layer.activation not in (keras.activations.linear, None):
                raise _unsupported(layer)
            quantized = QuantizedDense(layer.units, name=layer.name)
            x = quantized(x)
            copies.append(lambda s=layer, t=quantized: _set(t, np.asarray(s.kernel), np.asarray(s.bias)))
        elif isinstance(layer, keras.layers.Activation):
            if layer.activation is keras.activations.softmax:
                x = QuantizedSoftmax(name=layer.name)(x)
            elif layer.activation is not keras.activations.linear:
                raise _unsupported(layer)
        else:
            raise _unsupported(layer)
        index += 1

    qat_model = keras.Model(inputs, x, name=f"{model.name}_qat")
    for copy in copies:
        copy()
    return qat_model


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
