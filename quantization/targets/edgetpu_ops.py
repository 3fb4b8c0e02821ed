"""Coral Edge TPU: which ops of an int8 TFLite model map, and the compiler.

`edgetpu_compiler` is closed source and only distributed through Google's
apt repository, so the mapping is first predicted from the documented
requirements (coral.ai "TensorFlow models on the Edge TPU": model
requirements and supported-operations table; the compiler's rejections of
newer op versions reported in google-coral/edgetpu issues). When the real
compiler is on PATH it is run and its log is parsed into the same report.

The compiler builds ONE Edge TPU segment: from the first op it cannot map,
every later op runs on the CPU ("More than one subgraph is not supported"),
even ops it could map. The report follows that rule, so the share of MACs
that stays on the TPU is what a user gets.
"""

import os
import re
import shutil
import subprocess

from quantization.tflite_graph import DETECTION_POSTPROCESS
from quantization.tflite_graph import postprocessing_ops
from quantization.tflite_graph import read_graph

MAPPED = "Mapped to Edge TPU"
AFTER_FALLBACK = "More than one subgraph is not supported"
POSTPROCESSING = "Detection post-processing: on the CPU, after the Edge TPU segment"

# Highest op version the compiler can parse. Compiler 16 (the last release,
# 2021) rejected CONV_2D v6, TRANSPOSE v6, QUANTIZE v3, EXP v2 and
# TRANSPOSE_CONV v4, all versions first produced by TF >= 2.7; these limits
# are the last versions TFLite's runtime_version.cc dates at TF <= 2.6.
_MAX_VERSION = {
    "ADD": 4,
    "AVERAGE_POOL_2D": 3,
    "CONCATENATION": 3,
    "CONV_2D": 5,
    "DEPTHWISE_CONV_2D": 6,
    "EXPAND_DIMS": 1,
    "FULLY_CONNECTED": 9,
    "L2_NORMALIZATION": 2,
    "LOGISTIC": 3,
    "MAXIMUM": 4,
    "MINIMUM": 4,
    "MAX_POOL_2D": 3,
    "MEAN": 3,
    "MUL": 5,
    "PACK": 3,
    "PAD": 4,
    "PRELU": 1,
    "QUANTIZE": 2,
    "REDUCE_MAX": 3,
    "REDUCE_MIN": 3,
    "RELU": 3,
    "RELU6": 3,
    "RELU_N1_TO_1": 1,
    "RESHAPE": 1,
    "RESIZE_BILINEAR": 4,
    "RESIZE_NEAREST_NEIGHBOR": 4,
    "RSQRT": 2,
    "SLICE": 5,
    "SOFTMAX": 3,
    "SPACE_TO_DEPTH": 2,
    "SPLIT": 4,
    "SQUARED_DIFFERENCE": 2,
    "SQUEEZE": 2,
    "STRIDED_SLICE": 6,
    "SUB": 5,
    "SUM": 2,
    "TANH": 3,
    "TRANSPOSE": 5,
    "TRANSPOSE_CONV": 3,
}
# Ops the documentation knows but marks as commonly refused: TRANSPOSE is
# reported "otherwise supported, but not mapped due to some unspecified
# limitation" by compiler 16 (google-coral/edgetpu#433), so it is treated as
# not mapping.
_UNRELIABLE = {
    "TRANSPOSE": "Operation is otherwise supported, but not mapped due to some unspecified "
    "limitation (compiler 16 does not map TRANSPOSE, google-coral/edgetpu#433)"
}
_INTEGER_TYPES = ("INT8", "UINT8", "INT32")
SOFTMAX_MAX_ELEMENTS = 16000


def _non_unit(shape):
    return [d for d in shape if d != 1]


def _size(shape):
    size = 1
    for d in shape:
        size *= d
    return size


def _int32_values(tensor):
    """The values of a constant int32 tensor (axes, paddings, strides), else None."""
    if tensor is None or tensor.dtype != "INT32" or tensor.data is None:
        return None
    return [int(v) for v in tensor.data.ravel()]


def _check_version_and_tensors(graph, operator):
    name, version = operator.name, operator.version
    if name not in _MAX_VERSION:
        return f"Operation not supported ({name} is not in the Edge TPU op table)"
    if version > _MAX_VERSION[name]:
        return f"Operation version not supported ({name} v{version}; the compiler parses up to v{_MAX_VERSION[name]})"
    tensors = [t for t in graph.input_tensors(operator) + graph.output_tensors(operator) if t is not None]
    if any(t.dtype not in _INTEGER_TYPES for t in tensors):
        return "Operation is working on an unsupported data type (float)"
    for tensor in tensors:
        if not tensor.is_constant and len(tensor.shape) > 3 and any(d != 1 for d in tensor.shape[:-3]):
            return (
                f"Tensor has unsupported rank (shape {list(tensor.shape)}: only the 3 innermost dimensions may "
                "exceed 1)"
            )
    return None


