"""TensorFlow Lite Micro target: compatibility check, real TFLM runs, C source.

A micro target is an int8 `.tflite` that the TFLM interpreter can run on a
microcontroller. This module

* checks the flatbuffer against what TFLM's `MicroMutableOpResolver` and its
  int8 kernels accept (`check_micro_compatibility`);
* runs the model in the real TFLM interpreter (PyPI `tflite-micro`) and reads
  the arena it needs (`run_micro`, `measure_arena`). The interpreter runs in a
  subprocess (`micro_worker.py`) because TFLM aborts or segfaults the whole
  process on some bad models; that is reported as `MicroRuntimeError`;
* writes the model as C++ source for a firmware project, with the measured
  arena size and an op-resolver registration for exactly the model's ops
  (`write_c_source`);
* does all of it at once, against RAM/flash budgets and an agreement check
  with the TFLite interpreter (`export_micro`).

Arena figures come from TFLM's `RecordingMicroAllocator` with the reference
kernels of the Python build. Optimized kernels (CMSIS-NN, ESP-NN, ...) can ask
for different scratch buffers, so leave some headroom on the device.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from quantization.audit import FLOAT_TYPES
from quantization.audit import make_interpreter
from quantization.audit import read_structure
from quantization.audit import run_tflite

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
# `quantization.audit.read_structure` names them ("CUSTOM:<custom code>").
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

# The worker runs under a generous arena first, then under a 4x bigger one
# while TFLM reports that it ran out, up to this cap.
_FIRST_ARENA_BYTES = 16 * 2**20
_MAX_ARENA_BYTES = 4 * 2**30
_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_ARENA_SHORTFALL = re.compile(r"Failed to (allocate|resize)")
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro_worker.py")
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MicroRuntimeError(RuntimeError):
    """The TFLM interpreter process failed: an error, a crash or a timeout.

    Attributes:
        returncode: The worker's exit status (negative: killed by a signal;
            None: timed out).
        signal_name: e.g. "SIGABRT" or "SIGSEGV" when a signal killed it.
        stderr_tail: The end of what the interpreter printed.
        arena_shortfall: True when TFLM reported that the arena was too small.
    """

    def __init__(self, message, returncode=None, signal_name=None, stderr_tail="", arena_shortfall=False):
        super().__init__(message)
        self.returncode = returncode
        self.signal_name = signal_name
        self.stderr_tail = stderr_tail
        self.arena_shortfall = arena_shortfall


class MicroTargetError(ValueError):
    """The model does not fit the micro target; `.report` says why and by how much."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def resolver_method(op_name):
    """The `MicroMutableOpResolver` method registering `op_name`, or None."""
    return MICRO_RESOLVER_METHODS.get(op_name) or MICRO_CUSTOM_RESOLVER_METHODS.get(op_name)


def _parse_graph(flatbuffer):
    """Per-operator tensor indices and options, and per-tensor quantization.

    `read_structure` has names, dtypes and shapes; the checks below also need
    which tensors each operator reads, quantization parameters and the
    softmax beta, read here from the same schema.
    """
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    graph = model.Subgraphs(0)
    quantization = []
    for i in range(graph.TensorsLength()):
        params = graph.Tensors(i).Quantization()
        scales = params.ScaleAsNumpy() if params is not None and params.ScaleLength() else []
        zero_points = params.ZeroPointAsNumpy() if params is not None and params.ZeroPointLength() else []
        quantization.append(([float(s) for s in scales], [int(z) for z in zero_points]))
    operators = []
    for i in range(graph.OperatorsLength()):
        operator = graph.Operators(i)
        beta = None
        if operator.BuiltinOptionsType() == schema.BuiltinOptions.SoftmaxOptions:
            options = schema.SoftmaxOptions()
            table = operator.BuiltinOptions()
            options.Init(table.Bytes, table.Pos)
            beta = float(options.Beta())
        operators.append(
            {
                "inputs": [int(t) for t in operator.InputsAsNumpy()] if operator.InputsLength() else [],
                "outputs": [int(t) for t in operator.OutputsAsNumpy()] if operator.OutputsLength() else [],
                "softmax_beta": beta,
            }
        )
    return {"operators": operators, "quantization": quantization, "subgraphs": model.SubgraphsLength()}


