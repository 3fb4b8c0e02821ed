"""Where our TFLite models spend their time, op by op, on the benchmarks' runtime.

    python -m benchmarks.op_profile [--widths 0.5 1.0] [--batch 1] [--image_size 256] [--threads 2]
        [--output_dir benchmark_results] [--tiny]

The Python LiteRT interpreter has no per-operator profiler, so every
operator is cut out into a model of its own - its tensors, quantization and
constants as they are, its non-constant inputs as the model's inputs (read
with `quantization.tflite_graph`, written with TFLite's schema object API) -
and timed alone on the same interpreter (XNNPACK, same threads) as the whole
model. Per model (float32, PTQ int8 and QAT int8, random weights, exported
as the latency section exports them) it reports the time by op kind and the
slowest operators, with the sum of the parts next to the whole model's time:
the difference is what the whole graph saves (XNNPACK fuses and keeps data
in cache across operators) or loses (per-operator dispatch). Writes
OUTPUT_DIR/op_profile.md and op_profile.json.
"""

import argparse
import collections
import copy
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

from benchmarks.console import log
from benchmarks.isolation import cpu_name
from benchmarks.report import machine_text

RESULT_NAME = "op_profile"
VARIANTS = (("tflite_float", "float32"), ("tflite_int8", "PTQ int8"), ("tflite_int8_qat", "QAT int8"))


@dataclasses.dataclass(frozen=True)
class Config:
    widths: tuple = (0.5, 1.0)
    batch: int = 1
    image_size: int = 256
    threads: int = 2
    min_seconds: float = 0.05  # timed per operator, at least
    max_runs: int = 200
    whole_seconds: float = 8.0  # each whole model, timed in turn with the others
    tiny: bool = False


TINY = dict(widths=(0.5,), image_size=64, min_seconds=0.002, max_runs=3, whole_seconds=0.05, tiny=True)


# --- cutting one operator out --------------------------------------------------------------------------------------


def has_data(model, tensor):
    data = model.buffers[tensor.buffer].data
    return data is not None and len(data) > 0


def single_operator_model(model, index):
    """The flatbuffer of a model that runs operator `index` of `model`'s first
    subgraph (a schema ModelT) alone."""
    from tensorflow.lite.python import schema_py_generated as schema

    subgraph = model.subgraphs[0]
    operator = subgraph.operators[index]
    used = [i for i in [*operator.inputs, *operator.outputs, *(operator.intermediates or [])] if i >= 0]
    order = list(dict.fromkeys(used))
    remap = {old: new for new, old in enumerate(order)}
    cut = schema.ModelT()
    cut.version, cut.operatorCodes, cut.buffers = model.version, model.operatorCodes, [schema.BufferT()]
    tensors = []
    for old in order:
        tensor = copy.copy(subgraph.tensors[old])
        # Constants keep their data; every run-time tensor gets its own empty buffer.
        cut.buffers.append(model.buffers[tensor.buffer] if has_data(model, tensor) else schema.BufferT())
        tensor.buffer = len(cut.buffers) - 1
        tensors.append(tensor)
    single = copy.copy(operator)
    single.inputs = [remap[i] if i >= 0 else -1 for i in operator.inputs]
    single.outputs = [remap[i] for i in operator.outputs]
    single.intermediates = [remap[i] for i in operator.intermediates] if operator.intermediates is not None else None
    graph = schema.SubGraphT()
    graph.tensors, graph.operators = tensors, [single]
    graph.inputs = [
        remap[i] for i in dict.fromkeys(operator.inputs) if i >= 0 and not has_data(model, subgraph.tensors[i])
    ]
    graph.outputs = [remap[i] for i in operator.outputs]
    cut.subgraphs = [graph]
    from quantization.tflite_graph import pack_object_model

    return pack_object_model(cut)


INTEGER_TYPES = (2, 3, 9)  # schema TensorType INT32, UINT8, INT8


