"""Audit of a converted TFLite flatbuffer: ops, dtypes, ranks, agreement.

The structure comes from `quantization.tflite_graph` (TFLite's schema, no
interpreter); `read_structure` and `read_operators` are its report-shaped
views. Agreement with the Keras model runs the TFLite interpreter.
"""

import json
import warnings

import numpy as np

from quantization import tflite_graph
from quantization.tflite_graph import read_graph

# The shared reader's vocabulary, under the names callers of this module know.
TENSOR_TYPE_NAMES = tflite_graph.TENSOR_TYPE_NAMES
FLOAT_TYPES = tflite_graph.FLOAT_TYPES
operator_codes = tflite_graph.operator_codes


def read_structure(flatbuffer):
    """{ops: [(name, version)], tensors: [{name, dtype, shape}], inputs, outputs}."""
    graph = read_graph(flatbuffer)
    return {
        "ops": [(op.name, op.version) for op in graph.operators],
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in graph.tensors],
        "inputs": list(graph.inputs),
        "outputs": list(graph.outputs),
    }


# The option fields `read_operators` reports, per options table: what target
# checks look at, not everything the schema holds.
_OPTION_FIELDS = {
    "Conv2DOptions": ("stride_h", "stride_w", "dilation_h_factor", "dilation_w_factor", "fused_activation_function"),
    "DepthwiseConv2DOptions": (
        "stride_h",
        "stride_w",
        "dilation_h_factor",
        "dilation_w_factor",
        "fused_activation_function",
    ),
    "FullyConnectedOptions": ("fused_activation_function", "keep_num_dims"),
    "AddOptions": ("fused_activation_function",),
    "SubOptions": ("fused_activation_function",),
    "MulOptions": ("fused_activation_function",),
    "ConcatenationOptions": ("axis", "fused_activation_function"),
    "Pool2DOptions": ("stride_h", "stride_w", "filter_height", "filter_width", "fused_activation_function"),
    "SoftmaxOptions": ("beta",),
    "ReducerOptions": ("keep_dims",),
    "StridedSliceOptions": ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask"),
    "TransposeConvOptions": ("stride_h", "stride_w", "fused_activation_function"),
}


def _tensor_entry(tensor):
    if tensor is None:
        return None
    constant = None
    # Small int32 constants are the axes, paddings and strides checks read;
    # larger ones (shapes of big weights) would only bloat the report.
    if tensor.dtype == "INT32" and tensor.data is not None and 0 < tensor.buffer_size <= 64:
        constant = [int(v) for v in tensor.data.ravel()]
    return {"shape": list(tensor.shape), "dtype": tensor.dtype, "constant": constant, "is_constant": tensor.is_constant}


def read_operators(flatbuffer):
    """Every operator in execution order, with what target checks need:
    `[{index, op, version, inputs, outputs, options}]`. Inputs and outputs are
    `{shape, dtype, constant, is_constant}` dicts (`constant`: the values of a
    small int32 constant such as reduction axes, else None; None for an
    omitted optional input); `options` holds the fields of `_OPTION_FIELDS`
    for the op's builtin options."""
    graph = read_graph(flatbuffer)
    operators = []
    for op in graph.operators:
        fields = _OPTION_FIELDS.get(op.options_type, ())
        operators.append(
            {
                "index": op.index,
                "op": op.name,
                "version": op.version,
                "inputs": [_tensor_entry(t) for t in graph.input_tensors(op)],
                "outputs": [_tensor_entry(t) for t in graph.output_tensors(op)],
                "options": {field: op.options[field] for field in fields if field in op.options},
            }
        )
    return operators


def make_interpreter(flatbuffer, use_xnnpack=False, num_threads=None):
    """The LiteRT interpreter when installed, else TensorFlow's."""
    try:
        from ai_edge_litert import interpreter as litert

        resolver = (
            litert.OpResolverType.AUTO if use_xnnpack else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
        interpreter = litert.Interpreter(
            model_content=flatbuffer, experimental_op_resolver_type=resolver, num_threads=num_threads
        )
    except ImportError:
        import tensorflow as tf

        resolver = tf.lite.experimental.OpResolverType
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(
                model_content=flatbuffer,
                experimental_op_resolver_type=resolver.AUTO
                if use_xnnpack
                else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                num_threads=num_threads,
            )
    interpreter.allocate_tensors()
    return interpreter


def _input_chunks(input_detail, images):
    """`images` as the input tensor takes them: batch-sized chunks (the last
    one padded by repetition) in the input's dtype; yields (chunk, rows)."""
    batch = int(input_detail["shape"][0])
    for start in range(0, len(images), batch):
        chunk = np.asarray(images[start : start + batch], np.float32)
        rows = len(chunk)
        if rows < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - rows, 0)])
        if input_detail["dtype"] != np.float32:
            scale, zero_point = input_detail["quantization"]
            info = np.iinfo(input_detail["dtype"])
            chunk = np.clip(np.round(chunk / scale + zero_point), info.min, info.max).astype(input_detail["dtype"])
        yield chunk, rows


def _dequantized(out, detail):
    if detail["dtype"] == np.float32:
        return out
    scale, zero_point = detail["quantization"]
    return (out.astype(np.float32) - zero_point) * scale


def run_tflite(interpreter, images):
    """Runs images one batch-sized chunk at a time; returns float outputs."""
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    outputs = []
    for chunk, rows in _input_chunks(input_detail, images):
        interpreter.set_tensor(input_detail["index"], chunk)
        interpreter.invoke()
        outputs.append(_dequantized(interpreter.get_tensor(output_detail["index"]), output_detail)[:rows])
    return np.concatenate(outputs)