def _io_description(index, tensors, quantization):
    scales, zero_points = quantization[index]
    tensor = tensors[index]
    description = {"name": tensor["name"], "dtype": tensor["dtype"], "shape": tensor["shape"]}
    if len(scales) == 1:
        description["scale"] = scales[0]
        description["zero_point"] = zero_points[0] if zero_points else 0
    return description


def _examples(names, limit=2, width=60):
    """'a', 'b' and 5 more: converter tensor names can be hundreds of characters."""
    shown = ", ".join(repr(n if len(n) <= width else n[: width - 3] + "...") for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
        float_tensors_inside: float tensors that are neither input nor output;
        inputs / outputs: [{name, dtype, shape, scale, zero_point}];
        kernel_problems: op/dtype/rank/quantization combinations a TFLM
            kernel refuses or aborts on;
        problems: every reason the model is not an int8 micro target, one
            sentence each; compatible: `problems == []`;
        notes: things to know that do not block.
    """
    flatbuffer = bytes(flatbuffer)
    if len(flatbuffer) < 8 or not schema.Model.ModelBufferHasIdentifier(flatbuffer, 0):
        raise ValueError("not a TFLite flatbuffer (the 'TFL3' identifier is missing)")
    structure = read_structure(flatbuffer)
    graph = _parse_graph(flatbuffer)
    tensors = structure["tensors"]
    quantization = graph["quantization"]

    nodes_per_op, versions_per_op = {}, {}
    for name, version in structure["ops"]:
        nodes_per_op[name] = nodes_per_op.get(name, 0) + 1
        versions_per_op.setdefault(name, set()).add(int(version))
    ops_to_register, unsupported = [], []
    for name in sorted(nodes_per_op):
        method = resolver_method(name)
        if method is None:
            unsupported.append(name)
        else:
            ops_to_register.append(
                {"op": name, "method": method, "nodes": nodes_per_op[name], "versions": sorted(versions_per_op[name])}
            )

    boundary = set(structure["inputs"]) | set(structure["outputs"])
    above_rank_5 = [{"name": t["name"], "shape": t["shape"]} for t in tensors if len(t["shape"]) > MAX_TENSOR_RANK]
    rank_5 = [{"name": t["name"], "shape": t["shape"]} for t in tensors if len(t["shape"]) == MAX_TENSOR_RANK]
    float_inside = [t["name"] for i, t in enumerate(tensors) if i not in boundary and t["dtype"] in FLOAT_TYPES]
    inputs = [_io_description(i, tensors, quantization) for i in structure["inputs"]]
    outputs = [_io_description(i, tensors, quantization) for i in structure["outputs"]]

    kernel_problems = []
    for (name, _), operator in zip(structure["ops"], graph["operators"]):
        activations = [i for i in operator["inputs"] if i >= 0]
        if not activations:
            continue
        first = activations[0]
        dtype = tensors[first]["dtype"]
        allowed = MICRO_KERNEL_DTYPES.get(name)
        if allowed is not None and dtype not in allowed:
            kernel_problems.append(
                f"{name} reads {dtype} tensor {tensors[first]['name']!r}, but TFLM's {name} kernel takes only "
                f"{'/'.join(allowed)}"
            )
        rank = max(len(tensors[i]["shape"]) for i in activations + operator["outputs"])
        if name in MICRO_MAX_RANK and rank > MICRO_MAX_RANK[name]:
            kernel_problems.append(
                f"{name} on tensor {tensors[first]['name']!r} has rank {rank}; TFLM's {name} kernel takes at most "
                f"{MICRO_MAX_RANK[name]}-D"
            )
        if name == "SOFTMAX" and dtype == "INT8":
            kernel_problems.extend(_softmax_problems(operator, tensors, quantization))
    # The same problem repeated on every attention block says nothing new.
    kernel_problems = list(dict.fromkeys(kernel_problems))

    problems = []
    for name in unsupported:
        hint = _UNSUPPORTED_HINTS.get(name, "TFLM's MicroMutableOpResolver has no kernel for it")
        problems.append(f"op {name} ({nodes_per_op[name]} node(s)) cannot run on TFLite Micro: {hint}")
    for role, described in (("input", inputs), ("output", outputs)):
        for tensor in described:
            if tensor["dtype"] != "INT8":
                problems.append(
                    f"{role} {tensor['name']!r} is {tensor['dtype']}; the micro target needs an INT8 {role} "
                    "(export with io_type='int8')"
                )
    if above_rank_5:
        problems.append(
            f"{len(above_rank_5)} tensor(s) have rank > {MAX_TENSOR_RANK}, which TFLM does not support "
            f"(e.g. {above_rank_5[0]['name']!r} of shape {above_rank_5[0]['shape']})"
        )
    if float_inside:
        problems.append(
            f"{len(float_inside)} float tensor(s) inside the model ({_examples(float_inside)}): the micro target "
            "must be int8 throughout"
        )
    problems.extend(kernel_problems)

    notes = []
    if rank_5:
        notes.append(
            f"{len(rank_5)} tensor(s) are 5-D (e.g. {rank_5[0]['name']!r}); several TFLM kernels take at most 4-D"
        )
    if graph["subgraphs"] > 1:
        notes.append(f"the model has {graph['subgraphs']} subgraphs; only the main one was checked")
    return {
        "ops_to_register": ops_to_register,
        "resolver_methods": [op["method"] for op in ops_to_register],
        "num_resolver_ops": len(ops_to_register),
        "operator_count": len(structure["ops"]),
        "unsupported_ops": unsupported,
        "tensors_above_rank_5": above_rank_5,
        "tensors_of_rank_5": rank_5,
        "float_tensors_inside": float_inside,
        "inputs": inputs,
        "outputs": outputs,
        "kernel_problems": kernel_problems,
        "problems": problems,
        "compatible": not problems,
        "notes": notes,
    }


def _softmax_problems(operator, tensors, quantization):
    """Quantization parameters TFLM's int8 SOFTMAX refuses (or aborts on)."""
    problems = []
    source, result = operator["inputs"][0], operator["outputs"][0]
    input_scales, _ = quantization[source]
    beta = operator["softmax_beta"] if operator["softmax_beta"] is not None else 1.0
    if input_scales and beta * input_scales[0] <= _SOFTMAX_MIN_SCALED_INPUT:
        problems.append(
            f"SOFTMAX input {tensors[source]['name']!r} has scale {input_scales[0]:.3g} (beta {beta:g}); TFLM's "
            f"int8 softmax needs beta * scale > 2^-26 (about 1.5e-8) and aborts the process otherwise: the "
            "logits' range is degenerate (an untrained or badly calibrated model)"
        )
    output_scales, output_zero_points = quantization[result]
    if tensors[result]["dtype"] == "INT8" and output_scales:
        zero_point = output_zero_points[0] if output_zero_points else 0
        if zero_point != -128 or abs(output_scales[0] - 1 / 256) > 0.001 / 256:
            problems.append(
                f"SOFTMAX output {tensors[result]['name']!r} is quantized with scale {output_scales[0]:.6g}, "
                f"zero point {zero_point}; TFLM's int8 softmax needs exactly 1/256 and -128"
            )
    return problems


def _signal_name(returncode):
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _run_worker(model_path, arena_bytes, images_path, outputs_path, timeout):
    """One worker run; returns the arena total or raises MicroRuntimeError."""
    command = [sys.executable, _WORKER, model_path, str(int(arena_bytes))]
    if images_path is not None:
        command += [images_path, outputs_path]
    # TFLM reports (allocations, kernel errors) are printed by C code on fd 2:
    # only a separate process's captured stderr sees them, crash or not.
    try:
        completed = subprocess.run(command, capture_output=True, timeout=timeout, text=True, errors="replace")
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        raise MicroRuntimeError(
            f"the TFLite Micro interpreter did not finish within {timeout} s (arena {arena_bytes:,} bytes)",
            stderr_tail=(stderr or "")[-2000:],
        ) from None
    stderr_tail = completed.stderr[-2000:].strip()
    shortfall = bool(_ARENA_SHORTFALL.search(completed.stderr))
    if completed.returncode != 0:
        if completed.returncode < 0:
            name = _signal_name(completed.returncode)
            what = f"the TFLite Micro interpreter process was killed by {name}"
            if name == "SIGABRT":
                what += (
                    " (a failed TFLITE_CHECK, e.g. an int8 SOFTMAX whose input scale is too small, "
                    "see check_micro_compatibility)"
                )
        else:
            name = None
            what = f"the TFLite Micro interpreter failed (exit status {completed.returncode})"
        if shortfall:
            what += f"; TFLM ran out of its {arena_bytes:,}-byte arena"
        raise MicroRuntimeError(
            f"{what}. Its stderr ends with:\n{stderr_tail or '(nothing)'}",
            returncode=completed.returncode,
            signal_name=name,
            stderr_tail=stderr_tail,
            arena_shortfall=shortfall,
        )
    totals = _ARENA_TOTAL.findall(completed.stderr)
    if not totals:
        raise MicroRuntimeError(
            "the TFLite Micro interpreter ran but printed no 'Arena allocation total' line. Its stderr ends "
            f"with:\n{stderr_tail or '(nothing)'}",
            returncode=0,
            stderr_tail=stderr_tail,
        )
    return int(totals[-1])


def run_micro(flatbuffer, images=None, arena_size=None, timeout=600):
    """Runs `flatbuffer` in the TFLite Micro interpreter, in a subprocess.

    Args:
        flatbuffer: The `.tflite` model (bytes).
        images: float32 [N, H, W, C] in the model's input range (quantized
            with the input tensor's scale and zero point, as
            `quantization.audit.run_tflite` does), or None to only allocate.
        arena_size: The TFLM tensor arena in bytes. None: a generous arena,
            grown while TFLM reports running out of it.
        timeout: Seconds for each interpreter process.

    Returns:
        (outputs, arena_bytes): the dequantized float32 outputs [N, ...] (None
        without images) and the arena bytes TFLM allocated (head + tail, from
        `print_allocations()`; an arena of exactly this size works).

    Raises:
        MicroRuntimeError: the interpreter refused the model, crashed (the
        signal and the end of its stderr are in the message) or timed out.
    """
    flatbuffer = bytes(flatbuffer)
    with tempfile.TemporaryDirectory(prefix="micro_run_") as folder:
        model_path = os.path.join(folder, "model.tflite")
        with open(model_path, "wb") as f:
            f.write(flatbuffer)
        images_path = outputs_path = None
        if images is not None:
            images = np.asarray(images, np.float32)
            if images.ndim < 2 or len(images) == 0:
                raise ValueError(f"images must be a non-empty batch [N, H, W, C]; got shape {images.shape}")
            images_path = os.path.join(folder, "images.npy")
            outputs_path = os.path.join(folder, "outputs.npy")
            np.save(images_path, images)
        if arena_size is not None:
            arena_bytes = _run_worker(model_path, arena_size, images_path, outputs_path, timeout)
        else:
            arena_size = max(_FIRST_ARENA_BYTES, 4 * len(flatbuffer))
            while True:
                try:
                    arena_bytes = _run_worker(model_path, arena_size, images_path, outputs_path, timeout)
                    break
                except MicroRuntimeError as error:
                    if not error.arena_shortfall or arena_size * 4 > _MAX_ARENA_BYTES:
                        raise
                    arena_size *= 4
        outputs = np.load(outputs_path) if images is not None else None
    return outputs, arena_bytes


def measure_arena(flatbuffer, timeout=600):
    """Bytes of tensor arena TFLite Micro needs for `flatbuffer` (measured).

    TFLM plans and allocates all tensors when the interpreter is built, so
    this only allocates (no inference) under a generous arena and reads the
    "Arena allocation total" of `print_allocations()`.
    """
    return run_micro(flatbuffer, None, timeout=timeout)[1]


def _float_literal(value):
    """A C++ float literal that reads back as the same float32 ("1.0f", not "1f")."""
    text = f"{float(np.float32(value)):.9g}"
    if not any(c in text for c in ".en"):
        text += ".0"
    return text + "f"


def _resolver_ops(flatbuffer, ops):
    """Sorted unique (op, method) pairs to register; `ops` overrides the model's."""
    if ops is None:
        check = check_micro_compatibility(flatbuffer)
        if check["unsupported_ops"]:
            raise ValueError(f"TFLite Micro has no kernel for {', '.join(check['unsupported_ops'])}")
        ops = [op["op"] for op in check["ops_to_register"]]
    pairs = []
    for name in sorted(set(ops)):
        method = resolver_method(name)
        if method is None:
            raise ValueError(f"op {name!r} has no MicroMutableOpResolver method (not a TFLM op)")
        pairs.append((name, method))
    return pairs


def _tensor_constants(prefix, tensor):
    """C++ constants describing an input/output tensor (shape, quantization)."""
    lines = [f"// {prefix.lower()} {tensor['name']!r}: {tensor['dtype']} {tensor['shape']}"]
    shape = ", ".join(str(d) for d in tensor["shape"]) or "1"
    lines.append(f"constexpr int k{prefix}Shape[] = {{{shape}}};")
    lines.append(f"constexpr int k{prefix}Elements = {int(np.prod(tensor['shape'] or [1]))};")
    if "scale" in tensor:
        lines.append(f"constexpr float k{prefix}Scale = {_float_literal(tensor['scale'])};")
        lines.append(f"constexpr int k{prefix}ZeroPoint = {tensor['zero_point']};")
    return lines


def write_c_source(flatbuffer, output_prefix, array_name="g_model", ops=None, arena_bytes=None):
    """Writes `<output_prefix>.h` and `<output_prefix>.cc` for a firmware project.

    The .cc holds the model as `alignas(16) const unsigned char <array_name>[]`
    (TFLM reads the flatbuffer in place, and its tables need the alignment)
    and `<array_name>_len`. The header declares both and, in namespace
    `<array_name>_micro`, the arena size, the op count, the I/O shapes and
    quantization, and `RegisterOps(resolver)`, a template calling `Add*()` for
    exactly the model's ops (so it compiles without TFLM headers; with them a
    non-template `RegisterMicroOps` is added). Usage is in the header comment.

    Args:
        flatbuffer: The `.tflite` model (bytes).
        output_prefix: Path without extension.
        array_name: C identifier of the model array.
        ops: Op names to register (default: the model's ops).
        arena_bytes: The tensor arena size; None measures it with TFLM.

    Returns:
        (header_path, source_path).
    """
    flatbuffer = bytes(flatbuffer)
    if not _C_IDENTIFIER.fullmatch(array_name):
        raise ValueError(f"array_name must be a C identifier; got {array_name!r}")
    registrations = _resolver_ops(flatbuffer, ops)
    check = check_micro_compatibility(flatbuffer)
    if arena_bytes is None:
        arena_bytes = measure_arena(flatbuffer)
    output_prefix = str(output_prefix)
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(output_prefix)
    header_path, source_path = output_prefix + ".h", output_prefix + ".cc"
    namespace = f"{array_name}_micro"
    guard = re.sub(r"[^A-Za-z0-9]", "_", base).upper() + "_H_"
    tflm_flag = f"{array_name.upper()}_HAS_TFLM"

    header = [
        f"// {base}.h: a TensorFlow Lite Micro model, generated by quantization.micro.",
        f"// Model: {len(flatbuffer):,} bytes ({base}.cc); tensor arena: {arena_bytes:,} bytes measured with",
        "// the TFLM reference kernels (optimized kernels such as CMSIS-NN may need a little more scratch:",
        "// leave some headroom). Ops: " + ", ".join(name for name, _ in registrations) + ".",
        "//",
        "// Usage:",
        f"//   #include \"{base}.h\"",
        "//   #include \"tensorflow/lite/micro/micro_interpreter.h\"",
        "//   #include \"tensorflow/lite/micro/micro_mutable_op_resolver.h\"",
        "//",
        f"//   alignas(16) static uint8_t tensor_arena[{namespace}::kArenaBytes];",
        f"//   static tflite::MicroMutableOpResolver<{namespace}::kNumOps> resolver;",
        f"//   if ({namespace}::RegisterOps(resolver) != 0) {{ /* an op failed to register */ }}",
        f"//   tflite::MicroInterpreter interpreter(tflite::GetModel({array_name}), resolver,",
        "//                                        tensor_arena, sizeof(tensor_arena));",
        "//   if (interpreter.AllocateTensors() != kTfLiteOk) { /* arena too small or bad model */ }",
        "//   // int8 input: q = clamp(round(x / kInputScale) + kInputZeroPoint, -128, 127)",
        "//   // output:     y = (q - kOutputZeroPoint) * kOutputScale",
        "//",
        "// RegisterOps is a template so this header compiles without TFLM (any resolver type with the",
        "// Add*() methods works); when the TFLM headers are on the include path, RegisterMicroOps",
        "// takes a tflite::MicroMutableOpResolver<kNumOps> and returns a TfLiteStatus.",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#if defined(__has_include)",
        "#if __has_include(\"tensorflow/lite/micro/micro_mutable_op_resolver.h\")",
        "#include \"tensorflow/lite/micro/micro_mutable_op_resolver.h\"",
        f"#define {tflm_flag} 1",
        "#endif",
        "#endif",
        "",
        f"// The flatbuffer; defined in {base}.cc with 16-byte alignment.",
        f"extern const unsigned char {array_name}[];",
        f"extern const unsigned int {array_name}_len;",
        "",
        f"namespace {namespace} {{",
        "",
        f"constexpr unsigned int kModelBytes = {len(flatbuffer)};",
        "// Tensor arena bytes TFLM allocated for this model (head + tail, measured).",
        f"constexpr unsigned int kArenaBytes = {int(arena_bytes)};",
        "// Distinct ops: the template argument of tflite::MicroMutableOpResolver.",
        f"constexpr int kNumOps = {len(registrations)};",
        "// Operators (graph nodes) in the model.",
        f"constexpr int kOperatorCount = {check['operator_count']};",
        "",
    ]
    if len(check["inputs"]) == 1 and len(check["outputs"]) == 1:
        header += _tensor_constants("Input", check["inputs"][0]) + [""]
        header += _tensor_constants("Output", check["outputs"][0]) + [""]
    header += [
        "// Registers exactly the model's ops; returns 0, or the 1-based position of the first",
        "// Add*() call that failed (e.g. a resolver declared with fewer than kNumOps slots).",
        "template <typename OpResolver>",
        "int RegisterOps(OpResolver& resolver) {",
    ]
    for position, (name, method) in enumerate(registrations, start=1):
        header.append(f"  if (static_cast<int>(resolver.{method}()) != 0) return {position};  // {name}")
    header += [
        "  return 0;",
        "}",
        "",
        f"#ifdef {tflm_flag}",
        "inline TfLiteStatus RegisterMicroOps(tflite::MicroMutableOpResolver<kNumOps>& resolver) {",
        "  return RegisterOps(resolver) == 0 ? kTfLiteOk : kTfLiteError;",
        "}",
        "#endif",
        "",
        f"}}  // namespace {namespace}",
        "",
        f"#endif  // {guard}",
        "",
    ]

    hex_bytes = [f"0x{value:02x}" for value in range(256)]
    rows = [
        "  " + ", ".join(hex_bytes[value] for value in flatbuffer[start : start + 12]) + ","
        for start in range(0, len(flatbuffer), 12)
    ]
    source = [
        f"// {base}.cc: the TFLite flatbuffer of {base}.h, generated by quantization.micro.",
        "// TFLM reads the model in place: keep it const (it stays in flash) and 16-byte aligned.",
        f"#include \"{base}.h\"",
        "",
        f"alignas(16) const unsigned char {array_name}[] = {{",
        *rows,
        "};",
        f"const unsigned int {array_name}_len = {len(flatbuffer)};",
        "",
    ]
    _write_text(header_path, "\n".join(header))
    _write_text(source_path, "\n".join(source))
    return header_path, source_path


def _write_text(path, text):
    """Writes via a temporary file so a reader never sees half a file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def _write_bytes(path, data):
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def _agreement(micro_outputs, tflite_outputs, output_step, min_top1_agreement):
    difference = np.abs(micro_outputs.astype(np.float64) - tflite_outputs.astype(np.float64))
    flat_micro = micro_outputs.reshape(len(micro_outputs), -1)
    flat_tflite = tflite_outputs.reshape(len(tflite_outputs), -1)
    return {
        "samples": int(len(micro_outputs)),
        "top1_agreement": float(np.mean(flat_micro.argmax(-1) == flat_tflite.argmax(-1))),
        "min_top1_agreement": float(min_top1_agreement),
        "max_abs_difference": float(difference.max()),
        "mean_abs_difference": float(difference.mean()),
        "output_quantization_step": output_step,
        "max_difference_in_steps": float(difference.max() / output_step) if output_step else None,
    }


def export_micro(flatbuffer, output_dir, name, sample_images, arena_budget_bytes=None, flash_budget_bytes=None,
                 min_top1_agreement=0.95, array_name="g_model", timeout=600):
    """Checks, runs and writes an int8 model for TensorFlow Lite Micro.

    Runs the compatibility check, then the model in TFLM (subprocess) and in
    the TFLite interpreter on `sample_images`, compares them, measures the
    arena and checks the budgets. When everything fits it writes, in
    `output_dir`: `<name>.tflite`, `<name>.h` / `<name>.cc` (see
    `write_c_source`) and `<name>.micro_report.json`.

    Args:
        flatbuffer: The `.tflite` model (bytes), e.g. from
            `quantization.tflite_export.convert(..., "qat_int8", io_type="int8")`.
        output_dir: Folder for the files.
        name: Base name of the files.
        sample_images: float32 [N, H, W, C] in the model's input range.
        arena_budget_bytes: RAM for the tensor arena, or None.
        flash_budget_bytes: Flash for the model (the flatbuffer), or None.
        min_top1_agreement: Least fraction of samples whose top-1 class TFLM
            and the TFLite interpreter must agree on.
        array_name: C identifier of the model array in the .h/.cc.
        timeout: Seconds for each TFLM interpreter process.

    Returns:
        The report dict (also written as `<name>.micro_report.json`).

    Raises:
        MicroTargetError: something does not fit; the message lists every
            reason with the figures, `.report` holds the report. Nothing is
            written in that case, not even the report: the folder is left as
            it was, so a stale `.tflite` is never paired with a new report.
    """
    flatbuffer = bytes(flatbuffer)
    if not _C_IDENTIFIER.fullmatch(array_name):
        raise ValueError(f"array_name must be a C identifier; got {array_name!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name must be a plain file name (letters, digits, _ . -); got {name!r}")
    check = check_micro_compatibility(flatbuffer)
    images = np.asarray(sample_images, np.float32)
    model_shape = check["inputs"][0]["shape"]
    if images.ndim != len(model_shape) or list(images.shape[1:]) != list(model_shape[1:]) or not len(images):
        raise ValueError(
            f"sample_images must be float images of shape (N, {', '.join(map(str, model_shape[1:]))}) in the "
            f"model's input range; got shape {images.shape}"
        )

    problems = list(check["problems"])
    report = {
        "name": name,
        "fits": False,
        "flash_bytes": len(flatbuffer),
        "flash_budget_bytes": flash_budget_bytes,
        "arena_bytes": None,
        "arena_budget_bytes": arena_budget_bytes,
        "ops_to_register": check["ops_to_register"],
        "resolver_methods": check["resolver_methods"],
        "num_resolver_ops": check["num_resolver_ops"],
        "operator_count": check["operator_count"],
        "input": check["inputs"][0],
        "output": check["outputs"][0],
        "agreement": None,
        "compatibility": check,
        "notes": list(check["notes"])
        + [
            "arena measured by TFLM's RecordingMicroAllocator with reference kernels; optimized kernels "
            "may need some more scratch",
            "flash_bytes counts the model only; the TFLM runtime and the application add their code size",
        ],
        "problems": problems,
    }

    micro_outputs = tflite_outputs = None
    try:
        micro_outputs, report["arena_bytes"] = run_micro(flatbuffer, images, timeout=timeout)
    except MicroRuntimeError as error:
        problems.append(f"TFLite Micro could not run the model: {error}")
    try:
        tflite_outputs = run_tflite(make_interpreter(flatbuffer), images)
    except (RuntimeError, ValueError) as error:
        problems.append(f"the TFLite interpreter could not run the model: {error}")
    if micro_outputs is not None and tflite_outputs is not None:
        output = check["outputs"][0]
        step = float(output["scale"]) if output["dtype"] not in FLOAT_TYPES and "scale" in output else 0.0
        report["agreement"] = agreement = _agreement(micro_outputs, tflite_outputs, step, min_top1_agreement)
        if agreement["top1_agreement"] < min_top1_agreement:
            problems.append(
                f"TFLite Micro and the TFLite interpreter agree on the top-1 class of only "
                f"{agreement['top1_agreement']:.1%} of {agreement['samples']} sample images; the minimum is "
                f"{min_top1_agreement:.1%}"
            )
    if arena_budget_bytes is not None and report["arena_bytes"] is not None:
        if report["arena_bytes"] > arena_budget_bytes:
            problems.append(
                f"needs an arena of {report['arena_bytes']:,} bytes; the budget is {arena_budget_bytes:,} bytes"
            )
    if flash_budget_bytes is not None and len(flatbuffer) > flash_budget_bytes:
        problems.append(
            f"the model takes {len(flatbuffer):,} bytes of flash; the budget is {flash_budget_bytes:,} bytes"
        )
    if problems:
        raise MicroTargetError(f"{name} does not fit the TFLite Micro target: " + "; ".join(problems), report)

    report["fits"] = True
    os.makedirs(output_dir, exist_ok=True)
    prefix = os.path.join(output_dir, name)
    header_path, source_path = write_c_source(
        flatbuffer, prefix, array_name, ops=[op["op"] for op in check["ops_to_register"]],
        arena_bytes=report["arena_bytes"],
    )
    report["files"] = {
        "tflite": prefix + ".tflite",
        "header": header_path,
        "source": source_path,
        "report": prefix + ".micro_report.json",
    }
    _write_bytes(report["files"]["tflite"], flatbuffer)
    _write_text(report["files"]["report"], json.dumps(report, indent=2))
    return report


def format_micro_report(report):
    """The `export_micro` report as a few human-readable lines."""
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines = [f"TFLite Micro target {report['name']}: {verdict}"]

    def against(value, budget):
        if value is None:
            return "not measured"
        text = f"{value:,} bytes"
        return text + (f" (budget {budget:,})" if budget is not None else "")

    lines.append(f"  flash (model): {against(report['flash_bytes'], report['flash_budget_bytes'])}")
    lines.append(f"  tensor arena (measured): {against(report['arena_bytes'], report['arena_budget_bytes'])}")
    io = report["input"], report["output"]
    lines.append(
        f"  input {io[0]['dtype']} {io[0]['shape']}, output {io[1]['dtype']} {io[1]['shape']}; "
        f"{report['operator_count']} operators"
    )
    lines.append(
        f"  ops to register ({report['num_resolver_ops']}): "
        + ", ".join(f"{op['op']} ({op['method']})" for op in report["ops_to_register"])
    )
    agreement = report.get("agreement")
    if agreement:
        steps = agreement["max_difference_in_steps"]
        lines.append(
            f"  TFLM vs TFLite on {agreement['samples']} images: top-1 agreement {agreement['top1_agreement']:.3f} "
            f"(minimum {agreement['min_top1_agreement']:.2f}), max |diff| {agreement['max_abs_difference']:.4g}"
            + (f" ({steps:.1f} output steps)" if steps is not None else "")
            + f", mean |diff| {agreement['mean_abs_difference']:.4g}"
        )
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    for problem in report["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    for kind, path in (report.get("files") or {}).items():
        lines.append(f"  wrote {kind}: {path}")
    return "\n".join(lines)