def with_copies_for(model, indices):
    """The flatbuffer of `model` (a schema ModelT, changed in place) with the
    operators `indices` replaced by a QUANTIZE of their first runtime input
    into their output: a requantizing copy, which XNNPACK takes. It times what
    the graph would cost if XNNPACK ran those operators as cheaply as a copy
    (its outputs are wrong). None when an operator has no integer input of
    its output's shape to copy."""
    from tensorflow.lite.python import schema_py_generated as schema

    tensors = model.subgraphs[0].tensors
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
    code.version = 1
    model.operatorCodes.append(code)
    for index in indices:
        operator = model.subgraphs[0].operators[index]
        output = tensors[operator.outputs[0]]
        sources = [i for i in operator.inputs if i >= 0 and not has_data(model, tensors[i])]
        if len(operator.outputs) != 1 or not sources or output.type not in INTEGER_TYPES:
            return None
        source = tensors[sources[0]]
        if list(source.shape) != list(output.shape) or source.type not in INTEGER_TYPES:
            return None
        operator.opcodeIndex = len(model.operatorCodes) - 1
        operator.inputs, operator.intermediates = [sources[0]], None
        operator.builtinOptionsType, operator.builtinOptions = 0, None
    from quantization.tflite_graph import pack_object_model

    return pack_object_model(model)


# --- timing --------------------------------------------------------------------------------------------------------