def run_tflite_outputs(interpreter, images):
    """`run_tflite` for a model with several named outputs (a Keras dict
    output): {name: float outputs}, through its serving signature."""
    runner = interpreter.get_signature_runner()
    (input_name, input_detail), *_ = runner.get_input_details().items()
    output_details = runner.get_output_details()
    outputs = {name: [] for name in output_details}
    for chunk, rows in _input_chunks(input_detail, images):
        for name, out in runner(**{input_name: chunk}).items():
            outputs[name].append(_dequantized(out, output_details[name])[:rows])
    steps = {
        name: float(detail["quantization"][0]) if detail["dtype"] != np.float32 else 0.0
        for name, detail in output_details.items()
    }
    return {name: np.concatenate(chunks) for name, chunks in outputs.items()}, steps


def _compare(actual, expected, step):
    difference = np.abs(actual - expected)
    return {
        "top1_agreement": float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
        "max_abs_error": float(difference.max()),
        "mean_abs_error": float(difference.mean()),
        "output_quantization_step": step,
        "max_error_in_steps": float(difference.max() / step) if step else None,
    }


def _agreement(flatbuffer, keras_model, sample_images):
    """TFLite against Keras on `sample_images`. With several outputs, each
    is compared (`outputs`) and the top-1 agreement is the class output's
    (the one named "...logits"; the first otherwise)."""
    interpreter = make_interpreter(flatbuffer)
    expected = keras_model.predict_on_batch(np.asarray(sample_images, np.float32))
    if not isinstance(expected, dict):
        output_detail = interpreter.get_output_details()[0]
        step = float(output_detail["quantization"][0]) if output_detail["dtype"] != np.float32 else 0.0
        actual = run_tflite(interpreter, sample_images)
        return {"samples": int(len(sample_images)), **_compare(actual, np.asarray(expected, np.float32), step)}
    actual, steps = run_tflite_outputs(interpreter, sample_images)
    if set(actual) != set(expected):
        raise ValueError(f"The TFLite outputs {sorted(actual)} are not the Keras model's {sorted(expected)}.")
    outputs = {name: _compare(actual[name], np.asarray(expected[name], np.float32), steps[name]) for name in expected}
    classes = next((name for name in expected if name.endswith("logits")), next(iter(expected)))
    return {"samples": int(len(sample_images)), "class_output": classes, **outputs[classes], "outputs": outputs}


def audit(flatbuffer, mode, keras_model=None, sample_images=None, allow_float=False):
    """The audit dict; `errors` lists what makes the model unfit for `mode`."""
    structure = read_structure(flatbuffer)
    boundary = set(structure["inputs"]) | set(structure["outputs"])
    dtype_counts = {}
    for tensor in structure["tensors"]:
        dtype_counts[tensor["dtype"]] = dtype_counts.get(tensor["dtype"], 0) + 1
    float_inside = [
        t["name"] for i, t in enumerate(structure["tensors"]) if i not in boundary and t["dtype"] in FLOAT_TYPES
    ]
    op_versions = sorted({f"{name} v{version}" for name, version in structure["ops"]})
    report = {
        "mode": mode,
        "size_bytes": len(flatbuffer),
        "ops": op_versions,
        "op_count": len(structure["ops"]),
        "tensor_dtypes": dtype_counts,
        "float_tensors_inside": float_inside,
        "max_tensor_rank": max(len(t["shape"]) for t in structure["tensors"]),
        "input": {k: structure["tensors"][structure["inputs"][0]][k] for k in ("dtype", "shape")},
        "output": {k: structure["tensors"][structure["outputs"][0]][k] for k in ("dtype", "shape")},
        "errors": [],
    }
    custom = [name for name, _ in structure["ops"] if name.startswith("CUSTOM") or name.startswith("FLEX")]
    if custom:
        report["errors"].append(f"non-builtin ops: {sorted(set(custom))}")
    if report["max_tensor_rank"] > 4:
        report["errors"].append(f"a tensor has rank {report['max_tensor_rank']} (> 4)")
    if mode.endswith("int8") and float_inside and not allow_float:
        report["errors"].append(f"{len(float_inside)} float tensors inside an int8 model, e.g. {float_inside[:5]}")
    if keras_model is not None and sample_images is not None:
        report["agreement"] = _agreement(flatbuffer, keras_model, sample_images)
    return report


def format_report(report):
    lines = [
        f"mode {report['mode']}: {report['size_bytes'] / 1e6:.2f} MB, {report['op_count']} ops, "
        f"max rank {report['max_tensor_rank']}, input {report['input']['dtype']} "
        f"{report['input']['shape']}, output {report['output']['dtype']}",
        f"  ops: {', '.join(report['ops'])}",
        f"  tensors: {json.dumps(report['tensor_dtypes'], sort_keys=True)}"
        f"; float inside: {len(report['float_tensors_inside'])}",
    ]
    if "agreement" in report:
        a = report["agreement"]
        lines.append(
            f"  vs Keras on {a['samples']} samples: top-1 agreement {a['top1_agreement']:.3f}, "
            f"max |err| {a['max_abs_error']:.4g}, mean |err| {a['mean_abs_error']:.4g}"
            + (f" ({a['max_error_in_steps']:.1f} output steps)" if a["max_error_in_steps"] is not None else "")
        )
    for error in report["errors"]:
        lines.append(f"  ERROR: {error}")
    return "\n".join(lines)
