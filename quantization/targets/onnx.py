"""ONNX target: float, or QDQ int8 from a QAT model, checked with onnxruntime.

The Keras model is traced as a `tf.function` and converted by tf2onnx. For a
QAT model from `quantize_model`:

* every activation fake-quant (`fake_quant_with_min_max_vars`) becomes a
  QuantizeLinear/DequantizeLinear pair (tf2onnx's own conversion);
* the weight fake-quants (per-channel, narrow range) are constant-folded by
  TensorFlow before tf2onnx sees them, leaving float kernels whose values lie
  on the int8 grid. They are stored back as int8 initializers followed by a
  DequantizeLinear: the QDQ layout onnxruntime's own quantizer writes, with
  weights in a quarter of the space.

The exported file is run with onnxruntime on sample images and compared with
the Keras model; a file that disagrees is not written.

tf2onnx 1.17 needs no numpy-2 patch here: Keras' `patch_tf2onnx` replaces a
constant-folding helper that 1.17 already writes with `np.asarray`, and the
external-tensor path of large models, which this export does not use.
"""

import collections
import os

import numpy as np

from quantization.targets.common import TargetError
from quantization.targets.common import check_io_type
from quantization.targets.common import check_name
from quantization.targets.common import quantized_for
from quantization.targets.common import staged
from quantization.tflite_export import is_qat
from quantization.tflite_export import static_input_shape

TARGET = "onnx"

DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "output"
BATCH_DIM_NAME = "batch"

# The float export must reproduce Keras up to float round-off: this fraction
# of the largest output magnitude (measured on MobileViTv2-0.5: ~2e-6).
FLOAT_RELATIVE_TOLERANCE = 1e-4
# A fake-quantized network is a discontinuous function: a last-bit difference
# in any float sum moves an activation across a rounding threshold, and the
# one-step change spreads. onnxruntime's default optimizations run the QDQ
# graph as integer kernels (QLinearConv, QLinearMul, table-driven
# QLinearSigmoid) where TensorFlow runs float ops between fake-quants; the
# GroupNorm statistics (one quantized mean and variance per image) carry each
# flip to a whole tensor. Per quantizer, on MobileViTv2-0.5 at 64x64: the input
# quantizer differs on 1e-5 of its values, the stem on 2e-4, stage 2 on 2-16%,
# and from stage 3 on 50-90% differ by a few steps. That is the noise floor of
# the runtime, not an export error: onnxruntime against itself (optimizations
# off vs on) differs as much (mean 1.0, max 11 steps on 16 images) as
# onnxruntime against Keras (4 random models x 64 images at 64x64: mean
# 0.8-1.5 steps, worst image 8-14 steps per model, 15 on another 48 images;
# the same with 1 or 2 threads). Trained models spread further: the QAT
# models of three `make demo` runs had a worst image of 21, 21 and 32 steps
# (mean 0.54-0.78, top-1 agreement 0.98-1.0); a softmax output amplifies
# near-ties: the calibrated, not fine-tuned QAT model of a later demo run
# (softmax output, step 1/256) had a worst image of 62 steps (mean 0.96,
# top-1 agreement 0.984) where its logits differ by 13 steps; a QAT model
# fine-tuned half on the float model's probabilities (softer outputs, more
# near-ties: the pipeline's distillation) reached 99 steps (mean 1.01, top-1
# agreement 0.969). So the max bound is 128 steps, half the int8 range of the
# output: a near-tie's probability may move that far, a wrong scale moves
# every output. The mean bound is the one that catches a wrong
# scale or zero point, which shifts most outputs by many steps. A dropped
# quantizer is caught by counting the QuantizeLinear nodes instead.
QAT_MEAN_TOLERANCE_STEPS = 2.0
QAT_MAX_TOLERANCE_STEPS = 128.0
# A weight is taken as fake-quantized when every value is within this fraction
# of a step of the int8 grid that its range defines (folded fake-quant kernels
# are within 1e-5 of a step; float kernels are up to 0.5 off).
_GRID_TOLERANCE_STEPS = 1e-3
# Ops that only move or reshape values: a DequantizeLinear before them still
# defines the quantization step of the graph output.
_LAYOUT_OPS = ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose")


