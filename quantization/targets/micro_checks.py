"""TFLite Micro compatibility: what TFLM's `MicroMutableOpResolver` and its
int8 kernels accept, checked op by op on a flatbuffer
(`check_micro_compatibility`)."""

from quantization.targets.detections import detection_postprocess
from quantization.tflite_graph import FLOAT_TYPES
from quantization.tflite_graph import read_graph

# Builtin op (schema name) -> the `tflite::MicroMutableOpResolver` method that
# registers its kernel. Mirrors every builtin `Add*()` of
# tensorflow/lite/micro/micro_mutable_op_resolver.h (tflite-micro 90b983c).
# A builtin without an entry (GELU, TILE, CONV_3D, ...) has no TFLM kernel.
MICRO_RESOLVER_METHODS = {
    "ABS": "AddAbs",
    "ADD": "AddAdd",
    "ADD_N": "AddAddN",
    "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast",
    "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "COS": "AddCos",
    "CUMSUM": "AddCumSum",
    "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice",
    "ELU": "AddElu",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "EQUAL": "AddEqual",
    "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill",
    "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax",
    "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MIRROR_PAD": "AddMirrorPad",
    "MEAN": "AddMean",
    "MINIMUM": "AddMinimum",
    "MUL": "AddMul",
    "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack",
    "PAD": "AddPad",
    "PADV2": "AddPadV2",
    "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable",
    "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax",
    "REDUCE_MIN": "AddReduceMin",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound",
    "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2",
    "SHAPE": "AddShape",
    "SIN": "AddSin",
    "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV",
    "SQUEEZE": "AddSqueeze",
    "SQRT": "AddSqrt",
    "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub",
    "SUM": "AddSum",
    "SVDF": "AddSvdf",
    "TANH": "AddTanh",
    "TRANSPOSE_CONV": "AddTransposeConv",
    "TRANSPOSE": "AddTranspose",
    "UNPACK": "AddUnpack",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile",
    "ZEROS_LIKE": "AddZerosLike",
}

# Custom ops that the resolver registers by name, keyed as
# `quantization.tflite_graph` names them ("CUSTOM:<custom code>").
MICRO_CUSTOM_RESOLVER_METHODS = {
    "CUSTOM:CIRCULAR_BUFFER": "AddCircularBuffer",
    "CUSTOM:TFLite_Detection_PostProcess": "AddDetectionPostprocess",
    "CUSTOM:TFLM_DECODE": "AddDecode",
    "CUSTOM:ethos-u": "AddEthosU",
    "CUSTOM:SignalDelay": "AddDelay",
    "CUSTOM:SignalEnergy": "AddEnergy",
    "CUSTOM:SignalFftAutoScale": "AddFftAutoScale",
    "CUSTOM:SignalFilterBank": "AddFilterBank",
    "CUSTOM:SignalFilterBankLog": "AddFilterBankLog",
    "CUSTOM:SignalFilterBankSpectralSubtraction": "AddFilterBankSpectralSubtraction",
    "CUSTOM:SignalFilterBankSquareRoot": "AddFilterBankSquareRoot",
    "CUSTOM:SignalFramer": "AddFramer",
    "CUSTOM:SignalIrfft": "AddIrfft",
    "CUSTOM:SignalOverlapAdd": "AddOverlapAdd",
    "CUSTOM:SignalPCAN": "AddPCAN",
    "CUSTOM:SignalRfft": "AddRfft",
    "CUSTOM:SignalStacker": "AddStacker",
    "CUSTOM:SignalWindow": "AddWindow",
}

