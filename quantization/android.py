"""Android deployment: float16 and int8 TFLite models with a GPU-delegate
compatibility report and CPU (XNNPACK) latency.

`gpu_delegate_compatibility` reads the flatbuffer with TFLite's schema and
applies the rules of the Android GPU delegate as written in TFLite's
`tools/versioning/gpu_compatibility.cc` (per-op checks) and
`delegates/gpu/common/model_builder.cc` (tensor types, rank, partitioning),
without a device. It checks what the flatbuffer shows: op type, builtin
options, tensor ranks, dtypes, which inputs are constant, static shapes.
What only a device shows (driver bugs, OpenCL vs OpenGL differences, memory)
is out of its reach; the delegate's own log on the phone remains the last word.

`run_analyzer` asks TensorFlow's own checker, `tf.lite.experimental.Analyzer`
(gpu_compatibility=True, which calls gpu_compatibility.cc per op), and
`compare_with_analyzer` sets its verdict beside ours, naming the deciding rule
where they differ. `analyzer_checks_gpu` first tests whether the Analyzer
checks at all: TensorFlow 2.21's wheel calls every model compatible (its
analyzer has no warning code; ARG_MAX, CUMSUM, TOPK_V2 and 5-D TRANSPOSE all
pass), so there its verdict is recorded but proves nothing.

`xnnpack_latency` times the default CPU runtime (LiteRT with its default op
resolver, which applies the XNNPACK delegate) on this machine: a relative
figure between models, not a phone measurement.
"""

import functools
import json
import os
import re
import shutil
import statistics
import tempfile
import time

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from quantization.audit import TENSOR_TYPE_NAMES
from quantization.audit import operator_codes

_FLOAT_TYPES = ("FLOAT32", "FLOAT16")
# With TFLITE_GPU_EXPERIMENTAL_FLAGS_ENABLE_QUANT (on by default) the delegate
# also takes int8/uint8 tensors: it dequantizes them and computes in float.
_QUANTIZED_TYPES = ("INT8", "UINT8")
_MAX_RANK = 4

_UNARY_ELEMENTWISE = (
    "ABS", "CEIL", "COS", "ELU", "EXP", "FLOOR", "GELU", "LOG", "LOGISTIC", "NEG", "RSQRT", "SIGN", "SIN",
    "SQRT", "SQUARE", "TANH",
)
_BINARY_ELEMENTWISE = (
    "ATAN2", "DIV", "EQUAL", "FLOOR_DIV", "FLOOR_MOD", "GREATER", "GREATER_EQUAL", "LOGICAL_AND", "LESS",
    "LESS_EQUAL", "MAXIMUM", "MINIMUM", "NOT_EQUAL", "POW", "SQUARED_DIFFERENCE", "SUB",
)
_CUSTOM_OPS = ("Convolution2DTransposeBias", "MaxPoolingWithArgmax2D", "MaxUnpooling2D", "Resampler")

INT8_NOTE = (
    "int8 model: the GPU delegate runs it as a float view (weights dequantized, quantization "
    "simulated in float); int8 inputs/outputs are (de)quantized on the CPU, so float I/O is "
    "recommended for the GPU."
)
PARTITION_NOTE = (
    "The GPU delegate's default max_delegated_partitions is 1: with several GPU partitions only the "
    "largest runs on the GPU and the rest on the CPU."
)


# ---------------------------------------------------------------- flatbuffer


class _Tensor:
    """What the GPU rules need to know about one tensor."""

    def __init__(self, name, dtype, shape, signature, constant):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.signature = signature
        self.constant = constant

    @property
    def rank(self):
        return len(self.shape)


class _Op:
    def __init__(self, index, name, version, inputs, outputs, options):
        self.index = index
        self.name = name
        self.version = version
        self.inputs = inputs  # _Tensor or None (an omitted optional input)
        self.outputs = outputs
        self.options = options  # the schema options table, or None
        self.input_ids = []
        self.output_ids = []


def _options(operator):
    """The operator's builtin options as the matching schema class, or None."""
    options_type = operator.BuiltinOptionsType()
    table = operator.BuiltinOptions()
    if table is None or options_type == schema.BuiltinOptions.NONE:
        return None
    class_name = next((name for name, value in vars(schema.BuiltinOptions).items() if value == options_type), None)
    options_class = getattr(schema, class_name, None) if class_name else None
    if options_class is None:
        return None
    options = options_class()
    options.Init(table.Bytes, table.Pos)
    return options