def _static_image_shape(model):
    """(H, W, C) of the model's single image input; ValueError when not static."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("export_onnx expects a single-input, single-output image model.")
    return static_input_shape(model, "The ONNX export")


def _check_sample_images(images, image_shape):
    raw = np.asarray(images)
    expected = f"images of shape (N, {', '.join(map(str, image_shape))}) in the model's input range"
    if raw.dtype.kind not in "fiu":
        raise ValueError(f"sample_images must be {expected}; got dtype {raw.dtype}.")
    if raw.ndim != 4 or tuple(raw.shape[1:]) != tuple(image_shape):
        raise ValueError(f"sample_images must be {expected}; got shape {raw.shape}.")
    if len(raw) == 0:
        raise ValueError("sample_images is empty.")
    return raw.astype(np.float32)


def _convert(model, image_shape, opset, batch_size):
    """tf2onnx conversion of `model(images, training=False)`; returns the ModelProto."""
    import tensorflow as tf
    import tf2onnx

    from keras_mobilevitv2.layers.folding import fold_norm_affines

    signature = [tf.TensorSpec((batch_size,) + tuple(image_shape), tf.float32, name=INPUT_NAME)]
    function = tf.function(lambda images: model(images, training=False))
    # Traced with each norm's affine folded into the next 1x1 convolution.
    with fold_norm_affines():
        proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    return proto


def _name_interface(proto, dynamic_batch):
    """Stable names: input 'image' with batch dim 'batch', output 'output'.

    tf2onnx names the output after the traced function's Identity op
    ('Identity:0') and the dynamic batch dim 'unk__N'.
    """
    graph = proto.graph
    if dynamic_batch:
        graph.input[0].type.tensor_type.shape.dim[0].dim_param = BATCH_DIM_NAME
        graph.output[0].type.tensor_type.shape.dim[0].dim_param = BATCH_DIM_NAME
    old_name = graph.output[0].name
    if old_name == OUTPUT_NAME:
        return
    for node in graph.node:
        node.output[:] = [OUTPUT_NAME if name == old_name else name for name in node.output]
        node.input[:] = [OUTPUT_NAME if name == old_name else name for name in node.input]
    graph.output[0].name = OUTPUT_NAME


def _symmetric_int8_grid(weights, axis):
    """(int8 values, scales) when `weights` lie on a symmetric narrow-range
    int8 grid with one scale per slice along `axis` (None: one scale), else None.

    The grid scale is max|w| / 127: the fake-quant kernel maps the largest
    magnitude to +-127 exactly.
    """
    if axis is None:
        magnitude = np.max(np.abs(weights), keepdims=True)
    else:
        other_axes = tuple(i for i in range(weights.ndim) if i != axis)
        magnitude = np.max(np.abs(weights), axis=other_axes, keepdims=True)
    scale = np.where(magnitude > 0, magnitude / 127.0, 1.0).astype(np.float32)
    steps = weights / scale
    values = np.round(steps)
    if np.max(np.abs(steps - values)) > _GRID_TOLERANCE_STEPS or np.max(np.abs(values)) > 127:
        return None
    return values.astype(np.int8), scale.reshape(-1) if axis is not None else scale.reshape(())


def _store_weights_as_int8(proto):
    """Replaces fake-quantized float kernels by int8 initializer + DequantizeLinear.

    Only kernels of Conv (per output channel, axis 0) and MatMul/Gemm (per
    tensor, as QuantizedDense quantizes them) that sit exactly on their int8
    grid are replaced, so the computed function is unchanged up to the last
    float bit. Returns the number of kernels replaced.
    """
    from onnx import helper
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    replaced = {}
    new_nodes = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in replaced:
            node.input[1] = replaced[name]
            continue
        if name not in initializers:
            continue
        weights = numpy_helper.to_array(initializers[name])
        if weights.dtype != np.float32:
            continue
        grid = None
        axis = None
        if node.op_type == "Conv":
            grid = _symmetric_int8_grid(weights, axis=0)
            axis = 0
        if grid is None:
            grid = _symmetric_int8_grid(weights, axis=None)
            axis = None
        if grid is None:
            continue
        values, scale = grid
        graph.initializer.extend(
            [
                numpy_helper.from_array(values, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point"),
            ]
        )
        attributes = {"axis": axis} if axis is not None else {}
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                [f"{name}_dequantized"],
                name=f"{name}_DequantizeLinear",
                **attributes,
            )
        )
        replaced[name] = f"{name}_dequantized"
        node.input[1] = replaced[name]
    # Initializer-fed nodes go first to keep the node list topologically sorted.
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    still_used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    kept = [tensor for tensor in graph.initializer if tensor.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(replaced)


def _output_quantization_step(proto):
    """Scale of the DequantizeLinear that defines the graph output, or None."""
    from onnx import numpy_helper

    producers = {output: node for node in proto.graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    node = producers.get(proto.graph.output[0].name)
    while node is not None and node.op_type in _LAYOUT_OPS:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in initializers:
        return None
    scale = numpy_helper.to_array(initializers[node.input[1]])
    return float(scale.reshape(-1)[0]) if scale.size == 1 else None


def _run_onnxruntime(path, images, batch_size):
    """Runs the file at `path` with onnxruntime's CPU provider, `batch_size`
    images at a time (all at once for a dynamic batch)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    chunk = batch_size or len(images)
    outputs = []
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk]
        count = len(batch)
        if count < chunk:  # a fixed-batch model takes only full batches
            batch = np.concatenate([batch, np.repeat(batch[-1:], chunk - count, axis=0)])
        outputs.append(session.run(None, {INPUT_NAME: batch})[0][:count])
    return np.concatenate(outputs)


