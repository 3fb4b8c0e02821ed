"""The Android GPU delegate's rules, applied to a TFLite flatbuffer.

`gpu_delegate_compatibility` reads the flatbuffer (`quantization.tflite_graph`) and
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
"""

import dataclasses
import functools
import re

from tensorflow.lite.python import schema_py_generated as schema

from quantization.tflite_graph import DETECTION_POSTPROCESS
from quantization.tflite_graph import read_graph

_FLOAT_TYPES = ("FLOAT32", "FLOAT16")
# With TFLITE_GPU_EXPERIMENTAL_FLAGS_ENABLE_QUANT (on by default) the delegate
# also takes int8/uint8 tensors: it dequantizes them and computes in float.
_QUANTIZED_TYPES = ("INT8", "UINT8")
_MAX_RANK = 4

_UNARY_ELEMENTWISE = (
    "ABS",
    "CEIL",
    "COS",
    "ELU",
    "EXP",
    "FLOOR",
    "GELU",
    "LOG",
    "LOGISTIC",
    "NEG",
    "RSQRT",
    "SIGN",
    "SIN",
    "SQRT",
    "SQUARE",
    "TANH",
)
_BINARY_ELEMENTWISE = (
    "ATAN2",
    "DIV",
    "EQUAL",
    "FLOOR_DIV",
    "FLOOR_MOD",
    "GREATER",
    "GREATER_EQUAL",
    "LOGICAL_AND",
    "LESS",
    "LESS_EQUAL",
    "MAXIMUM",
    "MINIMUM",
    "NOT_EQUAL",
    "POW",
    "SQUARED_DIFFERENCE",
    "SUB",
)
_CUSTOM_OPS = ("Convolution2DTransposeBias", "MaxPoolingWithArgmax2D", "MaxUnpooling2D", "Resampler")

INT8_NOTE = (
    "int8 model: the GPU delegate runs it as a float view (weights dequantized, quantization "
    "simulated in float); int8 inputs/outputs are (de)quantized on the CPU, so float I/O is "
    "recommended for the GPU."
)
POSTPROCESS_NOTE = (
    "TFLite_Detection_PostProcess (box decoding and NMS) has no GPU kernel: it runs on the CPU after "
    "the GPU partition, a single GPU-to-CPU hand-over at the end of the graph."
)
PARTITION_NOTE = (
    "The GPU delegate's default max_delegated_partitions is 1: with several GPU partitions only the "
    "largest runs on the GPU and the rest on the CPU."
)


# ---------------------------------------------------------------- the graph as the rules see it


@dataclasses.dataclass(frozen=True, eq=False)
class _Node:
    """One operator with its tensors resolved, and the indices of the tensors
    the delegate treats as constant (see `_nodes`)."""

    operator: object  # a tflite_graph.Operator
    inputs: tuple  # Tensor records, None for an omitted optional input
    outputs: tuple
    constants: frozenset

    @property
    def name(self):
        return self.operator.name

    @property
    def options(self):
        return self.operator.options

    def is_constant(self, tensor):
        return tensor.index in self.constants


def _nodes(graph):
    """The graph's operators as `_Node`s, in execution order.

    A tensor is constant when the file holds its data. The output of a
    DEQUANTIZE of a constant float16 tensor counts as constant too: float16
    models store weights that way, and the delegate's FP16 partition helper
    folds those DEQUANTIZE ops into their consumers.
    """
    constants = {tensor.index for tensor in graph.tensors if tensor.is_constant}
    for op in graph.operators:
        source = graph.tensor(op.inputs[0]) if op.inputs else None
        if op.name == "DEQUANTIZE" and source is not None and source.index in constants and source.dtype == "FLOAT16":
            constants.update(op.outputs)
    constants = frozenset(constants)
    return [_Node(op, graph.input_tensors(op), graph.output_tensors(op), constants) for op in graph.operators]


# ---------------------------------------------------------------- GPU rules


def _present(op):
    return tuple(tensor for tensor in op.inputs if tensor is not None)


def _runtime_inputs(op):
    return [tensor for tensor in _present(op) if not op.is_constant(tensor)]


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
    if op.options.get("fused_activation_function") == schema.ActivationFunctionType.SIGN_BIT:
        return "fused activation SIGN_BIT is not supported"
    return None


def _axes_const_int32(op, index=1):
    if len(op.inputs) <= index or op.inputs[index] is None:
        return "has no axes input"
    axes = op.inputs[index]
    if not op.is_constant(axes):
        return "axes must be a constant tensor"
    if axes.dtype != "INT32":
        return f"axes must be int32, not {axes.dtype.lower()}"
    return None