# Activation dtypes (of the op's first input) that each TFLM kernel accepts,
# for the ops MobileViTv2-like models use (kernel sources, tflite-micro
# 90b983c). Ops not listed are not dtype-checked here. NEG and SQUARE are
# float only: an int8 model that still contains them was left with float
# islands by the converter.
MICRO_KERNEL_DTYPES = {
    "CONV_2D": ("FLOAT32", "INT8", "INT16"),
    "DEPTHWISE_CONV_2D": ("FLOAT32", "INT8", "INT16"),
    "FULLY_CONNECTED": ("FLOAT32", "INT8", "INT16"),
    "ADD": ("FLOAT32", "INT8", "INT16", "INT32"),
    "SUB": ("FLOAT32", "INT8", "INT16", "INT32"),
    "MUL": ("FLOAT32", "INT8", "INT16", "INT32"),
    "MEAN": ("FLOAT32", "INT8", "INT16"),
    "SUM": ("FLOAT32", "INT8", "INT16"),
    "SOFTMAX": ("FLOAT32", "INT8", "INT16"),
    "LOGISTIC": ("FLOAT32", "INT8", "INT16"),
    "HARD_SWISH": ("FLOAT32", "INT8"),
    "TRANSPOSE": ("FLOAT32", "INT8", "INT16"),
    "BATCH_MATMUL": ("FLOAT32", "INT8", "INT16"),
    "RSQRT": ("FLOAT32", "INT8"),
    "SQUARED_DIFFERENCE": ("FLOAT32", "INT32", "INT8", "INT16"),
    "PAD": ("FLOAT32", "INT8", "INT16", "INT32"),
    "AVERAGE_POOL_2D": ("FLOAT32", "INT8", "INT16"),
    "QUANTIZE": ("FLOAT32", "INT8", "INT16", "UINT8"),
    "DEQUANTIZE": ("INT8", "INT16", "UINT8"),
    "RELU": ("FLOAT32", "INT8", "INT16"),
    "RELU6": ("FLOAT32", "INT8", "INT16"),
    "SPACE_TO_DEPTH": ("FLOAT32", "INT8"),
    "DEPTH_TO_SPACE": ("FLOAT32", "INT8"),
    "STRIDED_SLICE": ("FLOAT32", "INT8", "INT16", "INT32", "BOOL"),
    "NEG": ("FLOAT32",),
    "SQUARE": ("FLOAT32",),
}

# Largest tensor rank a kernel takes (TRANSPOSE: "only supports 1D-5D input
# arrays"; BATCH_MATMUL: rank 2-5). Rank > 5 is refused for every op.
MICRO_MAX_RANK = {"TRANSPOSE": 5, "BATCH_MATMUL": 5}
MAX_TENSOR_RANK = 5

# Why a missing op is missing, and what to do instead.
_UNSUPPORTED_HINTS = {
    "GELU": "TFLM has no GELU kernel; use SiLU (LOGISTIC + MUL), HARD_SWISH or ReLU",
    "TILE": "TFLM has no TILE kernel; rely on ADD/MUL broadcasting instead",
}

# TFLM's int8 SOFTMAX turns beta * input_scale * 2^26 into a fixed-point
# multiplier and `TFLITE_CHECK`s that it is > 1 (QuantizeMultiplierGreaterThanOne,
# kScaledDiffIntegerBits = 5): below that the process aborts at allocation.
_SOFTMAX_MIN_SCALED_INPUT = 2.0**-26


def resolver_method(op_name):
    """The `MicroMutableOpResolver` method registering `op_name`, or None."""
    return MICRO_RESOLVER_METHODS.get(op_name) or MICRO_CUSTOM_RESOLVER_METHODS.get(op_name)


def _io_entry(tensor):
    """An input/output as the report shows it; scale and zero point only for
    per-tensor quantization (all the firmware constants can express)."""
    entry = {"name": tensor.name, "dtype": tensor.dtype, "shape": list(tensor.shape)}
    quantization = tensor.quantization
    if quantization is not None and len(quantization.scale) == 1:
        entry["scale"] = float(quantization.scale[0])
        entry["zero_point"] = int(quantization.zero_point[0])
    return entry