def _compare(expected, actual, quantized, output_step):
    """Agreement figures and the tolerance verdict (None when within it)."""
    expected = expected.reshape(len(expected), -1)
    actual = actual.reshape(len(actual), -1)
    difference = np.abs(actual.astype(np.float64) - expected)
    if not np.all(np.isfinite(actual)):
        # NaN would slip through every "error <= tolerance" comparison below.
        return {"samples": int(len(expected)), "non_finite_outputs": int(np.sum(~np.isfinite(actual)))}, (
            "onnxruntime produced non-finite outputs"
        )
    agreement = {
        "samples": int(len(expected)),
        "max_abs_error": float(difference.max()),
        "mean_abs_error": float(difference.mean()),
        "top1_agreement": float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
    }
    if not quantized:
        output_scale = max(float(np.abs(expected).max()), 1e-6)
        tolerance = FLOAT_RELATIVE_TOLERANCE * output_scale
        agreement["tolerance"] = f"max |error| <= {FLOAT_RELATIVE_TOLERANCE:g} x max |output| = {tolerance:.3g}"
        failure = None if agreement["max_abs_error"] <= tolerance else "max |error| above the float tolerance"
        return agreement, failure
    if output_step is None:
        # An output without its own quantizer: take the int8 step of its range.
        output_step = max(float(np.ptp(expected)), 1e-6) / 255.0
    agreement["output_quantization_step"] = output_step
    agreement["mean_error_in_steps"] = agreement["mean_abs_error"] / output_step
    agreement["max_error_in_steps"] = agreement["max_abs_error"] / output_step
    agreement["tolerance"] = (
        f"mean |error| <= {QAT_MEAN_TOLERANCE_STEPS:g} and max |error| <= {QAT_MAX_TOLERANCE_STEPS:g} "
        f"output quantization steps ({output_step:.4g})"
    )
    failure = None
    if agreement["mean_error_in_steps"] > QAT_MEAN_TOLERANCE_STEPS:
        failure = "mean |error| above the QAT tolerance"
    elif agreement["max_error_in_steps"] > QAT_MAX_TOLERANCE_STEPS:
        failure = "max |error| above the QAT tolerance"
    return agreement, failure