def _check_options(operator):
    name, options = operator.name, operator.options
    if options.get("fused_activation_function") and name in ("CONCATENATION", "AVERAGE_POOL_2D", "MAX_POOL_2D"):
        return f"{name} with a fused activation is not supported"
    dilations = options.get("dilation_h_factor"), options.get("dilation_w_factor")
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D") and dilations[0] != dilations[1]:
        return "Convolution with different x and y dilation is not supported"
    return None


def _check_inputs(graph, operator):
    """The per-op shape and constant-input rules of the documented table."""
    name = operator.name
    inputs = graph.input_tensors(operator)
    if name == "SOFTMAX":
        shape = list(inputs[0].shape)
        if len(_non_unit(shape)) > 1:
            return f"Softmax input {shape} is not 1-D (the Edge TPU maps softmax on a vector only)"
        if _size(shape) > SOFTMAX_MAX_ELEMENTS:
            return f"Softmax over {_size(shape)} elements (at most {SOFTMAX_MAX_ELEMENTS})"
    if name == "FULLY_CONNECTED":
        shape = list(graph.tensors[operator.outputs[0]].shape)
        if len(_non_unit(shape)) > 1:
            return f"Fully-connected output {shape} is not 1-D"
    if name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"):
        shape, axes = inputs[0].shape, _int32_values(inputs[1])
        if axes is None:
            return f"{name} with non-constant axes"
        axes = [a % len(shape) for a in axes]
        if 0 in axes and shape[0] != 1:
            return f"{name} reduces the batch dimension"
        if name == "MEAN" and len(shape) - 1 in axes and shape[-1] % 4:
            return f"MEAN over the channel axis needs a multiple of 4 channels (has {shape[-1]})"
    if name == "STRIDED_SLICE":
        strides = _int32_values(inputs[3]) if len(inputs) > 3 else None
        if strides is None or any(s != 1 for s in strides):
            return "StridedSlice with strides other than 1"
        if operator.options.get("ellipsis_mask") or operator.options.get("new_axis_mask"):
            return "StridedSlice with an ellipsis or new-axis mask"
    if name == "PAD":
        paddings = _int32_values(inputs[1])
        if paddings is None or any(paddings[:2]):
            return "Pad of the batch dimension (or non-constant paddings)"
    return None


def _check_op(graph, operator):
    """None when the documented rules let the op map, else the reason."""
    return (
        _check_version_and_tensors(graph, operator)
        or _check_options(operator)
        or _check_inputs(graph, operator)
        or _UNRELIABLE.get(operator.name)
    )


def operator_macs(graph, operator):
    """Multiply-accumulates of one op (a `tflite_graph.Operator` of `graph`)
    from its static shapes.

    Convolutions and fully-connected layers count kernel MACs; elementwise
    MUL/ADD/SUB/SQUARED_DIFFERENCE and reductions count one per output (or
    input) element; data movement (reshape, slice, concat, pad) counts 0.
    """
    name = operator.name
    inputs = [t.shape if t is not None else () for t in graph.input_tensors(operator)]
    out = graph.tensors[operator.outputs[0]].shape if operator.outputs else ()
    if name == "CONV_2D":
        kernel = inputs[1]  # [O, kh, kw, I]
        return _size(out) * kernel[1] * kernel[2] * kernel[3]
    if name == "DEPTHWISE_CONV_2D":
        kernel = inputs[1]  # [1, kh, kw, C]
        return _size(out) * kernel[1] * kernel[2]
    if name == "FULLY_CONNECTED":
        return _size(out) * inputs[1][-1]
    if name == "TRANSPOSE_CONV":
        kernel = inputs[1]  # [O, kh, kw, I]
        return _size(inputs[2]) * kernel[0] * kernel[1] * kernel[2]
    if name in ("MUL", "ADD", "SUB", "SQUARED_DIFFERENCE", "MAXIMUM", "MINIMUM"):
        return _size(out)
    if name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "SOFTMAX", "AVERAGE_POOL_2D", "MAX_POOL_2D"):
        return _size(inputs[0])
    return 0


