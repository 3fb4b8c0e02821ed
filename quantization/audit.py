"""Audit of a converted TFLite flatbuffer: ops, dtypes, ranks, agreement.

The flatbuffer is read with TFLite's own schema (no interpreter needed for
the structure); agreement with the Keras model runs the TFLite interpreter.
"""

import json
import warnings

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

_OP_NAMES = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
TENSOR_TYPE_NAMES = {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64")


def operator_codes(model):
    """[(op name, version)] per operator code of a parsed `schema.Model`;
    custom ops are named `CUSTOM:<code>`."""
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")
        if builtin == schema.BuiltinOperator.CUSTOM:
            name = f"CUSTOM:{code.CustomCode().decode()}"
        codes.append((name, code.Version()))
    return codes


def read_structure(flatbuffer):
    """{ops: [(name, version)], tensors: [{name, dtype, shape}], inputs, outputs}."""
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    codes = operator_codes(model)
    graph = model.Subgraphs(0)
    tensors = []
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        tensors.append(
            {
                "name": tensor.Name().decode(),
                "dtype": TENSOR_TYPE_NAMES.get(tensor.Type(), str(tensor.Type())),
                "shape": [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else [],
            }
        )
    ops = [codes[graph.Operators(i).OpcodeIndex()] for i in range(graph.OperatorsLength())]
    inputs = [int(i) for i in graph.InputsAsNumpy()]
    outputs = [int(i) for i in graph.OutputsAsNumpy()]
    return {"ops": ops, "tensors": tensors, "inputs": inputs, "outputs": outputs}


# Option tables worth reading for target compatibility: schema class -> the
# accessor methods exposed as snake_case keys.
_OPTION_FIELDS = {
    "Conv2DOptions": ("StrideH", "StrideW", "DilationHFactor", "DilationWFactor", "FusedActivationFunction"),
    "DepthwiseConv2DOptions": ("StrideH", "StrideW", "DilationHFactor", "DilationWFactor", "FusedActivationFunction"),
    "FullyConnectedOptions": ("FusedActivationFunction", "KeepNumDims"),
    "AddOptions": ("FusedActivationFunction",),
    "SubOptions": ("FusedActivationFunction",),
    "MulOptions": ("FusedActivationFunction",),
    "ConcatenationOptions": ("Axis", "FusedActivationFunction"),
    "Pool2DOptions": ("StrideH", "StrideW", "FilterHeight", "FilterWidth", "FusedActivationFunction"),
    "SoftmaxOptions": ("Beta",),
    "ReducerOptions": ("KeepDims",),
    "StridedSliceOptions": ("BeginMask", "EndMask", "EllipsisMask", "NewAxisMask", "ShrinkAxisMask"),
    "TransposeConvOptions": ("StrideH", "StrideW", "FusedActivationFunction"),
}
_OPTION_TYPE_NAMES = {value: name for name, value in vars(schema.BuiltinOptions).items() if not name.startswith("_")}


def _snake(name):
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def read_operators(flatbuffer):
    """Every operator in execution order, with what target checks need:
    `[{index, op, version, inputs, outputs, options}]`. Inputs and outputs are
    `{shape, dtype, constant}` dicts (`constant`: the values of a small int32
    constant such as reduction axes, else None); `options` holds the fields of
    `_OPTION_FIELDS` for the op's builtin options."""
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    codes = operator_codes(model)
    graph = model.Subgraphs(0)

    def tensor_info(index):
        if index < 0:
            return None
        tensor = graph.Tensors(index)
        dtype = TENSOR_TYPE_NAMES.get(tensor.Type(), str(tensor.Type()))
        shape = [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
        constant = None
        buffer = model.Buffers(tensor.Buffer())
        if dtype == "INT32" and buffer is not None and 0 < buffer.DataLength() <= 64:
            constant = [int(v) for v in np.frombuffer(buffer.DataAsNumpy().tobytes(), np.int32)]
        is_constant = buffer is not None and buffer.DataLength() > 0
        return {"shape": shape, "dtype": dtype, "constant": constant, "is_constant": is_constant}

    operators = []
    for i in range(graph.OperatorsLength()):
        operator = graph.Operators(i)
        name, version = codes[operator.OpcodeIndex()]
        options = {}
        type_name = _OPTION_TYPE_NAMES.get(operator.BuiltinOptionsType())
        table = operator.BuiltinOptions()
        if type_name in _OPTION_FIELDS and table is not None:
            parsed = getattr(schema, type_name)()
            parsed.Init(table.Bytes, table.Pos)
            options = {_snake(field): getattr(parsed, field)() for field in _OPTION_FIELDS[type_name]}
        operators.append(
            {
                "index": i,
                "op": name,
                "version": int(version),
                "inputs": [tensor_info(int(t)) for t in operator.InputsAsNumpy()] if operator.InputsLength() else [],
                "outputs": [tensor_info(int(t)) for t in operator.OutputsAsNumpy()] if operator.OutputsLength() else [],
                "options": options,
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
                experimental_op_resolver_type=resolver.AUTO if use_xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                num_threads=num_threads,
            )
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(interpreter, images):
    """Runs images one batch-sized chunk at a time; returns float outputs."""
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    batch = int(input_detail["shape"][0])
    outputs = []
    for start in range(0, len(images), batch):
        chunk = np.asarray(images[start : start + batch], np.float32)
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
        if input_detail["dtype"] != np.float32:
            scale, zero_point = input_detail["quantization"]
            info = np.iinfo(input_detail["dtype"])
            chunk = np.clip(np.round(chunk / scale + zero_point), info.min, info.max).astype(input_detail["dtype"])
        interpreter.set_tensor(input_detail["index"], chunk)
        interpreter.invoke()
        out = interpreter.get_tensor(output_detail["index"])
        if output_detail["dtype"] != np.float32:
            scale, zero_point = output_detail["quantization"]
            out = (out.astype(np.float32) - zero_point) * scale
        outputs.append(out[: min(batch, len(images) - start)])
    return np.concatenate(outputs)


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
        report["errors"].append(
            f"{len(float_inside)} float tensors inside an int8 model, e.g. {float_inside[:5]}"
        )
    if keras_model is not None and sample_images is not None:
        interpreter = make_interpreter(flatbuffer)
        expected = np.asarray(keras_model.predict_on_batch(np.asarray(sample_images, np.float32)), np.float32)
        actual = run_tflite(interpreter, sample_images)
        output_detail = interpreter.get_output_details()[0]
        step = float(output_detail["quantization"][0]) if output_detail["dtype"] != np.float32 else 0.0
        difference = np.abs(actual - expected)
        report["agreement"] = {
            "samples": int(len(sample_images)),
            "top1_agreement": float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
            "max_abs_error": float(difference.max()),
            "mean_abs_error": float(difference.mean()),
            "output_quantization_step": step,
            "max_error_in_steps": float(difference.max() / step) if step else None,
        }
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