def export(
    model,
    output_dir,
    name=None,
    *,
    calibration_images=None,
    sample_images=None,
    io_type="float32",
    opset=DEFAULT_OPSET,
    batch_size=None,
):
    """ONNX of `model`, checked against onnxruntime, with its report.

    Writes `<name>.float.onnx` for a float model, `<name>.qdq.onnx` for a QAT
    model (or for a float model given `calibration_images`: post-training
    quantization), and `<name>.onnx.report.json`; nothing when the check
    fails. The file takes and returns float32 (io_type "float32" only): a
    QDQ graph quantizes the float image itself. See `export_onnx` for the
    other arguments.

    Raises:
        TargetError: onnxruntime disagrees with Keras beyond the tolerance,
            or fake-quant ops did not become QDQ.
    """
    check_io_type(TARGET, io_type)
    name = check_name(name, model)
    _static_image_shape(model)
    if calibration_images is not None and not is_qat(model):
        model = quantized_for(model, "reference", calibration_images)
    variant = "qdq" if is_qat(model) else "float"
    with staged(output_dir, TARGET) as staging:
        report = export_onnx(
            model,
            staging.path(f"{name}.{variant}.onnx"),
            sample_images=sample_images,
            opset=opset,
            batch_size=batch_size,
        )
        report.update(target=TARGET, name=name, files={"onnx": report["path"]})
        return staging.commit(report, name, TARGET)


def export_onnx(model, path, sample_images=None, opset=DEFAULT_OPSET, batch_size=None):
    """Converts `model` to ONNX at `path`, checked with onnxruntime.

    Args:
        model: A float Keras image model, or a calibrated QAT model from
            `quantization.quantize_model` (exported in QDQ format). Its input
            must have a static (H, W, C); it takes raw pixels in the model's
            input range ([0, 255] for keras_mobilevitv2).
        path: Output file, ending in .onnx.
        sample_images: float images (N, H, W, C) to compare onnxruntime with
            Keras on; without them only the structure is reported.
        opset: ONNX opset (17 by default; 13 or newer keeps per-channel QDQ).
        batch_size: Static batch of the exported model; None (default) gives
            a dynamic batch dimension named 'batch'.

    Returns:
        The report dict: path, opset, size_bytes, quantized, op_types
        (histogram), quantize_linear / dequantize_linear counts, int8_weights,
        input / output names and shapes, and `agreement` when sample_images
        were given (max / mean |error|, top-1 agreement, tolerance; for QAT
        also the errors in output quantization steps).

    Raises:
        ValueError: for a path not ending in .onnx, a model without a static
            image input, sample images of the wrong shape, or an uncalibrated
            QAT model.
        TargetError: a QAT model whose fake-quant ops did not all become
            QuantizeLinear/DequantizeLinear, or onnxruntime outputs outside
            the tolerance (see QAT_*_TOLERANCE_STEPS /
            FLOAT_RELATIVE_TOLERANCE). No file is written then.
    """
    import onnx

    batch_size = _check_arguments(path, opset, batch_size)
    image_shape = _static_image_shape(model)
    if sample_images is not None:
        sample_images = _check_sample_images(sample_images, image_shape)
    quantized = is_qat(model)
    activation_quantizers = _activation_quantizers(model) if quantized else 0
    proto = _convert(model, image_shape, opset, batch_size)
    int8_weights = _store_weights_as_int8(proto) if quantized else 0
    _name_interface(proto, dynamic_batch=batch_size is None)
    onnx.checker.check_model(proto)  # the graph edits above keep it valid
    report = _describe(proto, path, opset, image_shape, batch_size, quantized)
    report.update(activation_quantizers=activation_quantizers, int8_weights=int8_weights)
    if quantized and report["quantize_linear"] < activation_quantizers:
        raise TargetError(
            f"The QAT model has {activation_quantizers} activation fake-quant ops but the ONNX graph only "
            f"{report['quantize_linear']} QuantizeLinear nodes: some were not converted to QDQ.",
            report,
        )
    _write_checked(proto, path, model, sample_images, batch_size, report)
    return report


def _check_arguments(path, opset, batch_size):
    """The static batch (None: dynamic); ValueError for a bad path, opset or batch."""
    if not str(path).endswith(".onnx"):
        raise ValueError(f"path must end in .onnx; got {path!r}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}")
    if opset < 13:
        raise ValueError(f"opset must be 13 or newer (per-channel DequantizeLinear); got {opset}")
    return None if batch_size is None else int(batch_size)