def _examples(names, limit=2, width=60):
    """'a', 'b' and 5 more: converter tensor names can be hundreds of characters."""
    shown = ", ".join(repr(n if len(n) <= width else n[: width - 3] + "...") for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _op_support(graph):
    """(ops_to_register, unsupported op names, {op: node count})."""
    nodes_per_op, versions_per_op = {}, {}
    for op in graph.operators:
        nodes_per_op[op.name] = nodes_per_op.get(op.name, 0) + 1
        versions_per_op.setdefault(op.name, set()).add(op.version)
    ops_to_register, unsupported = [], []
    for name in sorted(nodes_per_op):
        method = resolver_method(name)
        if method is None:
            unsupported.append(name)
        else:
            ops_to_register.append(
                {"op": name, "method": method, "nodes": nodes_per_op[name], "versions": sorted(versions_per_op[name])}
            )
    return ops_to_register, unsupported, nodes_per_op


def _tensor_findings(graph, postprocess):
    """(tensors above rank 5, tensors of rank 5, float tensors inside). The
    detection post-processing op that ends a detector (`postprocess`) reads
    and writes float32 by definition: its tensors are not "inside"."""
    boundary = set(graph.inputs) | set(graph.outputs)
    if postprocess is not None:
        boundary |= set(postprocess.present_inputs) | set(postprocess.outputs)
    above_rank_5 = [{"name": t.name, "shape": list(t.shape)} for t in graph.tensors if t.rank > MAX_TENSOR_RANK]
    rank_5 = [{"name": t.name, "shape": list(t.shape)} for t in graph.tensors if t.rank == MAX_TENSOR_RANK]
    float_inside = [t.name for t in graph.tensors if t.index not in boundary and t.dtype in FLOAT_TYPES]
    return above_rank_5, rank_5, float_inside


def _kernel_problems(graph):
    """Op/dtype/rank/quantization combinations a TFLM kernel refuses or aborts on."""
    problems = []
    for op in graph.operators:
        activations = [graph.tensors[i] for i in op.present_inputs]
        if not activations:
            continue
        first = activations[0]
        allowed = MICRO_KERNEL_DTYPES.get(op.name)
        if allowed is not None and first.dtype not in allowed:
            problems.append(
                f"{op.name} reads {first.dtype} tensor {first.name!r}, but TFLM's {op.name} kernel takes only "
                f"{'/'.join(allowed)}"
            )
        rank = max(t.rank for t in activations + list(graph.output_tensors(op)))
        if op.name in MICRO_MAX_RANK and rank > MICRO_MAX_RANK[op.name]:
            problems.append(
                f"{op.name} on tensor {first.name!r} has rank {rank}; TFLM's {op.name} kernel takes at most "
                f"{MICRO_MAX_RANK[op.name]}-D"
            )
        if op.name == "SOFTMAX" and first.dtype == "INT8":
            problems.extend(_softmax_problems(graph, op))
    # The same problem repeated on every attention block says nothing new.
    return list(dict.fromkeys(problems))


def _softmax_problems(graph, op):
    """Quantization parameters TFLM's int8 SOFTMAX refuses (or aborts on)."""
    problems = []
    source, result = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    beta = op.option("beta", 1.0)
    # Python floats: float32 arithmetic would round beta * scale before the comparison.
    scale = float(source.quantization.scale[0]) if source.quantization is not None else None
    if scale is not None and beta * scale <= _SOFTMAX_MIN_SCALED_INPUT:
        problems.append(
            f"SOFTMAX input {source.name!r} has scale {scale:.3g} (beta {beta:g}); TFLM's "
            f"int8 softmax needs beta * scale > 2^-26 (about 1.5e-8) and aborts the process otherwise: the "
            "logits' range is degenerate (an untrained or badly calibrated model)"
        )
    if result.dtype == "INT8" and result.quantization is not None:
        scale, zero_point = float(result.quantization.scale[0]), int(result.quantization.zero_point[0])
        if zero_point != -128 or abs(scale - 1 / 256) > 0.001 / 256:
            problems.append(
                f"SOFTMAX output {result.name!r} is quantized with scale {scale:.6g}, "
                f"zero point {zero_point}; TFLM's int8 softmax needs exactly 1/256 and -128"
            )
    return problems


def _postprocess_problems(graph, op):
    """What TFLM's DetectionPostprocess kernel refuses: inputs other than
    float32 (its Eval returns an error for any other type), a batch other
    than 1, and ranks other than 3-D box encodings and class scores and 2-D
    anchors (checked in Prepare). The float inputs must come from a
    DEQUANTIZE: anything else computed them in float."""
    problems = []
    producers = {index: producer for producer in graph.operators for index in producer.outputs}
    roles = ("box encodings", "class scores", "anchors")
    for role, index, rank in zip(roles, op.inputs, (3, 3, 2)):
        tensor = graph.tensors[index]
        where = f"TFLite_Detection_PostProcess's {role} {tensor.name!r}"
        if tensor.dtype != "FLOAT32":
            problems.append(f"{where} is {tensor.dtype}; TFLM's DetectionPostprocess kernel takes float32 only")
        if tensor.rank != rank:
            problems.append(f"{where} has shape {list(tensor.shape)}; TFLM's kernel needs {rank}-D")
        elif rank == 3 and tensor.shape[0] != 1:
            problems.append(f"{where} has batch {tensor.shape[0]}; TFLM's kernel runs batch 1 only")
        producer = producers.get(index)
        if role != "anchors" and producer is not None and producer.name != "DEQUANTIZE":
            problems.append(
                f"{where} is computed in float by {producer.name} (op #{producer.index}); the model must be "
                "int8 up to a DEQUANTIZE in front of the post-processing"
            )
    return problems


def _io_problems(inputs, outputs, postprocess):
    problems = []
    # A detector's outputs are the post-processing op's float32 detections.
    checked_outputs = [] if postprocess is not None else outputs
    for role, described in (("input", inputs), ("output", checked_outputs)):
        for tensor in described:
            if tensor["dtype"] != "INT8":
                problems.append(
                    f"{role} {tensor['name']!r} is {tensor['dtype']}; the micro target needs an INT8 {role} "
                    "(export with io_type='int8')"
                )
    return problems


def _problems(postprocess, unsupported, nodes_per_op, inputs, outputs, above_rank_5, float_inside):
    """Every reason the model is not an int8 micro target, one sentence each."""
    problems = []
    for name in unsupported:
        hint = _UNSUPPORTED_HINTS.get(name, "TFLM's MicroMutableOpResolver has no kernel for it")
        problems.append(f"op {name} ({nodes_per_op[name]} node(s)) cannot run on TFLite Micro: {hint}")
    problems.extend(_io_problems(inputs, outputs, postprocess))
    if above_rank_5:
        problems.append(
            f"{len(above_rank_5)} tensor(s) have rank > {MAX_TENSOR_RANK}, which TFLM does not support "
            f"(e.g. {above_rank_5[0]['name']!r} of shape {above_rank_5[0]['shape']})"
        )
    if float_inside:
        problems.append(
            f"{len(float_inside)} float tensor(s) inside the model ({_examples(float_inside)}): the micro target "
            "must be int8 throughout" + (" up to the detection post-processing" if postprocess is not None else "")
        )
    return problems


def _notes(graph, rank_5, postprocess):
    notes = []
    if postprocess is not None:
        notes.append(
            "a detector: int8 up to TFLite_Detection_PostProcess, whose float32 decoding and NMS TFLM runs "
            "with its DetectionPostprocess kernel (register it with AddDetectionPostprocess); its outputs, boxes, "
            "classes, scores and count, are float32"
        )
    if rank_5:
        notes.append(
            f"{len(rank_5)} tensor(s) are 5-D (e.g. {rank_5[0]['name']!r}); several TFLM kernels take at most 4-D"
        )
    if graph.subgraph_count > 1:
        notes.append(f"the model has {graph.subgraph_count} subgraphs; only the main one was checked")
    return notes


def check_micro_compatibility(flatbuffer):
    """What TFLite Micro needs for this flatbuffer, and what it cannot do.

    Static: nothing is run. Returns a dict with
        ops_to_register: [{op, method, nodes, versions}] sorted by op name, for
            every op TFLM has a kernel for (the resolver registrations);
        resolver_methods: the `MicroMutableOpResolver` methods, same order;
        num_resolver_ops: how many distinct ops (the resolver's template size);
        operator_count: how many operators (graph nodes) the model has;
        unsupported_ops: ops with no TFLM kernel;
        tensors_above_rank_5: [{name, shape}] (refused by TFLM);
        tensors_of_rank_5: [{name, shape}] (only some kernels take 5-D; a note);
        float_tensors_inside: float tensors that are neither input nor output
            (nor, in a detector, the post-processing op's own);
        inputs / outputs: [{name, dtype, shape, scale, zero_point}];
        kernel_problems: op/dtype/rank/quantization combinations a TFLM
            kernel refuses or aborts on;
        detector: whether the model ends in TFLite_Detection_PostProcess
            (then its float32 outputs, and the float inputs it decodes, are
            expected; everything before it must still be int8);
        problems: every reason the model is not an int8 micro target, one
            sentence each; compatible: `problems == []`;
        notes: things to know that do not block.
    Raises ValueError when `flatbuffer` is not a TFLite model.
    """
    graph = read_graph(flatbuffer)
    postprocess = detection_postprocess(graph)
    ops_to_register, unsupported, nodes_per_op = _op_support(graph)
    above_rank_5, rank_5, float_inside = _tensor_findings(graph, postprocess)
    inputs = [_io_entry(graph.tensors[i]) for i in graph.inputs]
    outputs = [_io_entry(graph.tensors[i]) for i in graph.outputs]
    kernel_problems = _kernel_problems(graph)
    if postprocess is not None:
        kernel_problems += _postprocess_problems(graph, postprocess)
    problems = _problems(postprocess, unsupported, nodes_per_op, inputs, outputs, above_rank_5, float_inside)
    problems += kernel_problems
    return {
        "ops_to_register": ops_to_register,
        "resolver_methods": [op["method"] for op in ops_to_register],
        "num_resolver_ops": len(ops_to_register),
        "operator_count": len(graph.operators),
        "unsupported_ops": unsupported,
        "tensors_above_rank_5": above_rank_5,
        "tensors_of_rank_5": rank_5,
        "float_tensors_inside": float_inside,
        "inputs": inputs,
        "outputs": outputs,
        "kernel_problems": kernel_problems,
        "detector": postprocess is not None,
        "problems": problems,
        "compatible": not problems,
        "notes": _notes(graph, rank_5, postprocess),
    }