def _read_graph(flatbuffer):
    """The main subgraph's ops in execution order, plus its input tensor ids.

    A tensor is constant when its buffer holds data. The output of a
    DEQUANTIZE of a constant float16 tensor counts as constant too: float16
    models store weights that way, and the delegate's FP16 partition helper
    folds those DEQUANTIZE ops into their consumers.
    """
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    codes = operator_codes(model)
    graph = model.Subgraphs(0)
    tensors = []
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        buffer = model.Buffers(tensor.Buffer()) if tensor.Buffer() < model.BuffersLength() else None
        # Models over 2 GB keep buffer data outside the flatbuffer (offset/size).
        constant = buffer is not None and (buffer.DataLength() > 0 or buffer.Offset() > 1)
        shape = [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
        signature = [int(d) for d in tensor.ShapeSignatureAsNumpy()] if tensor.ShapeSignatureLength() else shape
        tensors.append(
            _Tensor(tensor.Name().decode(), TENSOR_TYPE_NAMES.get(tensor.Type(), str(tensor.Type())), shape, signature,
                    constant)
        )
    ops = []
    for i in range(graph.OperatorsLength()):
        operator = graph.Operators(i)
        name, version = codes[operator.OpcodeIndex()]
        input_ids = [int(t) for t in operator.InputsAsNumpy()] if operator.InputsLength() else []
        output_ids = [int(t) for t in operator.OutputsAsNumpy()] if operator.OutputsLength() else []
        op = _Op(
            i, name, version, [tensors[t] if t >= 0 else None for t in input_ids], [tensors[t] for t in output_ids],
            _options(operator),
        )
        op.input_ids = [t for t in input_ids if t >= 0]
        op.output_ids = output_ids
        if name == "DEQUANTIZE" and op.inputs and op.inputs[0].constant and op.inputs[0].dtype == "FLOAT16":
            for tensor in op.outputs:
                tensor.constant = True
        ops.append(op)
    graph_inputs = [int(t) for t in graph.InputsAsNumpy()] if graph.InputsLength() else []
    return ops, graph_inputs, tensors


# ---------------------------------------------------------------- GPU rules


def _present(op):
    return [tensor for tensor in op.inputs if tensor is not None]


def _runtime_inputs(op):
    return [tensor for tensor in _present(op) if not tensor.constant]


def _expect_io(op, runtime_inputs, outputs=1, const_inputs=None):
    runtime = len(_runtime_inputs(op))
    if const_inputs is not None:
        constants = len(_present(op)) - runtime
        if constants != const_inputs:
            return f"expects {const_inputs} constant input(s), has {constants}"
    if runtime != runtime_inputs:
        return f"expects {runtime_inputs} runtime input(s), has {runtime}"
    if len(op.outputs) != outputs:
        return f"expects {outputs} output(s), has {len(op.outputs)}"
    return None


def _fused_activation(op):
    activation = getattr(op.options, "FusedActivationFunction", None)
    if activation is not None and activation() == schema.ActivationFunctionType.SIGN_BIT:
        return "fused activation SIGN_BIT is not supported"
    return None


def _axes_const_int32(op, index=1):
    if len(op.inputs) <= index or op.inputs[index] is None:
        return "has no axes input"
    axes = op.inputs[index]
    if not axes.constant:
        return "axes must be a constant tensor"
    if axes.dtype != "INT32":
        return f"axes must be int32, not {axes.dtype.lower()}"
    return None


def _broadcast(first, second, enhanced):
    """ADD/MUL broadcasting between different ranks (both > 1)."""
    a, b = first.shape, second.shape
    if len(a) <= 1 or len(b) <= 1 or len(a) == len(b):
        return None
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    if enhanced:
        ok = all(x == y or x == 1 or y == 1 for x, y in zip(reversed(longer), reversed(shorter)))
    else:
        # Without the enhanced-broadcast flag only these 4-D patterns work.
        ok = len(longer) == 4 and (
            (len(shorter) == 3 and longer[0] == 1)  # [h, w, c] onto [1, h, w, c]
            or (len(shorter) == 2 and longer[0] == 1 and shorter == [1, 1])  # [1, 1]
            or (len(shorter) == 2 and longer[0] == shorter[0] and longer[3] == shorter[1])  # [b, c]
        )
    return None if ok else f"broadcasting {a} with {b} is not supported"


def _check_conv(op):
    if len(_runtime_inputs(op)) > 2:
        return "expects 1 or 2 runtime inputs"
    if len(op.outputs) != 1:
        return "expects 1 output"
    o = op.options
    if o is not None:
        if o.StrideH() <= 0 or o.StrideW() <= 0 or o.DilationHFactor() <= 0 or o.DilationWFactor() <= 0:
            return "strides and dilations must be positive"
    return _fused_activation(op)


def _check_depthwise(op):
    problem = _check_conv(op)
    if problem:
        return problem
    source, kernel, output = op.inputs[0], op.inputs[1], op.outputs[0]
    if source.rank != 4 or kernel.rank != 4 or output.rank != 4:
        return "input, filter and output must be 4-D"
    multiplier = op.options.DepthMultiplier() if op.options is not None else 1
    if output.shape[3] != source.shape[3] * multiplier:
        return "output channels != input channels x depth_multiplier"
    if multiplier != 1 and source.shape[3] != 1:
        return "depth_multiplier != 1 needs a single input channel"
    return None


def _check_pool(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    o = op.options
    if o is not None and min(o.FilterHeight(), o.FilterWidth(), o.StrideH(), o.StrideW()) <= 0:
        return "kernel and strides must be positive"
    return _fused_activation(op)


def _check_add(op, enhanced):
    if len(op.inputs) != 2:
        return "ADD requires two inputs"
    return _broadcast(op.inputs[0], op.inputs[1], enhanced)


def _check_mul(op, enhanced):
    if len(op.inputs) != 2:
        return "MUL requires two inputs"
    first, second = op.inputs
    if first.rank == second.rank:
        first_smaller = any(x < y for x, y in zip(first.shape, second.shape))
        second_smaller = any(y < x for x, y in zip(first.shape, second.shape))
        if first_smaller and second_smaller:
            # e.g. [1, 256, 1] x [1, 1, 256]: an outer product, not an elementwise MUL.
            return f"MUL of {first.shape} and {second.shape}: neither input covers the other"
    else:
        problem = _broadcast(first, second, enhanced)
        if problem:
            return problem
    return _fused_activation(op)


def _check_mean(op):
    return _expect_io(op, 1, const_inputs=1) or _axes_const_int32(op)


def _check_reduce(op):
    return _expect_io(op, 1) or _axes_const_int32(op)


def _check_softmax(op):
    if op.options is not None and op.options.Beta() != 1.0:
        return f"SOFTMAX beta must be 1 (is {op.options.Beta():g})"
    return None


def _check_strided_slice(op):
    o = op.options
    if o is not None:
        for mask, label in ((o.EllipsisMask(), "ellipsis_mask"), (o.NewAxisMask(), "new_axis_mask"),
                            (o.ShrinkAxisMask(), "shrink_axis_mask")):
            if mask:
                return f"STRIDED_SLICE with {label} is not supported"
    if len(op.inputs) < 4:
        return "STRIDED_SLICE requires 4 inputs"
    if op.inputs[0].rank not in (3, 4):
        return f"STRIDED_SLICE supports 3-D or 4-D input only (input is {op.inputs[0].rank}-D)"
    return None


def _check_slice(op):
    if len(op.inputs) < 3:
        return "SLICE requires 3 inputs"
    if op.inputs[0].rank not in (3, 4):
        return f"SLICE supports 3-D or 4-D input only (input is {op.inputs[0].rank}-D)"
    return None


def _check_fully_connected(op):
    o = op.options
    if o is not None and o.WeightsFormat() != schema.FullyConnectedOptionsWeightsFormat.DEFAULT:
        return "only the default weights format is supported"
    if len(_runtime_inputs(op)) > 2:
        return "more than 2 runtime inputs"
    if op.inputs[0].constant:
        return "constant input is not supported"
    if o is not None and o.KeepNumDims() and op.inputs[0].rank != op.outputs[0].rank:
        return "keep_num_dims with different input and output ranks"
    return None


def _check_pad(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    if op.name == "MIRROR_PAD" and op.options is not None and op.options.Mode() != schema.MirrorPadMode.REFLECT:
        return "only REFLECT mirror padding is supported"
    paddings = op.inputs[1]
    if paddings.rank != 2 or paddings.shape[0] not in (3, 4) or paddings.shape[1] != 2:
        return f"paddings must be 3x2 or 4x2 (is {paddings.shape})"
    return None


def _check_binary(op):
    runtime = len(_runtime_inputs(op))
    if len(_present(op)) != 2 or runtime not in (1, 2) or len(op.outputs) != 1:
        return "handles 1 or 2 runtime operands only"
    return _fused_activation(op)


def _check_resize_bilinear(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    if op.options is not None and op.options.AlignCorners() and op.options.HalfPixelCenters():
        return "align_corners together with half_pixel_centers"
    return None


def _check_block_size(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    if op.options is not None and op.options.BlockSize() <= 1:
        return "block_size must be > 1"
    return None


def _check_gather(op):
    if len(_runtime_inputs(op)) not in (1, 2) or len(op.outputs) != 1:
        return "handles 1 or 2 operands only"
    if op.inputs[0].dtype == "INT32":
        return "int32 input is not supported"
    indices = op.inputs[1]
    if indices.rank != 1 or indices.dtype != "INT32":
        return "indices must be 1-D int32"
    return None


def _check_cast(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    source, target = op.inputs[0].dtype, op.outputs[0].dtype
    floats = ("FLOAT32", "FLOAT16")
    if (source == "BOOL" and target in floats) or (source in floats and target == "BOOL"):
        return None
    if source in ("FLOAT32", "INT32") and target in ("FLOAT32", "INT32"):
        return None
    return f"CAST from {source.lower()} to {target.lower()} is not supported"


def _check_dequantize(op):
    if len(op.inputs) != 1 or len(op.outputs) != 1:
        return "expects 1 input and 1 output"
    if op.inputs[0].dtype == "INT16":
        return "int16 dequantization is not supported"
    return None


def _always(op):
    return None


def _rule(op, enhanced_broadcast):
    """The op-specific check of gpu_compatibility.cc, as (function) or None
    when the delegate has no parser for the op."""
    name = op.name
    if name.startswith("CUSTOM:"):
        return _always if name[len("CUSTOM:"):] in _CUSTOM_OPS else None
    if name in _UNARY_ELEMENTWISE:
        return lambda o: _expect_io(o, 1, const_inputs=0)
    if name in _BINARY_ELEMENTWISE:
        return _check_binary
    rules = {
        "ADD": lambda o: _check_add(o, enhanced_broadcast),
        "ADD_N": lambda o: None if len(o.inputs) == 2 else "ADD_N supports 2 inputs only",
        "AVERAGE_POOL_2D": _check_pool,
        "MAX_POOL_2D": _check_pool,
        "BATCH_MATMUL": lambda o: None if len(o.inputs) == 2 and len(o.outputs) == 1 else "expects 2 inputs, 1 output",
        "CAST": _check_cast,
        "CONCATENATION": _always,
        "CONV_2D": _check_conv,
        "DEPTHWISE_CONV_2D": _check_depthwise,
        "TRANSPOSE_CONV": lambda o: None if len(_runtime_inputs(o)) <= 2 else "expects 1 or 2 runtime inputs",
        "DEPTH_TO_SPACE": _check_block_size,
        "SPACE_TO_DEPTH": _check_block_size,
        "DEQUANTIZE": _check_dequantize,
        "QUANTIZE": lambda o: _expect_io(o, 1),
        "FULLY_CONNECTED": _check_fully_connected,
        "GATHER": _check_gather,
        "HARD_SWISH": lambda o: _expect_io(o, 1),
        "MEAN": _check_mean,
        "SUM": _check_reduce,
        "REDUCE_MAX": _check_reduce,
        "REDUCE_MIN": _check_reduce,
        "REDUCE_PROD": _check_reduce,
        "MUL": lambda o: _check_mul(o, enhanced_broadcast),
        "PACK": _always,
        "PAD": _check_pad,
        "PADV2": _check_pad,
        "MIRROR_PAD": _check_pad,
        "PRELU": _always,
        "RELU": _always,
        "RELU6": _always,
        "RELU_N1_TO_1": _always,
        "LEAKY_RELU": _always,
        "RESHAPE": lambda o: _expect_io(o, 1),
        "RESIZE_BILINEAR": _check_resize_bilinear,
        "RESIZE_NEAREST_NEIGHBOR": lambda o: _expect_io(o, 1),
        "SELECT": _always,
        "SELECT_V2": _always,
        "SLICE": _check_slice,
        "SOFTMAX": _check_softmax,
        "SPLIT": _always,
        "SPLIT_V": _always,
        "STRIDED_SLICE": _check_strided_slice,
        "TILE": lambda o: _expect_io(o, 1),
        "TRANSPOSE": lambda o: _expect_io(o, 1),
    }
    return rules.get(name)


def _tensor_problem(op):
    """model_builder.cc's tensor checks: rank <= 4, static shape, and runtime
    tensors of a type the delegate computes with."""
    for tensor in _present(op) + op.outputs:
        if tensor.rank > _MAX_RANK:
            return f"tensor {tensor.name!r} has rank {tensor.rank} (the GPU delegate handles rank <= 4)"
        if not tensor.constant:
            if any(d < 0 for d in tensor.signature):
                return f"tensor {tensor.name!r} has a dynamic shape {tensor.signature}"
            if tensor.dtype not in _FLOAT_TYPES + _QUANTIZED_TYPES:
                return f"tensor {tensor.name!r} is {tensor.dtype.lower()}; the GPU delegate takes float/int8 tensors"
    return None


def _gpu_problem(op, enhanced_broadcast):
    """None when the GPU delegate takes `op`, else the reason it does not."""
    if op.name == "DEQUANTIZE" and op.inputs and op.inputs[0] is not None and op.inputs[0].constant:
        return None  # weight decompression (float16 / int8 constants), folded into the consumer
    rule = _rule(op, enhanced_broadcast)
    if rule is None:
        return f"{op.name} is not supported by the GPU delegate"
    return _tensor_problem(op) or rule(op)


def _partitions(ops, supported, graph_inputs, tensors):
    """Splits the graph the way TFLite's partitioner does: alternately takes
    every not-yet-placed op of one kind (GPU or CPU) whose inputs are ready,
    in execution order, so independent ops join a partition even when they
    are not adjacent. Returns [(on_gpu, [op indices])]."""
    # Ready from the start: every tensor no op produces (graph inputs, weights, variables).
    produced = {t for op in ops for t in op.output_ids}
    ready = {i for i in range(len(tensors)) if i not in produced} | set(graph_inputs)
    remaining = list(range(len(ops)))
    kind = supported[0] if ops else True
    partitions = []
    while remaining:
        taken = []
        for index in remaining:
            op = ops[index]
            if supported[index] == kind and all(t in ready for t in op.input_ids):
                taken.append(index)
                ready.update(op.output_ids)
        if taken:
            partitions.append((kind, taken))
            placed = set(taken)
            remaining = [i for i in remaining if i not in placed]
        kind = not kind
    return partitions


def gpu_delegate_compatibility(flatbuffer, enhanced_broadcast=False):
    """Which ops of a TFLite model the Android GPU delegate would run.

    Args:
        flatbuffer: The .tflite model (bytes).
        enhanced_broadcast: Assume the delegate's enhanced-broadcast flag
            (off by default on the device; TFLite's offline checker assumes
            it on). Off: ADD/MUL broadcast between ranks only in the 4-D
            patterns the delegate implements.

    Returns:
        {ops: [{index, op, version, supported, reason}] in execution order,
        total_ops, weight_dequantize_ops (DEQUANTIZE of float16 weights,
        counted in total_ops), supported_ops, unsupported: [{index, op, reason}],
        unsupported_summary: {"OP: reason": count}, gpu_partitions,
        cpu_partitions, largest_gpu_partition (ops), fully_supported,
        int8 (the model holds int8/uint8 activations), notes}.
    """
    ops, graph_inputs, tensors = _read_graph(flatbuffer)
    entries = []
    supported = []
    for op in ops:
        problem = _gpu_problem(op, enhanced_broadcast)
        supported.append(problem is None)
        entries.append({"index": op.index, "op": op.name, "version": op.version, "supported": problem is None,
                        "reason": problem})
    unsupported = [{k: e[k] for k in ("index", "op", "reason")} for e in entries if not e["supported"]]
    summary = {}
    for entry in unsupported:
        key = f"{entry['op']}: {entry['reason']}"
        summary[key] = summary.get(key, 0) + 1
    partitions = _partitions(ops, supported, graph_inputs, tensors)
    gpu_partitions = [members for on_gpu, members in partitions if on_gpu]
    int8 = any(
        tensor.dtype in _QUANTIZED_TYPES and not tensor.constant for op in ops for tensor in _present(op) + op.outputs
    )
    notes = []
    if int8:
        notes.append(INT8_NOTE)
    if len(gpu_partitions) > 1:
        notes.append(PARTITION_NOTE)
    weight_dequantize = sum(
        1 for op in ops if op.name == "DEQUANTIZE" and op.inputs and op.inputs[0] is not None and op.inputs[0].constant
    )
    return {
        "ops": entries,
        "total_ops": len(ops),
        "weight_dequantize_ops": weight_dequantize,
        "supported_ops": int(sum(supported)),
        "unsupported": unsupported,
        "unsupported_summary": summary,
        "gpu_partitions": len(gpu_partitions),
        "cpu_partitions": len(partitions) - len(gpu_partitions),
        "largest_gpu_partition": max((len(members) for members in gpu_partitions), default=0),
        "fully_supported": len(ops) > 0 and all(supported),
        "enhanced_broadcast": bool(enhanced_broadcast),
        "int8": int8,
        "notes": notes,
    }


# ---------------------------------------------------------------- TensorFlow's Analyzer

_WARNING = "GPU COMPATIBILITY WARNING: "
_OP_LINE = re.compile(r"^\s*Op#(\d+) (\S+?)\(")
_COMPATIBLE_LINE = "looks compatible with GPU delegate"
# The delegate's source files the rules above follow (tensorflow/lite/...).
_OP_RULES = "tools/versioning/gpu_compatibility.cc"
_TENSOR_RULES = "delegates/gpu/common/model_builder.cc"


def parse_analyzer_output(text):
    """The GPU verdict in the text of `tf.lite.experimental.Analyzer.analyze`:
    {compatible (its closing "looks compatible" line), flagged: {op index:
    message}} for the main subgraph (Subgraph#0)."""
    flagged = {}
    current = None
    for line in text.splitlines():
        if line.startswith("Subgraph#") and not line.startswith("Subgraph#0"):
            current = None  # ops of other subgraphs (control flow bodies) are not the main graph's
            continue
        match = _OP_LINE.match(line)
        if match:
            current = int(match.group(1))
            continue
        stripped = line.strip()
        if stripped.startswith(_WARNING) and current is not None and not stripped[len(_WARNING):].startswith(
                "Subgraph#"):
            flagged[current] = stripped[len(_WARNING):]
    return {"compatible": _COMPATIBLE_LINE in text, "flagged": flagged}


def run_analyzer(flatbuffer):
    """TensorFlow's own check: the Analyzer with gpu_compatibility=True, which
    calls gpu_compatibility.cc's CheckGpuDelegateCompatibility per op. It
    prints its report from Python (the C++ side returns a string), so
    redirecting sys.stdout captures all of it."""
    import contextlib
    import io

    import tensorflow as tf

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_content=flatbuffer, gpu_compatibility=True)
    return parse_analyzer_output(text.getvalue())


@functools.lru_cache(maxsize=1)
def analyzer_checks_gpu():
    """Whether this TensorFlow's Analyzer really checks GPU compatibility:
    it must flag ARG_MAX, an op gpu_compatibility.cc has no case for (its
    default branch answers "Not supported op"). TF 2.21's wheel does not: its
    analyzer lacks the warning code and calls every model compatible."""
    import tensorflow as tf

    function = tf.function(lambda x: tf.argmax(x, axis=-1))
    concrete = function.get_concrete_function(tf.TensorSpec((1, 4), tf.float32))
    flatbuffer = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module()).convert()
    return bool(run_analyzer(flatbuffer)["flagged"])


def _camel(name):
    return "".join(part.capitalize() for part in name.split("_"))


def gpu_rule(op, reason):
    """Where in the delegate's source the verdict on `op` (name) with our
    `reason` (None: supported) is decided."""
    if reason and reason.startswith("tensor "):
        return f"{_TENSOR_RULES}: tensor checks (rank <= 4, static shape, float/int8 runtime tensors)"
    if op.startswith("CUSTOM:"):
        return f"{_OP_RULES}: case kTfLiteBuiltinCustom (CheckCustomOpsGpuDelegateCompatibility)"
    if reason and reason.endswith("is not supported by the GPU delegate"):
        return f"{_OP_RULES}: no case for {op}, default branch (\"Not supported op\")"
    if reason and reason.startswith("broadcasting"):
        return (f"{_OP_RULES}: CheckAddMulBroadcastCompatibility (the offline checker assumes the enhanced-"
                "broadcast flag, off by default on the device)")
    return f"{_OP_RULES}: case kTfLiteBuiltin{_camel(op)}"


def compare_with_analyzer(gpu_report, analyzer, analyzer_checks):
    """Our per-op verdict (`gpu_delegate_compatibility`) next to the
    Analyzer's (`run_analyzer`); `analyzer_checks` from `analyzer_checks_gpu`.

    Returns {analyzer_checks_gpu, analyzer_compatible, analyzer_flagged:
    [{index, op, message}], ours_unsupported, agree, disagreements: [{index,
    op, ours, analyzer, rule}], note}.
    """
    flagged = analyzer["flagged"]
    names = {entry["index"]: entry["op"] for entry in gpu_report["ops"]}
    disagreements = []
    for entry in gpu_report["ops"]:
        message = flagged.get(entry["index"])
        if entry["supported"] == (message is None):
            continue
        disagreements.append({
            "index": entry["index"], "op": entry["op"], "ours": entry["reason"] or "supported",
            "analyzer": message or "compatible", "rule": gpu_rule(entry["op"], entry["reason"]),
        })
    note = None
    if not analyzer_checks:
        note = ("This TensorFlow's Analyzer does not check GPU compatibility (it calls ARG_MAX, which "
                "gpu_compatibility.cc rejects, compatible): its verdict is no evidence either way.")
    return {
        "analyzer_checks_gpu": bool(analyzer_checks),
        "analyzer_compatible": analyzer["compatible"],
        "analyzer_flagged": [{"index": i, "op": names.get(i), "message": m} for i, m in sorted(flagged.items())],
        "ours_unsupported": len(gpu_report["unsupported"]),
        "agree": not disagreements,
        "disagreements": disagreements,
        "note": note,
    }


# ---------------------------------------------------------------- latency


def _cpu_interpreter(flatbuffer, threads):
    """LiteRT's interpreter with its default resolver (XNNPACK applied)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        interpreter, runtime = Interpreter(model_content=flatbuffer, num_threads=threads), "ai_edge_litert"
    except ImportError:  # TensorFlow's copy of the same runtime (deprecated, hence the warning filter)
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter, runtime = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads), "tf.lite"
    interpreter.allocate_tensors()
    return interpreter, runtime


def _random_input(detail, rng):
    dtype = np.dtype(detail["dtype"])
    shape = tuple(detail["shape"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return (rng.random(shape) * 255.0).astype(dtype)  # the models' raw-pixel range


def xnnpack_latency(flatbuffer, threads=2, warmup=5, repeats=30, seed=0):
    """Wall-clock time of one `invoke()` on the default CPU runtime.

    The model runs with its own batch size on random inputs of its input
    dtype (floats in [0, 255], integers over their full range).

    Returns:
        {runtime, threads, warmup, repeats, batch, median_ms, mean_ms,
        p10_ms, p90_ms, min_ms, max_ms}.
    """
    if threads < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need threads >= 1, warmup >= 0, repeats >= 1; got {threads}, {warmup}, {repeats}")
    interpreter, runtime = _cpu_interpreter(flatbuffer, threads)
    rng = np.random.default_rng(seed)
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], _random_input(detail, rng))
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(times)
    return {
        "runtime": runtime,
        "threads": int(threads),
        "warmup": int(warmup),
        "repeats": int(repeats),
        "batch": int(interpreter.get_input_details()[0]["shape"][0]),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "p10_ms": float(np.percentile(ordered, 10)),
        "p90_ms": float(np.percentile(ordered, 90)),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
    }


# ---------------------------------------------------------------- export


def _summarize_gpu(report):
    """The GPU report without the per-op list (kept small for the JSON)."""
    return {key: value for key, value in report.items() if key != "ops"}


def export_android(float_model, output_dir, name, representative_images, sample_images=None, qat_model=None,
                   int8_io_type="float32", threads=2, warmup=5, repeats=30, allow_cpu_fallback=False):
    """Writes the two Android models of `float_model` and their report.

    Files in `output_dir`:
        <name>.float16.tflite  float16 weights, float compute and I/O (the
                               GPU delegate's native format);
        <name>.int8.tflite     int8: `qat_model` converted with mode
                               qat_int8 when given, else `float_model` by
                               post-training quantization (ptq_int8);
        <name>.*.audit.json    each export's audit (quantization.tflite_export);
        <name>.android_report.json  this function's report.

    Args:
        float_model: The float Keras model (static input size).
        output_dir: Directory for the files (created when missing).
        name: File name stem, e.g. "mobilevitv2_050".
        representative_images: Float images (N, H, W, 3) in the model's
            input range: the ptq_int8 calibration set, and the converter's
            int8 check for qat_int8.
        sample_images: Images to compare each TFLite model with Keras on
            (the audits' agreement figures); optional.
        qat_model: A calibrated QAT model from `quantize_model(float_model)`.
        int8_io_type: Input/output type of the int8 model: "float32"
            (default: what the GPU delegate recommends, and the same app code
            for both models), "int8" or "uint8" (raw uint8 pixels for a QAT
            model, whose input scale is 1).
        threads, warmup, repeats: For `xnnpack_latency`.
        allow_cpu_fallback: Write the models even when the float16 model
            has ops the GPU delegate cannot run (by `gpu_delegate_compatibility`
            or TensorFlow's Analyzer); they then run on the CPU.

    Returns:
        The report: {name, output_dir, models: [{variant, mode, path,
        size_bytes, io_type, agreement, gpu, analyzer, xnnpack}], notes}.
        `analyzer` sets TensorFlow's own check
        (`tf.lite.experimental.Analyzer`, gpu_compatibility=True) beside
        ours: see `compare_with_analyzer`.

    Raises:
        GpuFallbackError (a ValueError): the float16 model has ops the GPU
            delegate cannot run and allow_cpu_fallback is False.
        ValueError: from the exports (bad images, a failed audit, a float
            model passed as qat_model...).
        Nothing is written in output_dir when it raises.
    """
    from quantization.tflite_export import export_tflite
    from quantization.tflite_export import is_qat

    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"name must be a plain file name stem; got {name!r}")
    if is_qat(float_model):
        raise ValueError("float_model is a QAT model; pass the float model, and the QAT model as qat_model.")
    if qat_model is not None and not is_qat(qat_model):
        raise ValueError("qat_model must come from quantization.quantize_model (and be calibrated).")
    variants = [("float16", "float16", float_model, "float32")]
    if qat_model is not None:
        variants.append(("int8", "qat_int8", qat_model, int8_io_type))
    else:
        variants.append(("int8", "ptq_int8", float_model, int8_io_type))

    report = {"name": name, "output_dir": os.path.abspath(output_dir), "models": [], "notes": [PARTITION_NOTE]}
    # Everything is written to a staging folder and moved into output_dir at
    # the end, so a refused or failed export leaves output_dir as it was.
    with tempfile.TemporaryDirectory(prefix=".android-", dir=_staging_parent(output_dir)) as staging:
        for variant, mode, model, io_type in variants:
            staged = os.path.join(staging, f"{name}.{variant}.tflite")
            audit = export_tflite(
                model, staged, mode, io_type=io_type, representative_images=representative_images,
                sample_images=sample_images, verbose=False,
            )
            entry = _model_entry(staged, os.path.join(output_dir, os.path.basename(staged)), variant, mode,
                                 io_type, audit, (threads, warmup, repeats))
            report["models"].append(entry)
            if variant == "float16" and not allow_cpu_fallback:
                _refuse_cpu_fallback(entry, report)
        with open(os.path.join(staging, f"{name}.android_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        _move_staged(staging, output_dir)
    return report


class GpuFallbackError(ValueError):
    """The float16 model has ops the GPU delegate would leave to the CPU;
    `report` is the Android report so far."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def _staging_parent(output_dir):
    """The folder above output_dir when it exists and is writable (the final
    move is then a rename on one file system), else the system's temporary
    folder."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    return parent if os.path.isdir(parent) and os.access(parent, os.W_OK) else None


def _move_staged(staging, output_dir):
    """Moves every staged file into output_dir, fixing the model path the
    audits recorded (they were written in the staging folder)."""
    os.makedirs(output_dir, exist_ok=True)
    for file_name in sorted(os.listdir(staging)):
        source = os.path.join(staging, file_name)
        if file_name.endswith(".audit.json"):
            with open(source) as f:
                audit = json.load(f)
            audit["path"] = os.path.abspath(os.path.join(output_dir, file_name[: -len(".audit.json")] + ".tflite"))
            with open(source, "w") as f:
                json.dump(audit, f, indent=2)
        shutil.move(source, os.path.join(output_dir, file_name))


def _model_entry(staged, path, variant, mode, io_type, audit, timing):
    """One model's part of the report: our GPU verdict, TensorFlow's
    Analyzer next to it, and XNNPACK latency."""
    with open(staged, "rb") as f:
        flatbuffer = f.read()
    gpu = gpu_delegate_compatibility(flatbuffer)
    threads, warmup, repeats = timing
    return {
        "variant": variant,
        "mode": mode,
        "path": os.path.abspath(path),
        "size_bytes": len(flatbuffer),
        "io_type": io_type,
        "agreement": audit.get("agreement"),
        "gpu": _summarize_gpu(gpu),
        "analyzer": compare_with_analyzer(gpu, run_analyzer(flatbuffer), analyzer_checks_gpu()),
        "xnnpack": xnnpack_latency(flatbuffer, threads=threads, warmup=warmup, repeats=repeats),
    }


def _refuse_cpu_fallback(entry, report):
    """GpuFallbackError when our rules or the Analyzer find an op of the
    float16 model the GPU delegate cannot run: that model exists for the GPU,
    and a silent CPU fallback would cost the latency it is meant to save."""
    ours = entry["gpu"]["unsupported"]
    theirs = entry["analyzer"]["analyzer_flagged"]
    if not ours and not theirs:
        return
    found = [f"op #{op['index']} {op['op']}: {op['reason']}" for op in ours[:5]]
    found += [f"op #{op['index']} {op['op']}: {op['message']} (TensorFlow's Analyzer)" for op in theirs[:5]]
    raise GpuFallbackError(
        f"The float16 Android model has {max(len(ours), len(theirs))} op(s) the GPU delegate cannot run, so "
        f"they would fall back to the CPU: {'; '.join(found)}. Nothing was written. Change the model, or pass "
        "allow_cpu_fallback=True (--allow_cpu_fallback) to export it anyway.",
        report,
    )


def format_android_report(report):
    """A markdown table of `export_android`'s report, then its notes."""
    lines = [
        "| model | mode | I/O | size (MB) | GPU ops supported/total | GPU partitions | whole graph on GPU "
        "| XNNPACK median ms (p10-p90) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    threads = None
    for model in report["models"]:
        gpu, cpu = model["gpu"], model["xnnpack"]
        threads = cpu["threads"]
        lines.append(
            f"| {os.path.basename(model['path'])} | {model['mode']} | {model['io_type']} "
            f"| {model['size_bytes'] / 1e6:.2f} | {gpu['supported_ops']}/{gpu['total_ops']} "
            f"| {gpu['gpu_partitions']} | {'yes' if gpu['fully_supported'] else 'no'} "
            f"| {cpu['median_ms']:.2f} ({cpu['p10_ms']:.2f}-{cpu['p90_ms']:.2f}) |"
        )
    lines.append("")
    lines.append(f"XNNPACK: {threads} threads on this machine (relative figures, not a phone measurement).")
    for model in report["models"]:
        for reason, count in model["gpu"]["unsupported_summary"].items():
            lines.append(f"- {os.path.basename(model['path'])}: {count} x {reason}")
    for model in report["models"]:
        if "analyzer" in model:
            lines.extend(_analyzer_lines(os.path.basename(model["path"]), model["analyzer"]))
    notes = list(report.get("notes", []))
    for model in report["models"]:
        for note in model["gpu"]["notes"]:
            if note not in notes:
                notes.append(note)
    lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines)


def _analyzer_lines(file_name, comparison):
    """The Analyzer's verdict next to ours, one line, then each disagreement."""
    if comparison["analyzer_flagged"]:
        verdict = f"flags {len(comparison['analyzer_flagged'])} op(s)"
    else:
        verdict = "compatible" if comparison["analyzer_compatible"] else "no verdict"
    agreement = "agree" if comparison["agree"] else f"{len(comparison['disagreements'])} disagreement(s)"
    line = (f"- {file_name}: TensorFlow's Analyzer: {verdict}; ours: {comparison['ours_unsupported']} "
            f"unsupported op(s); {agreement}")
    if comparison["note"]:
        line += f". {comparison['note']}"
    lines = [line]
    for op in comparison["disagreements"]:
        lines.append(f"  - op #{op['index']} {op['op']}: ours: {op['ours']}; Analyzer: {op['analyzer']}; "
                     f"decided by {op['rule']}")
    return lines