def edgetpu_report(flatbuffer):
    """The predicted Edge TPU mapping of an int8 TFLite model.

    Returns a dict: `ops` (per op in execution order: index, op, version,
    status, macs), `first_cpu_op` (the first op that falls back, with its
    reason, or None), `ops_mapped`/`ops_total`, `macs_on_tpu`/`macs_total`/
    `mac_share_on_tpu`, `unsupported` (op -> reason, for every op that
    cannot map wherever it stands) and `source: "documented op table"`.
    """
    graph = read_graph(flatbuffer)
    ops, first_cpu_op, unsupported = [], None, {}
    tail = postprocessing_ops(graph)
    for operator in graph.operators:
        if operator.index in tail:  # a detector's decoding + NMS: on the CPU after the TPU segment
            ops.append(
                {"index": operator.index, "op": operator.name, "version": operator.version, "status": POSTPROCESSING}
            )
            ops[-1]["macs"] = 0
            continue
        reason = _check_op(graph, operator)
        if reason is None and tail and operator.index > min(tail):
            reason = f"after the detection post-processing op #{min(tail)} (the CPU), which ends the Edge TPU segment"
        if reason is not None:
            unsupported.setdefault(f"{operator.name} v{operator.version}", reason)
        if first_cpu_op is None and reason is not None:
            first_cpu_op = {"index": operator.index, "op": operator.name, "reason": reason}
        if reason is None:
            status = MAPPED if first_cpu_op is None else AFTER_FALLBACK
        else:
            status = reason
        ops.append(
            {
                "index": operator.index,
                "op": operator.name,
                "version": operator.version,
                "status": status,
                "macs": operator_macs(graph, operator),
            }
        )
    macs_total = sum(op["macs"] for op in ops)
    macs_on_tpu = sum(op["macs"] for op in ops if op["status"] == MAPPED)
    return {
        "source": "documented op table",
        "ops": ops,
        "ops_total": len(ops),
        "ops_mapped": sum(op["status"] == MAPPED for op in ops),
        "postprocessing_ops": len(tail),
        "first_cpu_op": first_cpu_op,
        "unsupported": unsupported,
        "macs_total": macs_total,
        "macs_on_tpu": macs_on_tpu,
        "mac_share_on_tpu": macs_on_tpu / macs_total if macs_total else 0.0,
    }


def summarize_statuses(ops):
    """[(op, count, status)] grouped the way the compiler's log prints them."""
    counts = {}
    for op in ops:
        key = (op["op"], op["status"])
        counts[key] = counts.get(key, 0) + 1
    return [(name, count, status) for (name, status), count in counts.items()]


def format_edgetpu_report(report):
    lines = [
        f"Edge TPU ({report['source']}): {report['ops_mapped']}/{report['ops_total']} ops mapped, "
        f"{100 * report['mac_share_on_tpu']:.1f}% of {report['macs_total'] / 1e6:.1f} M MACs on the TPU",
    ]
    first = report["first_cpu_op"]
    tail = report.get("postprocessing_ops", 0)
    lines.append(
        ("  all ops map: one Edge TPU segment" + (f", then {tail} post-processing ops on the CPU" if tail else ""))
        if first is None
        else f"  first op on the CPU: #{first['index']} {first['op']} - {first['reason']}"
    )
    lines.append(f"  {'Operator':<24} {'Count':>5}  Status")
    for name, count, status in summarize_statuses(report["ops"]):
        lines.append(f"  {name:<24} {count:>5}  {status}")
    compiler = report.get("compiler")
    if compiler:
        lines.append(
            f"  edgetpu_compiler {compiler.get('version') or '?'}: {compiler['ops_on_tpu']} ops on the TPU, "
            f"{compiler['ops_on_cpu']} on the CPU, {compiler.get('subgraphs', '?')} subgraph(s)"
        )
    return "\n".join(lines)


_TABLE_ROW = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]*)\s+(?P<count>\d+)\s+(?P<status>\S.*?)\s*$")