def _random_inputs(interpreter, rng):
    inputs = []
    for detail in interpreter.get_input_details():
        dtype, shape = detail["dtype"], detail["shape"]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            value = rng.randint(max(info.min, -128), min(info.max, 127) + 1, size=shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        inputs.append((detail["index"], value))
    return inputs


def xnnpack_partitions(interpreter):
    """How many pieces of the graph XNNPACK runs: the DELEGATE nodes the
    interpreter added to its node list. Every operator XNNPACK refuses runs on
    TFLite's own kernel between two of them."""
    return sum(1 for node in interpreter._get_ops_details() if node["op_name"] == "DELEGATE")


def time_invoke(flatbuffer, threads, min_seconds, max_runs, seed=0):
    """(median ms of `invoke()` on random inputs (set once): the operator's own
    time, XNNPACK partitions of the model)."""
    from benchmarks.runtimes import make_tflite_interpreter

    interpreter = make_tflite_interpreter(flatbuffer, threads)
    for index, value in _random_inputs(interpreter, np.random.RandomState(seed)):
        interpreter.set_tensor(index, value)
    interpreter.invoke()  # warm-up: first-call allocations and packing
    times, spent = [], 0.0
    while len(times) < max_runs and (spent < min_seconds or len(times) < 3):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return 1000 * statistics.median(times), xnnpack_partitions(interpreter)


def _invoker(flatbuffer, threads, seed=0):
    from benchmarks.runtimes import make_tflite_interpreter

    interpreter = make_tflite_interpreter(flatbuffer, threads)
    for index, value in _random_inputs(interpreter, np.random.RandomState(seed)):
        interpreter.set_tensor(index, value)
    return interpreter.invoke


def time_whole_in_turn(models, threads, seconds):
    """{name: median ms of `invoke()`} of whole models timed in turn
    (`timing.time_interleaved`), so the machine's drift falls on all alike."""
    from benchmarks.timing import time_interleaved

    runs = {name: _invoker(flatbuffer, threads) for name, flatbuffer in models.items()}
    timings = time_interleaved(runs, warmup=3, repeats=100_000, max_seconds=seconds)
    return {name: timing.median_ms for name, timing in timings.items()}


def profile_model(flatbuffer, config):
    """({xnnpack_partitions, all_delegated_partitions, operators: [{index,
    name, ms, output_shape, delegated}]}, the all-delegated flatbuffer or
    None). `delegated`: XNNPACK takes the operator (cut out alone); the
    all-delegated model has the operators it refuses replaced by copies
    (`with_copies_for`; None when nothing is refused or no copy fits). The
    whole models are timed by `run`, in turn."""
    from quantization.tflite_graph import load_object_model
    from quantization.tflite_graph import read_graph

    graph, model = read_graph(flatbuffer), load_object_model(flatbuffer)
    operators = []
    for operator in graph.operators:
        cut = single_operator_model(model, operator.index)
        ms, partitions = time_invoke(cut, config.threads, config.min_seconds, config.max_runs)
        shape = list(graph.tensors[operator.outputs[0]].shape)
        operators.append(
            {
                "index": operator.index,
                "name": operator.name,
                "ms": ms,
                "output_shape": shape,
                "delegated": partitions > 0,
            }
        )
    refused = [operator["index"] for operator in operators if not operator["delegated"]]
    copies = with_copies_for(load_object_model(flatbuffer), refused) if refused else None
    profile = {
        "xnnpack_partitions": time_invoke(flatbuffer, config.threads, 0.0, 1)[1],
        "all_delegated_partitions": None if copies is None else time_invoke(copies, config.threads, 0.0, 1)[1],
        "operators": operators,
    }
    return profile, copies


def time_wholes(profiles, models, copies, config):
    """Fills each profile's `whole_ms` and `all_delegated_ms` (None without
    copies): every whole model of the width, timed in turn."""
    wholes = dict(models)
    wholes.update({f"{variant} all delegated": flatbuffer for variant, flatbuffer in copies.items() if flatbuffer})
    timed = time_whole_in_turn(wholes, config.threads, config.whole_seconds)
    for variant, profile in profiles.items():
        profile["whole_ms"] = timed[variant]
        profile["all_delegated_ms"] = timed.get(f"{variant} all delegated")


def not_delegated(profile):
    """[(op name, count)] of the operators XNNPACK leaves to TFLite's kernels,
    most frequent first; None for a profile recorded before this was measured."""
    if any("delegated" not in operator for operator in profile["operators"]):
        return None
    return collections.Counter(op["name"] for op in profile["operators"] if not op["delegated"]).most_common()


def by_kind(operators):
    """[(op name, count, total ms)], slowest first."""
    totals, counts = collections.Counter(), collections.Counter()
    for operator in operators:
        totals[operator["name"]] += operator["ms"]
        counts[operator["name"]] += 1
    return [(name, counts[name], ms) for name, ms in totals.most_common()]


# --- the run -------------------------------------------------------------------------------------------------------


def export_models(width, config):
    """{variant: flatbuffer} of our models of `width`, as the latency section exports them."""
    from benchmarks import competitors
    from benchmarks.latency_common import SEED
    from benchmarks.latency_common import random_images
    from benchmarks.random_weights import randomize_keras_weights
    from benchmarks.tflite_export import TFLiteExporter

    ours = competitors.BY_KEY["keras_mobilevitv2"]
    model = randomize_keras_weights(ours.build(width, config.image_size), seed=SEED)
    exporter = TFLiteExporter(ours, model, random_images(ours, 8, config.image_size, seed=1))
    return {variant: exporter.export(variant, config.batch)[0] for variant, _ in VARIANTS}


def run(config):
    from benchmarks.competitors import library_versions
    from quantization.tflite_graph import load_object_model

    widths = []
    for width in config.widths:
        log(f"width {width:g}: exporting float32, PTQ int8 and QAT int8 at {config.image_size}x{config.image_size}")
        models = export_models(width, config)
        profiles, copies = {}, {}
        for variant, label in VARIANTS:
            count = len(load_object_model(models[variant]).subgraphs[0].operators)
            log(f"width {width:g} {label}: timing {count} operators one by one")
            profiles[variant], copies[variant] = profile_model(models[variant], config)
        log(f"width {width:g}: timing the whole models in turn ({config.whole_seconds:g} s each)")
        time_wholes(profiles, models, copies, config)
        for variant, label in VARIANTS:
            parts = sum(op["ms"] for op in profiles[variant]["operators"])
            log(f"  {label}: whole {profiles[variant]['whole_ms']:.2f} ms, sum of the operators {parts:.2f} ms")
        widths.append({"width": width, "profiles": profiles})
    return {
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "machine": cpu_name(),
        "load_average_end": os.getloadavg()[0],
        "widths": widths,
    }


# --- the report ----------------------------------------------------------------------------------------------------


def kind_table(profiles, top=14):
    """Op kinds (rows) x variants (ms and share of the sum of parts)."""
    from benchmarks.report import table

    sums = {variant: sum(op["ms"] for op in profiles[variant]["operators"]) for variant, _ in VARIANTS}
    kinds = {variant: {name: (count, ms) for name, count, ms in by_kind(profiles[variant]["operators"])}
             for variant, _ in VARIANTS}  # fmt: skip
    order = [name for name, _, _ in by_kind([op for p in profiles.values() for op in p["operators"]])][:top]

    def cell(variant, name):
        count, ms = kinds[variant].get(name, (0, 0.0))
        return f"{count}, {ms:.2f} ({100 * ms / sums[variant]:.0f}%)" if count else "-"

    rows = [(name, *(cell(variant, name) for variant, _ in VARIANTS)) for name in order]
    rows.append(("**sum of the operators**", *(f"{sums[v]:.2f}" for v, _ in VARIANTS)))
    rows.append(("**whole model**", *(f"{profiles[v]['whole_ms']:.2f}" for v, _ in VARIANTS)))
    header = ("op kind", *(f"{label}: n, ms (share)" for _, label in VARIANTS))
    return table(header, rows, align="l" + "r" * len(VARIANTS))


def slowest_table(profiles, variant, top=8):
    from benchmarks.report import table

    operators = sorted(profiles[variant]["operators"], key=lambda op: -op["ms"])[:top]
    rows = [(op["index"], op["name"], op["output_shape"], f"{op['ms']:.3f}") for op in operators]
    return table(("#", "op", "output shape", "ms"), rows, align="rllr")


DELEGATION_INTRO = (
    "Delegation (an operator XNNPACK refuses splits the graph: the interpreter leaves XNNPACK to run it on "
    "TFLite's own kernel and enters again after it):"
)


def delegation_lines(profiles):
    """One line per model: XNNPACK's partitions and the operators it leaves out."""
    lines = []
    for variant, label in VARIANTS:
        profile, left = profiles[variant], not_delegated(profiles[variant])
        if left is None or "xnnpack_partitions" not in profile:
            continue
        names = ", ".join(f"{name} {count}" for name, count in left) or "none"
        line = (
            f"- {label}: {len(profile['operators'])} operators, XNNPACK runs the graph in "
            f"{profile['xnnpack_partitions']} partition(s); left to TFLite's own kernels: {names}"
        )
        if profile.get("all_delegated_ms"):
            whole, copies = profile["whole_ms"], profile["all_delegated_ms"]
            line += (
                f". With those replaced by copies XNNPACK takes ({profile['all_delegated_partitions']} partition(s); "
                f"wrong outputs, timed only): {copies:.2f} ms against {whole:.2f} ms "
                f"({copies / whole:.2f}x)"
            )
        lines.append(line)
    return lines


def markdown(result):
    config = result["config"]
    size = config["image_size"]
    parts = [
        "# Where the time goes, op by op (TFLite, XNNPACK)",
        f"- {size}x{size}, batch {config['batch']}, {config['threads']} threads, random weights; each operator cut "
        f"out into its own model and timed alone (median of up to {config['max_runs']} invokes, at least "
        f"{config['min_seconds']} s); 1-minute load average at the end {result['load_average_end']:.2f}"
        f"{machine_text(result)}.",
        f"- The whole models of a width (and their all-delegated forms) timed in turn, {config['whole_seconds']:g} s "
        "each (`timing.time_interleaved`), so the machine's drift falls on all alike.",
        "- The sum of the operators exceeds the whole model where a whole graph keeps data in cache and "
        "XNNPACK fuses across operators; it is the per-operator picture, not a second latency figure.",
    ]
    if config["tiny"]:
        parts.append("- **--tiny configuration: a smoke run, not a measurement.**")
    for entry in result["widths"]:
        parts += ["", f"## Width {entry['width']:g}", "", kind_table(entry["profiles"])]
        delegation = delegation_lines(entry["profiles"])
        if delegation:
            parts += ["", DELEGATION_INTRO, "", *delegation]
        for variant, label in VARIANTS[1:]:
            parts += ["", f"Slowest operators, {label}:", "", slowest_table(entry["profiles"], variant)]
    return "\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--image_size", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--output_dir", default="benchmark_results")
    parser.add_argument("--tiny", action="store_true", help="A smoke run on tiny inputs (not a measurement).")
    args = parser.parse_args(argv)
    values = dict(TINY) if args.tiny else {}
    for name in ("widths", "batch", "image_size", "threads"):
        if getattr(args, name) is not None:
            values[name] = tuple(getattr(args, name)) if name == "widths" else getattr(args, name)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = run(Config(**values))
    os.makedirs(args.output_dir, exist_ok=True)
    from benchmarks.report import print_and_write

    print_and_write(result, markdown(result), os.path.join(args.output_dir, RESULT_NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