def _activation_quantizers(model):
    """How many activation fake-quants the QAT model has; ValueError when
    some were never calibrated."""
    from quantization.quantize import quantizers
    from quantization.quantize import uncalibrated_quantizers

    missing = uncalibrated_quantizers(model)
    if missing:
        raise ValueError(
            f"{len(missing)} activation ranges of the QAT model were never set (e.g. "
            f"{missing[:3]}): run quantization.calibrate(model, images) first."
        )
    return len(quantizers(model))


def _describe(proto, path, opset, image_shape, batch_size, quantized):
    """The report's structural part: versions, op histogram, interface."""
    import onnx
    import onnxruntime
    import tf2onnx

    op_types = collections.Counter(node.op_type for node in proto.graph.node)
    return {
        "path": str(path),
        "opset": int(opset),
        "versions": {"tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "quantized": quantized,
        "op_types": dict(sorted(op_types.items())),
        "node_count": len(proto.graph.node),
        "quantize_linear": op_types.get("QuantizeLinear", 0),
        "dequantize_linear": op_types.get("DequantizeLinear", 0),
        "input": {"name": INPUT_NAME, "shape": [batch_size or BATCH_DIM_NAME, *image_shape]},
        "output": {
            "name": OUTPUT_NAME,
            "shape": [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim],
        },
    }


def _write_checked(proto, path, model, sample_images, batch_size, report):
    """Writes `proto` to a temporary file, compares onnxruntime with Keras on
    `sample_images`, and moves the file to `path` only when they agree."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(proto.SerializeToString())
        report["size_bytes"] = os.path.getsize(temporary)
        if sample_images is not None:
            expected = np.asarray(model.predict_on_batch(sample_images), np.float64)
            actual = _run_onnxruntime(temporary, sample_images, batch_size)
            step = _output_quantization_step(proto) if report["quantized"] else None
            report["agreement"], failure = _compare(expected, actual, report["quantized"], step)
            if failure:
                raise TargetError(
                    f"onnxruntime disagrees with Keras on the ONNX export of {model.name}: {failure} "
                    f"({_failure_figures(report['agreement'])}).",
                    report,
                )
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _failure_figures(agreement):
    if "tolerance" in agreement:
        return f"{_format_agreement(agreement)}; {agreement['tolerance']}"
    return f"{agreement['non_finite_outputs']} non-finite values"


def _format_agreement(agreement):
    text = (
        f"{agreement['samples']} samples: max |err| {agreement['max_abs_error']:.4g}, "
        f"mean |err| {agreement['mean_abs_error']:.4g}, top-1 agreement {agreement['top1_agreement']:.3f}"
    )
    if "mean_error_in_steps" in agreement:
        text += (
            f" (mean {agreement['mean_error_in_steps']:.2f}, max {agreement['max_error_in_steps']:.1f} output steps)"
        )
    return text


def format_report(report):
    """A few readable lines for the report of `export` / `export_onnx`."""
    kind = "QDQ int8" if report["quantized"] else "float"
    size = f"{report['size_bytes'] / 1e6:.2f} MB" if "size_bytes" in report else "not written"
    lines = [
        f"ONNX {kind}, opset {report['opset']}: {size}, {report['node_count']} nodes, "
        f"input {report['input']['name']} {report['input']['shape']}, output {report['output']['name']} "
        f"{report['output']['shape']}",
        "  ops: " + ", ".join(f"{name} {count}" for name, count in report["op_types"].items()),
    ]
    if report["quantized"]:
        lines.append(
            f"  QuantizeLinear {report['quantize_linear']}, DequantizeLinear {report['dequantize_linear']} "
            f"({report['activation_quantizers']} activation quantizers, {report['int8_weights']} int8 weights)"
        )
    if "agreement" in report and "tolerance" in report["agreement"]:
        lines.append(f"  onnxruntime vs Keras on {_format_agreement(report['agreement'])}")
    lines.extend(f"  wrote {kind}: {path}" for kind, path in (report.get("files") or {}).items())
    return "\n".join(lines)