def parse_compiler_log(text):
    """Parses `edgetpu_compiler -s` output into the report's vocabulary.

    Returns {version, subgraphs, ops_total, ops_on_tpu, ops_on_cpu, rows:
    [(op, count, status)], succeeded}. The per-op table is the authority;
    the "will run on" totals are cross-checked against it when printed.
    """
    version = re.search(r"Edge TPU Compiler version (\S+)", text)
    subgraphs = re.search(r"Number of Edge TPU subgraphs:\s*(\d+)", text)
    total = re.search(r"Total number of operations:\s*(\d+)", text)
    on_tpu_line = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", text)
    on_cpu_line = re.search(r"Number of operations that will run on CPU:\s*(\d+)", text)
    rows = []
    in_table = False

    for line in text.splitlines():
        if re.match(r"^Operator\s+Count\s+Status\s*$", line.strip()):
            in_table = True
            continue
        if in_table:
            match = _TABLE_ROW.match(line.strip())
            if match:
                rows.append((match["op"], int(match["count"]), match["status"]))
            elif rows and line.strip() and not line.startswith(" "):
                in_table = False
    if not rows and "Model compiled successfully" not in text:
        raise ValueError("Not an edgetpu_compiler log: no operator table and no 'Model compiled successfully'.")
    on_tpu = sum(count for _, count, status in rows if status == MAPPED)
    on_cpu = sum(count for _, count, status in rows if status != MAPPED)
    if not rows:  # the table went to the operation log file: use the summary
        on_tpu = int(on_tpu_line.group(1)) if on_tpu_line else (int(total.group(1)) if total else 0)
        on_cpu = int(on_cpu_line.group(1)) if on_cpu_line else 0
    elif on_tpu_line and int(on_tpu_line.group(1)) != on_tpu:
        raise ValueError(
            f"Inconsistent compiler log: the table maps {on_tpu} ops, the summary says {on_tpu_line.group(1)}."
        )
    if rows and on_cpu_line and int(on_cpu_line.group(1)) != on_cpu:
        raise ValueError(
            f"Inconsistent compiler log: the table leaves {on_cpu} ops on the CPU, the summary says "
            f"{on_cpu_line.group(1)}."
        )
    return {
        "version": version.group(1) if version else None,
        "subgraphs": int(subgraphs.group(1)) if subgraphs else None,
        "ops_total": int(total.group(1)) if total else on_tpu + on_cpu,
        "ops_on_tpu": on_tpu,
        "ops_on_cpu": on_cpu,
        "rows": rows,
        "succeeded": "Model compiled successfully" in text or bool(rows),
    }


def compiler_available():
    return shutil.which("edgetpu_compiler") is not None


def run_compiler(tflite_path, output_dir, timeout=600):
    """Runs `edgetpu_compiler -s` when it is installed; returns the parsed log
    (plus `log` and `output_model`), or None when it is not on PATH."""
    executable = shutil.which("edgetpu_compiler")
    if executable is None:
        return None
    os.makedirs(output_dir, exist_ok=True)
    completed = subprocess.run(
        [executable, "-s", "-o", output_dir, tflite_path], capture_output=True, text=True, timeout=timeout
    )
    log = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RuntimeError(f"edgetpu_compiler failed (exit {completed.returncode}):\n{log[-3000:]}")
    operation_log = re.search(r"Operation log:\s*(\S+)", log)
    if operation_log and "Operator" not in log:
        # Without -s the table is only in the operation log file.
        candidate = os.path.join(output_dir, os.path.basename(operation_log.group(1)))
        if os.path.exists(candidate):
            with open(candidate) as f:
                log += "\n" + f.read()
    parsed = parse_compiler_log(log)
    parsed["log"] = log
    stem = os.path.splitext(os.path.basename(tflite_path))[0]
    parsed["output_model"] = os.path.join(output_dir, f"{stem}_edgetpu.tflite")
    return parsed


_IO_TYPES = ("INT8", "UINT8")


def check_edgetpu_io(flatbuffer):
    """Problems with the model's interface for the Edge TPU: every graph input
    and output must have batch 1 (the compiler needs a static batch of one)
    and an int8 or uint8 dtype (the Edge TPU computes integers only; a float
    interface adds QUANTIZE/DEQUANTIZE ops the CPU runs). Returns a list of
    messages, empty when the interface fits."""
    graph = read_graph(flatbuffer)
    problems = []
    # A detector's outputs come from its post-processing on the CPU (float, by design).
    detections = {index for op in graph.operators if op.name == DETECTION_POSTPROCESS for index in op.outputs}
    for kind, indices in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        for index in indices:
            tensor = graph.tensors[index]
            where = f"{kind[:-1]} {tensor.name!r}"
            shape = list(tensor.shape)
            if not shape or shape[0] != 1:
                problems.append(f"{where} has shape {shape}: the Edge TPU needs batch 1 (shape [1, ...])")
            if tensor.dtype not in _IO_TYPES and index not in detections:
                problems.append(
                    f"{where} is {tensor.dtype.lower()}: the Edge TPU takes int8 or uint8 input and output only"
                )
    return problems