def _broadcast(first, second, enhanced):
    """ADD/MUL broadcasting between different ranks (both > 1)."""
    a, b = list(first.shape), list(second.shape)
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
    if min(o.get(field, 1) for field in ("stride_h", "stride_w", "dilation_h_factor", "dilation_w_factor")) <= 0:
        return "strides and dilations must be positive"
    return _fused_activation(op)


def _check_depthwise(op):
    problem = _check_conv(op)
    if problem:
        return problem
    source, kernel, output = op.inputs[0], op.inputs[1], op.outputs[0]
    if source.rank != 4 or kernel.rank != 4 or output.rank != 4:
        return "input, filter and output must be 4-D"
    multiplier = op.options.get("depth_multiplier", 1)
    if output.shape[3] != source.shape[3] * multiplier:
        return "output channels != input channels x depth_multiplier"
    if multiplier != 1 and source.shape[3] != 1:
        return "depth_multiplier != 1 needs a single input channel"
    return None


def _check_pool(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    if min(op.options.get(field, 1) for field in ("filter_height", "filter_width", "stride_h", "stride_w")) <= 0:
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
            return f"MUL of {list(first.shape)} and {list(second.shape)}: neither input covers the other"
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
    beta = op.options.get("beta", 1.0)
    if beta != 1.0:
        return f"SOFTMAX beta must be 1 (is {beta:g})"
    return None


def _check_strided_slice(op):
    for label in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask"):
        if op.options.get(label):
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
    default = schema.FullyConnectedOptionsWeightsFormat.DEFAULT
    if o.get("weights_format", default) != default:
        return "only the default weights format is supported"
    if len(_runtime_inputs(op)) > 2:
        return "more than 2 runtime inputs"
    if op.is_constant(op.inputs[0]):
        return "constant input is not supported"
    if o.get("keep_num_dims") and op.inputs[0].rank != op.outputs[0].rank:
        return "keep_num_dims with different input and output ranks"
    return None


def _check_pad(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    if op.name == "MIRROR_PAD" and op.options.get("mode", schema.MirrorPadMode.REFLECT) != schema.MirrorPadMode.REFLECT:
        return "only REFLECT mirror padding is supported"
    paddings = op.inputs[1]
    if paddings.rank != 2 or paddings.shape[0] not in (3, 4) or paddings.shape[1] != 2:
        return f"paddings must be 3x2 or 4x2 (is {list(paddings.shape)})"
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
    if op.options.get("align_corners") and op.options.get("half_pixel_centers"):
        return "align_corners together with half_pixel_centers"
    return None


def _check_block_size(op):
    problem = _expect_io(op, 1)
    if problem:
        return problem
    if "block_size" in op.options and op.options["block_size"] <= 1:
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
        return _always if name[len("CUSTOM:") :] in _CUSTOM_OPS else None
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
        if not op.is_constant(tensor):
            if any(d < 0 for d in tensor.shape_signature):
                return f"tensor {tensor.name!r} has a dynamic shape {list(tensor.shape_signature)}"
            if tensor.dtype not in _FLOAT_TYPES + _QUANTIZED_TYPES:
                return f"tensor {tensor.name!r} is {tensor.dtype.lower()}; the GPU delegate takes float/int8 tensors"
    return None


def _weight_dequantize(op):
    """A DEQUANTIZE of a constant: weights stored as float16 or int8."""
    return op.name == "DEQUANTIZE" and bool(op.inputs) and op.inputs[0] is not None and op.is_constant(op.inputs[0])


def _gpu_problem(op, enhanced_broadcast):
    """None when the GPU delegate takes `op`, else the reason it does not."""
    if _weight_dequantize(op):
        return None  # weight decompression (float16 / int8 constants), folded into the consumer
    rule = _rule(op, enhanced_broadcast)
    if rule is None:
        return f"{op.name} is not supported by the GPU delegate"
    return _tensor_problem(op) or rule(op)


def _partitions(graph, supported):
    """Splits the graph the way TFLite's partitioner does: alternately takes
    every not-yet-placed op of one kind (GPU or CPU) whose inputs are ready,
    in execution order, so independent ops join a partition even when they
    are not adjacent. Returns [(on_gpu, [op indices])]."""
    ops = graph.operators
    # Ready from the start: every tensor no op produces (graph inputs, weights, variables).
    produced = {t for op in ops for t in op.outputs}
    ready = {i for i in range(len(graph.tensors)) if i not in produced} | set(graph.inputs)
    remaining = list(range(len(ops)))
    kind = supported[0] if ops else True
    partitions = []
    while remaining:
        taken = []
        for index in remaining:
            op = ops[index]
            if supported[index] == kind and all(t in ready for t in op.present_inputs):
                taken.append(index)
                ready.update(op.outputs)
        if taken:
            partitions.append((kind, taken))
            placed = set(taken)
            remaining = [i for i in remaining if i not in placed]
        kind = not kind
    return partitions


def _postprocess_placement(graph, partitions):
    """Where a detector's TFLite_Detection_PostProcess runs: the GPU
    delegate has no kernel for it, so it is on the CPU; `cpu_tail` says
    whether it and the CPU ops around it form one partition after a single
    GPU partition (one GPU-to-CPU boundary, at the end)."""
    ops = [op for op in graph.operators if op.name == DETECTION_POSTPROCESS]
    if len(ops) != 1:
        return None
    on_gpu = next(gpu for gpu, members in partitions if ops[0].index in members)
    kinds = [gpu for gpu, _ in partitions]
    return {"index": ops[0].index, "on_gpu": on_gpu, "cpu_tail": kinds == [True, False] and not on_gpu}


def _summary(entries):
    """(unsupported: [{index, op, reason}], {"OP: reason": count})."""
    unsupported = [{k: e[k] for k in ("index", "op", "reason")} for e in entries if not e["supported"]]
    summary = {}
    for entry in unsupported:
        key = f"{entry['op']}: {entry['reason']}"
        summary[key] = summary.get(key, 0) + 1
    return unsupported, summary


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
        cpu_partitions, largest_gpu_partition (ops), partitions: [{on_gpu,
        ops, first, last}] in execution order, detection_postprocess (None,
        or for a detector ending in TFLite_Detection_PostProcess: {index,
        on_gpu, cpu_tail: the CPU runs exactly the ops after the one GPU
        partition, the op among them, so the graph crosses from GPU to CPU
        once}), fully_supported, int8 (the model holds int8/uint8
        activations), notes}.
    """
    graph = read_graph(flatbuffer)
    nodes = _nodes(graph)
    problems = [_gpu_problem(node, enhanced_broadcast) for node in nodes]
    supported = [problem is None for problem in problems]
    entries = [
        {
            "index": node.operator.index,
            "op": node.name,
            "version": node.operator.version,
            "supported": problem is None,
            "reason": problem,
        }
        for node, problem in zip(nodes, problems)
    ]
    unsupported, summary = _summary(entries)
    partitions = _partitions(graph, supported)
    gpu_partitions = [members for on_gpu, members in partitions if on_gpu]
    postprocess = _postprocess_placement(graph, partitions)
    int8 = any(
        tensor.dtype in _QUANTIZED_TYPES and not node.is_constant(tensor)
        for node in nodes
        for tensor in _present(node) + node.outputs
    )
    notes = ([INT8_NOTE] if int8 else []) + ([PARTITION_NOTE] if len(gpu_partitions) > 1 else [])
    if postprocess is not None and postprocess["cpu_tail"]:
        notes.append(POSTPROCESS_NOTE)
    return {
        "ops": entries,
        "total_ops": len(nodes),
        "weight_dequantize_ops": sum(1 for node in nodes if _weight_dequantize(node)),
        "supported_ops": int(sum(supported)),
        "unsupported": unsupported,
        "unsupported_summary": summary,
        "gpu_partitions": len(gpu_partitions),
        "cpu_partitions": len(partitions) - len(gpu_partitions),
        "largest_gpu_partition": max((len(members) for members in gpu_partitions), default=0),
        "partitions": [
            {"on_gpu": on_gpu, "ops": len(members), "first": min(members), "last": max(members)}
            for on_gpu, members in partitions
        ],
        "detection_postprocess": postprocess,
        "fully_supported": len(nodes) > 0 and all(supported),
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
        if (
            stripped.startswith(_WARNING)
            and current is not None
            and not stripped[len(_WARNING) :].startswith("Subgraph#")
        ):
            flagged[current] = stripped[len(_WARNING) :]
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
        return f'{_OP_RULES}: no case for {op}, default branch ("Not supported op")'
    if reason and reason.startswith("broadcasting"):
        return (
            f"{_OP_RULES}: CheckAddMulBroadcastCompatibility (the offline checker assumes the enhanced-"
            "broadcast flag, off by default on the device)"
        )
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
        disagreements.append(
            {
                "index": entry["index"],
                "op": entry["op"],
                "ours": entry["reason"] or "supported",
                "analyzer": message or "compatible",
                "rule": gpu_rule(entry["op"], entry["reason"]),
            }
        )
    note = None
    if not analyzer_checks:
        note = (
            "This TensorFlow's Analyzer does not check GPU compatibility (it calls ARG_MAX, which "
            "gpu_compatibility.cc rejects, compatible): its verdict is no evidence either way."
        )
    return {
        "analyzer_checks_gpu": bool(analyzer_checks),
        "analyzer_compatible": analyzer["compatible"],
        "analyzer_flagged": [{"index": i, "op": names.get(i), "message": m} for i, m in sorted(flagged.items())],
        "ours_unsupported": len(gpu_report["unsupported"]),
        "agree": not disagreements,
        "disagreements": disagreements,
        "note": note,
    }
